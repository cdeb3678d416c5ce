"""Static report of the compiled CUDA kernels, from the library's sm_90 code, without a GPU.

Per kernel: registers per thread, CTAs per SM at 256 threads as registers allow, stack and local
memory (spills), the spill loads and stores in the SASS, the CALLs to compiler subroutines (64-bit
integer division and remainder, the IEEE float division slow path: they cost tens of instructions
each where they sit in a loop), the instruction count, and each innermost loop (a backward branch)
with its instructions, its exponentials (MUFU.EX2) and whether it calls a subroutine.

    python tools/kernel_report.py                       # build-cmake/ (./run cmake) or snapkv_ext/_C*.so
    python tools/kernel_report.py LIB.so --arch sm_90 --json report.json --markdown

cuobjdump and nvdisasm come with the PyPI packages nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm
(requirements-dev.txt), or a CUDA toolkit's bin/. tests/test_kernel_report.py holds the limits.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGS_PER_SM = 65536
THREADS = 256  # every snapkv kernel's block size (kThreads)


def find_tool(name: str) -> Optional[str]:
    """``name`` on PATH, in $CUDA_HOME/bin, or in the nvidia-cuda-* PyPI packages."""
    found = shutil.which(name)
    if found:
        return found
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    for p in sys.path:
        cands += glob.glob(os.path.join(p, "nvidia", "cu*", "bin", name)) + glob.glob(os.path.join(p, "nvidia", "cuda_*", "bin", name))
    return next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def default_library() -> Optional[str]:
    libs = sorted(glob.glob(os.path.join(ROOT, "build-cmake", "*.so"))) + sorted(glob.glob(os.path.join(ROOT, "snapkv_ext", "_C*.so")))
    return libs[0] if libs else None


def _demangle(names: List[str]) -> Dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """``snapkv::ws::stats_kernel<c10::BFloat16, true, false>`` from the full signature."""
    name = demangled.split("(", 1)[0]
    return name.replace("void ", "").replace("(anonymous namespace)::", "")


def _run(tool: str, args: List[str]) -> str:
    r = subprocess.run([tool] + args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{os.path.basename(tool)} {' '.join(args)} failed: {r.stderr.strip()[:500]}")
    return r.stdout


RES = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
FUNC = re.compile(r"^\s+Function : (\S+)")


def ctas_per_sm(regs: int, threads: int = THREADS) -> int:
    """CTAs of `threads` threads one SM holds as far as registers go (warp allocation unit 256)."""
    per_warp = -(-regs * 32 // 256) * 256
    warps = threads // 32
    return min(REGS_PER_SM // (per_warp * warps), 2048 // threads) if per_warp else 2048 // threads


def _loops(insns):
    """Innermost loops: (start, end) address ranges closed by a backward branch, none nested."""
    loops = []
    for addr, op, operands in insns:
        if op.startswith("BRA") or op.startswith("BRX"):
            m = re.search(r"0x([0-9a-f]+)", operands)
            if m and int(m.group(1), 16) < addr:
                loops.append((int(m.group(1), 16), addr))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return sorted(set(inner))


def _callee_kind(insns, operands: str) -> str:
    """What a CALL's target subroutine is, from its body (up to its RET): the 64-bit integer
    division/remainder (I2F.U64.RP), the IEEE float division slow path (MUFU.RCP), or other."""
    m = re.search(r"0x([0-9a-f]+)", operands)
    if not m:
        return operands.strip()
    start, ops = int(m.group(1), 16), []
    for addr, op, _ in insns:
        if addr >= start:
            ops.append(op)
            if op.startswith("RET"):
                break
    if any(op.startswith("I2F.U64.RP") for op in ops):
        return "int64 div/rem"
    if any(op.startswith("MUFU.RCP") for op in ops):
        return "float div slow path"
    if any(op.startswith("MUFU.RSQ") for op in ops):
        return "sqrt slow path"
    return "other"


def report(lib: str, arch: str = "sm_90") -> List[dict]:
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm "
                           "(or put a CUDA toolkit's bin/ on PATH)")
    res = {m.group(1): dict(regs=int(m.group(2)), stack=int(m.group(3)), shared=int(m.group(4)), local=int(m.group(5)))
           for m in RES.finditer(_run(cuobjdump, ["-res-usage", "-arch", arch, lib]))}
    if not res:
        raise RuntimeError(f"{lib} has no {arch} code (build it with TORCH_CUDA_ARCH_LIST / CUDAARCHS for {arch})")
    sass: Dict[str, list] = {}
    cur = None
    for line in _run(cuobjdump, ["-sass", "-arch", arch, lib]).splitlines():
        f = FUNC.match(line)
        if f:
            cur = f.group(1)
            sass[cur] = []
            continue
        m = INSN.search(line)
        if cur and m:
            sass[cur].append((int(m.group(1), 16), m.group(3), m.group(4)))
    names = _demangle(sorted(res))
    out = []
    for mangled, r in res.items():
        insns = sass.get(mangled, [])
        calls: Dict[str, int] = {}
        for _, op, operands in insns:
            if op.startswith("CALL"):
                key = _callee_kind(insns, operands)
                calls[key] = calls.get(key, 0) + 1
        loops = []
        for a, b in _loops(insns):
            body = [(op, operands) for addr, op, operands in insns if a <= addr <= b]
            loops.append(dict(start=hex(a), end=hex(b), instructions=len(body),
                              exp2=sum(op.startswith("MUFU.EX2") for op, _ in body),
                              calls=sum(op.startswith("CALL") for op, _ in body),
                              mma=sum(op.startswith(("HMMA", "IMMA", "HGMMA")) for op, _ in body)))
        out.append(dict(
            kernel=short_name(names[mangled]), mangled=mangled, registers=r["regs"], stack=r["stack"],
            local=r["local"], static_shared=r["shared"], ctas_per_sm_by_registers=ctas_per_sm(r["regs"]),
            spill_stores=sum(op.startswith("STL") for _, op, _ in insns),
            spill_loads=sum(op.startswith("LDL") for _, op, _ in insns),
            calls=calls, call_count=sum(calls.values()), instructions=len(insns), loops=loops))
    return sorted(out, key=lambda k: k["kernel"])


def markdown(rows: List[dict]) -> str:
    lines = ["| kernel | registers | CTAs/SM by registers (256 threads) | spill stores/loads | CALLs (what they call) | instructions |",
             "|---|---|---|---|---|---|"]
    for k in rows:
        calls = ", ".join(f"{n} {what}" for what, n in sorted(k["calls"].items())) or "0"
        lines.append(f"| `{k['kernel'].replace('snapkv::', '')}` | {k['registers']} | {k['ctas_per_sm_by_registers']} | "
                     f"{k['spill_stores']}/{k['spill_loads']} | {calls} | {k['instructions']} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("library", nargs="?", default=None, help="the built extension (default: build-cmake/*.so, "
                   "else snapkv_ext/_C*.so)")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (RESULTS.md)")
    args = p.parse_args()
    lib = args.library or default_library()
    if lib is None:
        sys.exit("no library: build one (./run cmake) or name it")
    try:
        rows = report(lib, args.arch)
    except RuntimeError as e:
        sys.exit(str(e))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(library=os.path.relpath(lib, ROOT), arch=args.arch, kernels=rows), f, indent=1)
    if args.markdown:
        print(markdown(rows))
    else:
        for k in rows:
            print(f"{k['kernel']}\n  regs {k['registers']} (CTAs/SM by regs at 256 threads: {k['ctas_per_sm_by_registers']}), "
                  f"stack {k['stack']} B, spills {k['spill_stores']} st / {k['spill_loads']} ld, "
                  f"{k['instructions']} instructions, CALLs {k['calls'] or 0}")
            for lp in k["loops"]:
                print(f"    loop {lp['start']}-{lp['end']}: {lp['instructions']} instr, {lp['exp2']} ex2, "
                      f"{lp['mma']} mma, {lp['calls']} calls")


if __name__ == "__main__":
    main()
