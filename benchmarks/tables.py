"""Markdown tables from the JSON files the benchmarks write (for benchmarks/RESULTS.md).

    python benchmarks/tables.py benchmarks/results/bench_ops_cpu.json [...]
"""
import json
import sys


def ops_table(d):
    rows = ["| config | dtype | L | op | ours ms | torch ms | speedup | peak MB ours / torch | workspace MB ours / torch |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        rows.append(f"| {r['config']} | {r['dtype']} | {r['L']} | {r['op']} | {r['ours_ms']:.2f} | {r['torch_ms']:.2f} | "
                    f"**{r['speedup']:.2f}x** | {r['ours_peak_mb']:.1f} / {r['torch_peak_mb']:.1f} | "
                    f"{r['ours_workspace_mb']:.1f} / {r['torch_workspace_mb']:.1f} |")
    return "\n".join(rows)


def generate_table(d):
    rows = ["| prompt | prefill full s | prefill SnapKV s | overhead | decode ms SnapKV | decode ms DynamicCache same physical | ratio | decode ms full | speedup vs full | KV MB full | KV MB SnapKV | budget arithmetic MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        rows.append(f"| {r['L']} | {r['prefill_full_s']:.3f} | {r['prefill_snap_s']:.3f} | {100 * r['prefill_overhead']:+.1f}% | "
                    f"{r['decode_snap_ms']:.2f} | {r['decode_dynamic_same_physical_ms']:.2f} | {r['decode_vs_same_physical']:.3f} | "
                    f"{r['decode_full_ms']:.2f} | {r['decode_speedup_vs_full']:.2f}x | {r['kv_bytes_full'] / 2**20:.2f} | "
                    f"{r['kv_bytes_snap'] / 2**20:.2f} ({r['kv_bytes_snap']} B) | {r['kv_bytes_budget_arithmetic'] / 2**20:.2f} "
                    f"({r['kv_bytes_budget_arithmetic']} B) |")
    return "\n".join(rows)


def questions_table(d):
    rows = ["| document tokens | read once s | time to first token: SnapKVDocument ms | re-prefill doc + question ms | speedup |",
            "|---|---|---|---|---|"]
    for r in d["rows"]:
        rows.append(f"| {r['doc_tokens']} | {r['read_once_s']:.2f} | {r['ttft_document_s'] * 1e3:.0f} | "
                    f"{r['ttft_reprefill_s'] * 1e3:.0f} | **{r['speedup']:.1f}x** |")
    if d.get("accuracy"):
        rows += ["", "| kept | SnapKVDocument | question-agnostic (compress first, ask after) | SnapKVCache from scratch |",
                 "|---|---|---|---|"]
        for k, v in d["accuracy"].items():
            rows.append(f"| {k} | {v['document']}/5 | {v['question_agnostic']}/5 | {v['from_scratch']}/5 |")
    return "\n".join(rows)


def main():
    for path in sys.argv[1:]:
        d = json.load(open(path))
        print(f"<!-- {path}: {d.get('meta', {})} -->")
        if "rows" in d and d["rows"] and "op" in d["rows"][0]:
            print(ops_table(d))
        elif "rows" in d and d["rows"] and "prefill_full_s" in d["rows"][0]:
            print(generate_table(d))
        elif "rows" in d and d["rows"] and "doc_tokens" in d["rows"][0]:
            print(questions_table(d))
        print()


if __name__ == "__main__":
    main()
