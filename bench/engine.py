"""Rollout-engine throughput, side by side with the ways people generate without one.

Same model, same prompts, one run, greedy, every request generating exactly its new tokens (no stop
tokens). Workloads:
  ragged   --num-prompts prompts of --min-len..--max-len tokens, --new-tokens each
  group    MemAgent's shape: --groups prompts of 300..400 tokens, each rolled out --group-n times,
           32 new tokens (the n rollouts of a question share their prompt)
Methods:
  engine (cold)  a fresh rollout.Engine: paged KV, continuous batching with mixed steps, prefix cache
  engine (warm)  the same engine run again: its prefix cache already holds the prompts
  contiguous     an HF-style loop: static batches of --loop-batch prompts, left-padded, one
                 preallocated contiguous K/V buffer per layer, prefill then decode; it runs the
                 model's own modules through a contiguous-cache attention backend (ContiguousKV)
  hf generate    transformers' generate on the same weights (only when transformers is installed)
Runs alternate --repeats times (the machine is noisy); each method reports its best run and the
ratios use those. In fp32 every method's greedy tokens are asserted equal to the engine's; in
bf16 (the CUDA default) batch shapes flip near-ties, so the count of equal prompts is printed.
Then where the engine's time goes (cProfile of one cold run): attention, matmuls, other model ops,
scheduling and bookkeeping, sampling.

  python bench/engine.py                             # tiny random model, fp32, CPU
  python bench/engine.py --device cuda --json out.json   # also CUDA graphs on/off (bench/gpu_check.py)
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import build_model  # noqa: E402
from rollout import Engine, SamplingParams  # noqa: E402


def make_prompts(n, lo, hi, vocab, seed, first_id=4):
    """n prompts of uniform random length in [lo, hi], ids from first_id up (the tiny tokenizer's
    special tokens sit below it)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(first_id, vocab, (t,), generator=g).tolist() for t in lengths]


def greedy(n):
    return SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=())  # ignore EOS


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# the contiguous-cache loop: what HF-style generate does with a static cache

class ContiguousKV:
    """Attention backend (model.py's interface) over one preallocated (B, Hkv, L, D) buffer per
    layer: tokens are written at cache index `start`.., and attend under `mask`."""

    def __init__(self, num_layers, B, Hkv, L, D, dtype, device):
        self.k = [torch.zeros(B, Hkv, L, D, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(B, Hkv, L, D, dtype=dtype, device=device) for _ in range(num_layers)]
        self.start, self.mask = 0, None

    def attend(self, layer, q, k, v):  # q (B, T, nh, hd), k/v (B, T, nkv, hd)
        end = self.start + q.shape[1]
        self.k[layer][:, :, self.start:end] = k.transpose(1, 2)
        self.v[layer][:, :, self.start:end] = v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[layer][:, :, :end], self.v[layer][:, :, :end],
                                           attn_mask=self.mask, enable_gqa=k.shape[2] != q.shape[2])
        return y.transpose(1, 2)  # (B, T, nh, hd)


@torch.inference_mode()
def contiguous_generate(model, prompts, new_tokens, batch_size):
    out = []
    for i in range(0, len(prompts), batch_size):
        out += _contiguous_batch(model, prompts[i:i + batch_size], new_tokens)
    return out


def _contiguous_batch(model, prompts, new_tokens):
    cfg, p = model.config, next(model.parameters())
    dev, B, T0 = p.device, len(prompts), max(len(x) for x in prompts)
    L = T0 + new_tokens
    pad = torch.tensor([T0 - len(x) for x in prompts], device=dev)  # (B,) left padding
    ids = torch.tensor([[0] * (T0 - len(x)) + x for x in prompts], device=dev)  # (B, T0)
    kv = ContiguousKV(cfg.num_layers, B, cfg.num_kv_heads, L, cfg.head_dim, p.dtype, dev)
    real = torch.arange(L, device=dev)[None] >= pad[:, None]  # (B, L) slots holding real tokens
    # a padding query also sees itself, or its softmax row would be all -inf and NaN would enter the cache
    causal = torch.ones(T0, T0, dtype=torch.bool, device=dev).tril()
    kv.mask = ((real[:, None, :T0] & causal) | torch.eye(T0, dtype=torch.bool, device=dev))[:, None]
    pos = (torch.arange(T0, device=dev)[None] - pad[:, None]).clamp(min=0)  # (B, T0)
    tok = model(ids, pos, attn=kv, logits_rows=[T0 - 1])[:, 0].argmax(-1)  # (B,)
    out = [tok]
    for t in range(T0, L - 1):  # decode: one token per row, written at cache index t
        kv.start, kv.mask = t, real[:, None, None, :t + 1]
        tok = model(tok[:, None], (t - pad)[:, None], attn=kv)[:, 0].argmax(-1)
        out.append(tok)
    return torch.stack(out, 1).tolist()  # (B, new_tokens)


def hf_generate(model, prompts, new_tokens, batch_size):
    """transformers' own generate on the same weights (saved and reloaded), left-padded batches."""
    import tempfile

    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=next(model.parameters()).dtype)
    hf = hf.to(next(model.parameters()).device).eval()

    def run():
        out = []
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            T0 = max(map(len, batch))
            ids = torch.tensor([[0] * (T0 - len(x)) + x for x in batch], device=hf.device)
            mask = torch.tensor([[0] * (T0 - len(x)) + [1] * len(x) for x in batch], device=hf.device)
            with torch.inference_mode():
                gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            out += gen[:, T0:].tolist()
        return out
    return run


# --------------------------------------------------------------------------------------------

def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench_workload(model, name, prompts, new_tokens, args, engine_kw):
    """Every method on one workload, alternating; -> {method: best tok/s}."""
    dev = next(model.parameters()).device
    engines = {}

    def cold():
        engines["warm"] = Engine(model, **engine_kw)
        return [c.token_ids for c in engines["warm"].generate(prompts, greedy(new_tokens))]

    methods = {"engine (cold)": cold,
               "engine (warm)": lambda: [c.token_ids for c in engines["warm"].generate(prompts, greedy(new_tokens))],
               "contiguous": lambda: contiguous_generate(model, prompts, new_tokens, args.loop_batch)}
    try:
        methods["hf generate"] = hf_generate(model, prompts, new_tokens, args.loop_batch)
    except ImportError:
        print("  (hf generate: transformers not installed, skipped)")
    # warm-up: first-call allocations and kernel compiles stay out of the timings
    Engine(model, **engine_kw).generate(prompts[:4], greedy(4))
    contiguous_generate(model, prompts[:4], 4, args.loop_batch)
    best, reference, equal = {}, None, {}
    exact = next(model.parameters()).dtype == torch.float32
    for _ in range(args.repeats):
        for m, fn in methods.items():
            dt, out = timed(fn, dev)
            best[m] = min(best.get(m, float("inf")), dt)
            reference = reference or out
            differ = [i for i, (a, b) in enumerate(zip(reference, out)) if a != b]
            # in fp32 every method computes the same argmaxes; in 16-bit, batch shapes flip near-ties
            assert not (exact and differ), f"{name}: {m}'s greedy tokens differ from the engine's on {differ[:5]}"
            equal[m] = len(prompts) - len(differ)
    gen = len(prompts) * new_tokens
    print(f"\n== {name}: {len(prompts)} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens, "
          f"{new_tokens} new tokens each; greedy tokens equal to the engine's: "
          + ", ".join(f"{m} {k}/{len(prompts)}" for m, k in equal.items()) + " ==")
    print(f"  {'method':<16} {'best s':>8} {'gen tok/s':>10} {'engine (cold) speedup':>22}")
    for m, s in best.items():
        print(f"  {m:<16} {s:>8.2f} {gen / s:>10.1f} {s / best['engine (cold)']:>21.2f}x")
    return {"tok_s": {m: gen / s for m, s in best.items()}, "equal_prompts": equal}


PROFILE_PARTS = [  # (part, function names whose cumulative time it is)
    ("attention (PagedKV.attend)", ("attend",)),
    ("matmuls (linear)", ("<built-in method torch._C._nn.linear>",)),
    ("sampling", ("sample",)),
    ("scheduling + bookkeeping", ("schedule", "_prepare", "_postprocess", "_sampling_tensors", "add_request")),
]


def profile_split(model, prompts, new_tokens, engine_kw):
    """cProfile one cold engine run; the model's other ops are forward minus attention and matmuls."""
    import cProfile
    import pstats

    engine = Engine(model, **engine_kw)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(engine.generate, prompts, greedy(new_tokens))
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, ncalls, tottime, cumtime, callers)

    def cum(names):
        return sum(v[3] for k, v in stats.items() if k[2] in names and "site-packages" not in k[0])
    split = {part: cum(names) for part, names in PROFILE_PARTS}
    forward = max((v[3] for k, v in stats.items() if k[2] == "forward" and k[0].endswith("model.py")), default=0)
    split["other model ops (norms, RoPE, residual, ...)"] = forward - split["attention (PagedKV.attend)"] \
        - split["matmuls (linear)"]
    print(f"\n  where a cold engine run's time goes (cProfile, {total:.2f}s with profiling overhead):")
    for part, t in split.items():
        print(f"    {part:<46} {t:>6.2f}s {t / total:>6.1%}")
    return {k: v / total for k, v in split.items()}


def bench_graphs(model, prompts, new_tokens, engine_kw):
    """CUDA only: decode with and without CUDA graphs, greedy tokens equal."""
    res = {}
    for graphs in (True, False):
        kw = dict(engine_kw, cuda_graphs=graphs)
        Engine(model, **kw).generate(prompts, greedy(4))  # compile + capture
        engine = Engine(model, **kw)
        dt, out = timed(lambda: engine.generate(prompts, greedy(new_tokens)), next(model.parameters()).device)
        res[graphs] = (dt, [c.token_ids for c in out])
    same = sum(a == b for a, b in zip(res[True][1], res[False][1]))
    gen = len(prompts) * new_tokens
    print(f"\n== CUDA graphs: {gen / res[True][0]:.0f} tok/s on, {gen / res[False][0]:.0f} tok/s off "
          f"({res[False][0] / res[True][0]:.2f}x); tokens equal on {same}/{len(prompts)} prompts ==")
    return {"graphs_on_tok_s": gen / res[True][0], "graphs_off_tok_s": gen / res[False][0],
            "graphs_equal_prompts": same, "prompts": len(prompts)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="a TINY_CONFIGS name (random init) or a checkpoint directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-n", type=int, default=4)
    ap.add_argument("--loop-batch", type=int, default=16, help="static batch size of the padded loops")
    ap.add_argument("--repeats", type=int, default=2)
    # One thread by default: on a shared machine OpenMP threads spin-wait for each other, and with
    # more runnable threads than free cores the timings swing tenfold from run to run.
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the ratios here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    model = build_model(args.model, dtype=dtype, device=dev).eval()
    vocab = model.config.vocab_size
    print(f"model {args.model}: {model.num_params() / 1e6:.2f}M params, {dtype}, {dev}, "
          f"{torch.get_num_threads()} threads")
    engine_kw = dict(kv_cache_bytes=2**28, max_num_seqs=256)
    ragged = make_prompts(args.num_prompts, args.min_len, args.max_len, vocab, args.seed)
    group = [p for p in make_prompts(args.groups, 300, 400, vocab, args.seed + 1) for _ in range(args.group_n)]
    report = {"ragged": bench_workload(model, "ragged", ragged, args.new_tokens, args, engine_kw),
              "group": bench_workload(model, "group rollout", group, 32, args, engine_kw)}
    report["time_split"] = profile_split(model, ragged, args.new_tokens, engine_kw)
    if dev.type == "cuda":
        report["cuda_graphs"] = bench_graphs(model, ragged, args.new_tokens, engine_kw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
