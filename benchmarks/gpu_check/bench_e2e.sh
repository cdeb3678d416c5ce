#!/usr/bin/env bash
# GPU check, step 5: end-to-end benchmarks on the Llama-2-7B shape (random weights, full MHA),
# bfloat16. Three parts; name one or more to run them (default: all three, in this order):
#
#   generate    16K prompt, batch 2, budget 2048: prefill and decode, SnapKVCache vs DynamicCache
#   max-length  the longest prompt each cache fits (batch 1, budget 1024)
#   questions   many questions on one 16K document (SnapKVDocument vs re-prefilling)
#   prefill-mha layer-major prefill, Llama-2-7B/LWM-7B shape (full MHA) with its first 2 layers: 256K to
#               1M tokens, peak allocated against the formula (the per-layer terms are the whole
#               model's; add 13.5 GB of weights for all 32 layers), then one-shot's longest from 128K
#   prefill-gqa the same for the Llama-3-8B shape (GQA): 512K to 2M tokens
#
#   bash benchmarks/gpu_check/bench_e2e.sh                   # all three
#   bash benchmarks/gpu_check/bench_e2e.sh generate          # one part per device command, if
#   bash benchmarks/gpu_check/bench_e2e.sh max-length        # together they outrun 10 minutes
#
# Writes $OUT/bench_generate_cuda.{txt,json}, $OUT/max_length_cuda.{txt,json},
# $OUT/bench_questions_cuda.{txt,json}. Each part has its own GPU_CHECK_STEP_TIMEOUT.
set -uo pipefail
parts=("$@")
[ $# -gt 0 ] || parts=(generate max-length questions prefill-mha prefill-gqa)
for p in "${parts[@]}"; do
  case "$p" in generate|max-length|questions|prefill-mha|prefill-gqa) ;;
    *) echo "usage: $0 [generate] [max-length] [questions] [prefill-mha] [prefill-gqa]" >&2; exit 2 ;; esac
done
# shellcheck source=benchmarks/gpu_check/common.sh
source "$(dirname "$0")/common.sh"
need_gpu
ensure_built

status=0
for p in "${parts[@]}"; do
  case "$p" in
    generate)
      step "end-to-end: Llama-2-7B shape, bf16, 16K prompt, batch 2, budget 2048"
      run_step bench_generate_cuda "$PY" benchmarks/bench_generate.py --model llama2-7b --device cuda --dtype bfloat16 \
        --lengths 16384 --batch 2 --max-capacity-prompt 2048 --reps 3 --decode-steps 32 --json "$OUT/bench_generate_cuda.json" ;;
    max-length)
      step "end-to-end: longest prompt that fits, Llama-2-7B shape, bf16, batch 1, budget 1024"
      run_step max_length_cuda "$PY" benchmarks/bench_generate.py --model llama2-7b --device cuda --dtype bfloat16 \
        --batch 1 --max-capacity-prompt 1024 --max-length-search --json "$OUT/max_length_cuda.json" ;;
    questions)
      step "many questions: 16K document, Llama-2-7B shape, bf16"
      run_step bench_questions_cuda "$PY" benchmarks/bench_questions.py --model llama2-7b --device cuda --dtype bfloat16 \
        --lengths 16384 --json "$OUT/bench_questions_cuda.json" ;;
    prefill-mha)
      step "layer-major prefill: Llama-2-7B shape (MHA), 2 layers, bf16, 256K..1M tokens, chunk 8192"
      run_step prefill_mha_cuda "$PY" benchmarks/bench_prefill.py --model llama2-7b --layers 2 --device cuda \
        --dtype bfloat16 --chunk-size 8192 --max-capacity-prompt 4096 --lengths 262144 --max-length 1048576 \
        --max-length-search --modes layer-major one-shot --json "$OUT/prefill_mha_cuda.json" ;;
    prefill-gqa)
      step "layer-major prefill: Llama-3-8B shape (GQA), 2 layers, bf16, 512K..2M tokens, chunk 8192"
      run_step prefill_gqa_cuda "$PY" benchmarks/bench_prefill.py --model llama3-8b --layers 2 --device cuda \
        --dtype bfloat16 --chunk-size 8192 --max-capacity-prompt 4096 --lengths 524288 --max-length 2097152 \
        --max-length-search --modes layer-major --json "$OUT/prefill_gqa_cuda.json" ;;
  esac || status=1
done
exit "$status"
