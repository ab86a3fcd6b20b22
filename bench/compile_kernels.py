"""Compile every Triton kernel of paged_attention/triton_paged.py for NVIDIA GPUs, with no GPU needed.

    python bench/compile_kernels.py                      # the whole matrix, as a table
    python bench/compile_kernels.py --ci --json out.json # the CI subset (tests/test_gpu_compile.py)

Each kernel is compiled exactly as its wrapper would launch it: the launches come from
triton_paged's *_launches functions (grid, arguments, constexprs, num_warps, num_stages) called on
CPU tensors of the model's head shape, and Triton's own argument specialization (16-byte
divisibility of pointers and integers) is applied for the target. Triton lowers to PTX and runs
the ptxas of its wheel; registers, spill stores and stack frame come from ptxas's verbose log
(a driver, absent here, would report them as n_regs and n_spills), shared memory from the kernel's
metadata. Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import time

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench/compile_kernels.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from paged_attention import triton_paged as tp  # noqa: E402

# (query heads, kv heads, head dim) of the models the project targets, and the tiny ones it ships
SHAPES = {"qwen2.5-7b": (28, 4, 128), "qwen2.5-14b": (40, 8, 128), "qwen3-8b": (32, 8, 128),
          "tiny": (4, 2, 64), "nano": (4, 2, 16)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SMS = {80: 108, 90: 132}  # A100, H100 / H200: sets the decode split count
# max dynamic shared memory per block (bytes): A100 163 KB, H100 227 KB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGS = 255
CI = dict(archs=[90, 80], shapes=["qwen2.5-7b"], dtypes=["bf16"], block_sizes=[16])

# representative batches: 4 prefill sequences of up to 512 new tokens, 8 decode rows over 8K-token tables
PREFILL_LENS, DECODE_BATCH, CONTEXT = [512, 300, 77, 1], 8, 8192


def launches(Hq, Hkv, D, dtype, block_size, sms):
    """kernel name -> the Launch the wrappers would run at this shape (CPU tensors, GPU settings)."""
    pages = CONTEXT // block_size
    kc = torch.zeros(4, block_size, Hkv, D, dtype=dtype)  # the number of blocks only moves a pointer
    N = sum(PREFILL_LENS)
    qkv = torch.zeros(N, Hq + 2 * Hkv, D, dtype=dtype)  # q, k, v as views of a fused projection
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    (store,) = tp.store_kv_launches(k, v, kc, kc, torch.zeros(N, dtype=torch.int64))
    cu = torch.tensor([0] + PREFILL_LENS, dtype=torch.int32).cumsum(0).to(torch.int32)
    B = len(PREFILL_LENS)
    ctx, bt = torch.zeros(B, dtype=torch.int32), torch.zeros(B, pages, dtype=torch.int32)
    (prefill,) = tp.prefill_launches(q, kc, kc, torch.empty_like(q), cu, ctx, bt, max(PREFILL_LENS), D ** -0.5,
                                     interpret=False)
    qd = torch.zeros(DECODE_BATCH, Hq, D, dtype=dtype)
    ctx, bt = torch.zeros(DECODE_BATCH, dtype=torch.int32), torch.zeros(DECODE_BATCH, pages, dtype=torch.int32)
    splits = tp.default_num_splits(DECODE_BATCH, Hkv, pages, sms)
    split, merge = tp.decode_launches(qd, kc, kc, *tp.decode_partials(qd, splits), torch.empty_like(qd), ctx, bt,
                                      D ** -0.5, interpret=False)
    return {"store_kv": store, "prefill": prefill, "decode_split": split, "decode_merge": merge}


def compile_launch(launch, target):
    """Compile one Launch for target as JITFunction.run would, without a driver -> (kernel, ptxas -v log)."""
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.meta), bound, specialization,
                                                              options)
    log = io.StringIO()
    # Triton prints ptxas's verbose log when asked, and only when ptxas runs: so never from its cache
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


def ptxas_usage(log):
    """registers, spill-store bytes, stack-frame bytes and performance notes from a ptxas -v log."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    if not (regs and frame):
        raise RuntimeError(f"no register / spill counts in ptxas's log: {log[-2000:]!r}")
    notes = [line.split(":", 1)[1].strip() for line in log.splitlines() if "Performance" in line]
    return dict(regs=int(regs[1]), spill_bytes=int(frame[2]), stack_bytes=int(frame[1]), notes=notes)


def run(archs, shapes, dtypes, block_sizes):
    """One row per (arch, shape, dtype, block size, kernel); a failed compile is a row with its error."""
    rows = []
    for arch, shape, dt, bs in itertools.product(archs, shapes, dtypes, block_sizes):
        for name, launch in launches(*SHAPES[shape], DTYPES[dt], bs, SMS[arch]).items():
            row = dict(arch=f"sm_{arch}", shape=shape, dtype=dt, block_size=bs, kernel=name,
                       num_warps=launch.meta["num_warps"], num_stages=launch.meta["num_stages"],
                       constexprs={k: v for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")})
            t = time.perf_counter()
            try:
                compiled, log = compile_launch(launch, GPUTarget("cuda", arch, 32))
                row.update(ptxas_usage(log), shared=compiled.metadata.shared, shared_limit=SHARED_LIMIT[arch])
            except Exception as e:  # noqa: BLE001 - reported per row, the matrix goes on
                row["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
            row["seconds"] = round(time.perf_counter() - t, 2)
            rows.append(row)
    return rows


def table(rows):
    head = ("| arch | shape | dtype | block | kernel | warps | stages | regs | spill B | stack B | shared B "
            "| compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        stats = ["ERROR", "", "", r["error"].splitlines()[0][:60]] if "error" in r else \
            [str(r["regs"]), str(r["spill_bytes"]), str(r["stack_bytes"]), str(r["shared"])]
        lines.append("| " + " | ".join([r["arch"], r["shape"], r["dtype"], str(r["block_size"]), r["kernel"],
                                        str(r["num_warps"]), str(r["num_stages"]), *stats, str(r["seconds"])]) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ci", action="store_true", help=f"only the CI subset: {CI}")
    ap.add_argument("--archs", default="80,90", help="compute capabilities, comma list (e.g. 80,90)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--dtypes", default="bf16,fp16", help=f"comma list of {sorted(DTYPES)}")
    ap.add_argument("--block-sizes", default="16,64", help="KV cache block sizes, comma list")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.ci:
        sel = CI
    else:
        sel = dict(archs=[int(a) for a in args.archs.split(",")], shapes=args.shapes.split(","),
                   dtypes=args.dtypes.split(","), block_sizes=[int(b) for b in args.block_sizes.split(",")])
        for key, known in (("archs", SMS), ("shapes", SHAPES), ("dtypes", DTYPES)):
            bad = [x for x in sel[key] if x not in known]
            if bad:
                ap.error(f"--{key}: unknown {bad}, expected some of {sorted(known)}")
    rows = run(**sel)
    print(table(rows))
    for r in rows:
        for note in r.get("notes", []):
            print(f'ptxas, {r["kernel"]} {r["arch"]} {r["shape"]} {r["dtype"]} block {r["block_size"]}: {note}')
    bad = [r for r in rows if "error" in r or r["spill_bytes"] or r["regs"] > MAX_REGS
           or r["shared"] > r["shared_limit"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if bad:
        print(f"{len(bad)} of {len(rows)} compiles failed, spilled or exceed a limit", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
