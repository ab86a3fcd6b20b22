"""Paged-attention kernel throughput: the Triton kernels against their PyTorch reference, side by side.

    python bench/attention.py --device cuda --json out.json   # Qwen2.5-7B heads (28 q / 4 kv, dim 128), bf16
    python bench/attention.py                                 # CPU: the reference at tiny shapes
    TRITON_INTERPRET=1 python bench/attention.py --backends torch,triton   # CPU, both (interpreted: slow)

Decode: one query per sequence over context tokens of a paged cache (pages shuffled), every sequence
of the batch equally long. Its KV-read bandwidth is the K and V bytes the batch owns over the call's
time, as a fraction of the card's peak HBM bandwidth: a table keyed by device name, else a measured
device-to-device copy (which reads and writes, so it sits below the datasheet's number). Prefill:
whole sequences of new tokens (no cached prefix), causal; TFLOP/s count the 4 * D flops per head of
each (query, visible key) pair. tokens_per_s: queries per second through one layer's kernel. Times
on CUDA come from CUDA events over repeated calls after a warm-up; each backend's output is compared
with the first backend's (max_diff, the largest absolute difference).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import paged_attention  # noqa: E402

# datasheet HBM bandwidth, bytes/s; the first name contained in torch's device name wins
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 80GB HBM3", 3.35e12), ("H100 SXM", 3.35e12), ("A100-SXM4-80GB", 2.0e12),
                  ("A100 80GB", 2.0e12)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULTS = {  # per device: heads (q, kv, dim), dtype, decode batches and contexts, prefill batch x length
    "cuda": dict(heads="28,4,128", dtype="bf16", batches="1,16,64,256", contexts="1024,8192,32768",
                 prefill="1x8192,4x2048,16x512", backends="triton,torch"),
    "cpu": dict(heads="4,2,16", dtype="fp32", batches="1,4", contexts="64,256", prefill="2x64", backends="torch"),
}


def peak_bandwidth(device):
    """(bytes/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bw in PEAK_BANDWIDTH:
            if key in name:
                return bw, f"datasheet ({name})"
    x = torch.empty((1024 if device.type == "cuda" else 64) * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), device)
    return 2 * x.numel() / seconds, "measured copy (read + write)"


def timed(fn, device, min_seconds=0.15):
    """Seconds per call of fn: warm-up, then enough calls to fill about min_seconds, best of three."""
    fn()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    calls = max(1, min(1000, int(min_seconds / 3 / max(time.perf_counter() - t, 1e-6))))
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / calls)
        else:
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t) / calls)
    return best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paged_cache(batch, context, Hkv, D, block_size, dtype, device, gen):
    """Random K/V for batch sequences of context tokens over shuffled pages, and their block tables."""
    pages = -(-context // block_size)
    k_cache = torch.randn(batch * pages, block_size, Hkv, D, generator=gen).to(dtype=dtype, device=device)
    v_cache = torch.randn(batch * pages, block_size, Hkv, D, generator=gen).to(dtype=dtype, device=device)
    tables = torch.randperm(batch * pages, generator=gen).view(batch, pages).to(torch.int32).to(device)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return k_cache, v_cache, lens, tables


def compare(fns, backends, device):
    """Seconds per call of each backend, and the largest output difference of each from the first."""
    outs = {b: fns(b).float() for b in backends}
    times = {b: timed(lambda: fns(b), device) for b in backends}
    return times, {b: (outs[b] - outs[backends[0]]).abs().max().item() for b in backends}


def bench_decode(batch, context, heads, dtype, block_size, backends, device, peak, gen):
    Hq, Hkv, D = heads
    kc, vc, lens, tables = paged_cache(batch, context, Hkv, D, block_size, dtype, device, gen)
    q = torch.randn(batch, Hq, D, generator=gen).to(dtype=dtype, device=device)
    times, diff = compare(lambda b: paged_attention.decode_attention(q, kc, vc, lens, tables, D ** -0.5, backend=b),
                          backends, device)
    kv_bytes = 2 * batch * context * Hkv * D * kc.element_size()
    return [dict(op="decode", backend=b, batch=batch, context=context, ms=s * 1e3, tokens_per_s=batch / s,
                 kv_gb_per_s=kv_bytes / s / 1e9, peak_fraction=kv_bytes / s / peak, max_diff=diff[b])
            for b, s in times.items()]


def bench_prefill(batch, length, heads, dtype, block_size, backends, device, peak, gen):
    Hq, Hkv, D = heads
    kc, vc, lens, tables = paged_cache(batch, length, Hkv, D, block_size, dtype, device, gen)
    q = torch.randn(batch * length, Hq, D, generator=gen).to(dtype=dtype, device=device)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * length
    times, diff = compare(lambda b: paged_attention.prefill_attention(q, kc, vc, cu, lens, tables, length, D ** -0.5,
                                                              backend=b), backends, device)
    flops = 4 * D * Hq * batch * length * (length + 1) / 2  # query i sees keys 0..i
    kv_bytes = 2 * batch * length * Hkv * D * kc.element_size()
    return [dict(op="prefill", backend=b, batch=batch, context=length, ms=s * 1e3, tokens_per_s=batch * length / s,
                 tflops=flops / s / 1e12, kv_gb_per_s=kv_bytes / s / 1e9, peak_fraction=kv_bytes / s / peak,
                 max_diff=diff[b]) for b, s in times.items()]


def parse(text, what, convert=int):
    try:
        return [convert(x) for x in text.split(",") if x]
    except ValueError:
        raise SystemExit(f"bench/attention.py: bad {what} {text!r}") from None


def table(rows):
    cols = ["op", "backend", "batch", "context", "ms", "tokens_per_s", "tflops", "kv_gb_per_s", "peak_fraction",
            "max_diff"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    cell = lambda v: (f"{v:.0f}" if v >= 1e4 else f"{v:.4g}") if isinstance(v, float) else str(v)  # noqa: E731
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--heads", help="query heads, kv heads, head dim (default: 28,4,128 on cuda, 4,2,16 on cpu)")
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--batches", help="decode batch sizes, comma list")
    ap.add_argument("--contexts", help="decode context lengths, comma list")
    ap.add_argument("--prefill", help="prefill cases BATCHxLENGTH, comma list")
    ap.add_argument("--backends", help="comma list of triton, torch; the first is the reference for max_diff")
    ap.add_argument("--max-kv-gb", type=float, default=8.0, help="skip decode cases whose K/V exceed this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows and the peak bandwidth to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/attention.py: --device cuda but torch sees no CUDA device")
    d = DEFAULTS[device.type]
    heads = parse(args.heads or d["heads"], "--heads")
    backends = (args.backends or d["backends"]).split(",")
    if len(heads) != 3 or heads[0] % heads[1]:
        raise SystemExit(f"bench/attention.py: --heads wants q,kv,dim with q a multiple of kv, got {heads}")
    if any(b not in ("triton", "torch") for b in backends):
        raise SystemExit(f"bench/attention.py: --backends: expected triton and/or torch, got {backends}")
    if device.type == "cpu" and "triton" in backends and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench/attention.py: the triton backend on CPU needs TRITON_INTERPRET=1 in the environment")
    dtype = DTYPES[args.dtype or d["dtype"]]
    prefill = [parse(c.replace("x", ","), "--prefill case") for c in (args.prefill or d["prefill"]).split(",")]
    if any(len(c) != 2 for c in prefill):
        raise SystemExit(f"bench/attention.py: --prefill wants BATCHxLENGTH cases, got {args.prefill!r}")
    gen = torch.Generator().manual_seed(args.seed)
    peak, source = peak_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, {dtype}, heads {heads}, block size {args.block_size}; peak bandwidth {peak / 1e9:.0f} GB/s "
          f"({source})")
    rows = []
    for batch in parse(args.batches or d["batches"], "--batches"):
        for context in parse(args.contexts or d["contexts"], "--contexts"):
            if 2 * batch * context * heads[1] * heads[2] * dtype.itemsize > args.max_kv_gb * 1e9:
                continue
            rows += bench_decode(batch, context, heads, dtype, args.block_size, backends, device, peak, gen)
    for batch, length in prefill:
        rows += bench_prefill(batch, length, heads, dtype, args.block_size, backends, device, peak, gen)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, dtype=str(dtype), heads=heads, block_size=args.block_size,
                           peak_bandwidth=peak, peak_source=source, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
