"""Rollout-engine throughput, side by side with the two ways people generate without one.

Same model, same prompts, one run, greedy, every request generating exactly --new-tokens tokens
(no stop tokens):
  engine      rollout.Engine: paged KV cache, continuous batching, prefix cache
  contiguous  an HF-style loop written here: static batches of --loop-batch prompts, left-padded
              with an attention mask, one preallocated [B, Hkv, max_len, D] K/V buffer per layer,
              prefill then decode step by step, one batch after another (same weights, same ops)
  recompute   no KV cache: the whole forward again for every new token; too slow to run on all
              prompts, so it runs on a few prompts for a few tokens, and the full workload's time
              is extrapolated from a fit of step time against sequence length (printed as such)
The engine and the contiguous loop alternate --repeats times (the machine is shared and noisy);
each reports its best run and the ratio uses those. The loop's greedy tokens are checked against
the engine's, so both really compute the same thing.

Then the prefix cache: 8 rollouts of one 1K-token prompt, and how many prefill tokens the cache
skipped. On CUDA, also: engine decode throughput for a bigger bf16 model at several batch sizes
with CUDA graphs on and off, and the KV-read bandwidth that achieves as a fraction of --peak-gbps.

  python bench/engine.py                      # tiny random model, fp32, CPU (a few minutes on 2 cores)
  python bench/engine.py --model out/ckpt     # a checkpoint directory instead
  python bench/engine.py --gpu-only           # just the CUDA section (H100: --peak-gbps 3350)
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer, apply_rope, build_model  # noqa: E402
import rollout  # noqa: E402
from rollout import Engine, SamplingParams  # noqa: E402


def make_prompts(n, lo, hi, vocab, seed):
    """n prompts of uniform random length in [lo, hi] with random ids; 0..3 are left out because
    the tiny tokenizer keeps them for pad/unk/bos/eos."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (t,), generator=g).tolist() for t in lengths]


def greedy(n):
    # stop_token_ids=() is ignore-EOS: every request generates exactly n tokens
    return SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=())


def run_engine(model, prompts, new_tokens, **engine_kw):
    """-> (seconds, completions, engine). A fresh engine each time, so an earlier run's prefix cache
    cannot serve a later one."""
    engine = Engine(model, **engine_kw)
    t0 = time.perf_counter()
    out = engine.generate(prompts, greedy(new_tokens))
    return time.perf_counter() - t0, out, engine


# --------------------------------------------------------------------------------------------
# the contiguous-cache loop (what model.generate in HF transformers does with a static cache)

class ContiguousLoop:
    """Static batches, left padding, a preallocated contiguous K/V buffer per layer.

    It calls the model's own submodules, so the arithmetic per token is the same as the engine's;
    what differs is only how the KV cache and the batch are organised."""

    def __init__(self, model):
        self.m = model
        cfg = model.config
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    @torch.inference_mode()
    def generate(self, prompts, new_tokens, batch_size):
        self.prefill_s = self.decode_s = 0.0
        self.prefill_tokens = 0  # padding included: the loop computes it
        out = []
        for i in range(0, len(prompts), batch_size):
            out += self._batch(prompts[i:i + batch_size], new_tokens)
        return out

    def _batch(self, prompts, new_tokens):
        m, dev = self.m, self.m.embed_tokens.weight.device
        B, T0 = len(prompts), max(len(p) for p in prompts)
        L = T0 + new_tokens
        pad = torch.tensor([T0 - len(p) for p in prompts], device=dev)  # (B,) left padding per row
        ids = torch.zeros(B, T0, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, T0 - len(p):] = torch.tensor(p, device=dev)
        dtype = m.embed_tokens.weight.dtype
        self.k = [torch.zeros(B, self.nkv, L, self.hd, dtype=dtype, device=dev) for _ in m.layers]
        self.v = [torch.zeros(B, self.nkv, L, self.hd, dtype=dtype, device=dev) for _ in m.layers]
        real = torch.arange(L, device=dev)[None] >= pad[:, None]  # (B, L) slots holding real tokens
        # prefill: causal over real tokens; a padding query also sees itself, or its softmax row
        # would be all -inf, NaN would enter the cache, and 0 * NaN would poison the real rows
        causal = torch.ones(T0, T0, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(T0, dtype=torch.bool, device=dev)
        mask = (real[:, None, :T0] & causal) | eye  # (B, T0, T0)
        pos = (torch.arange(T0, device=dev)[None] - pad[:, None]).clamp(min=0)  # (B, T0)
        t0 = time.perf_counter()
        tok = self._forward(ids, pos, mask[:, None], 0).argmax(-1)  # (B,)
        t1 = time.perf_counter()
        out = [tok]
        for t in range(T0, L - 1):  # decode: one token per row, written at cache index t
            mask = real[:, None, None, :t + 1]  # (B, 1, 1, t+1)
            tok = self._forward(tok[:, None], (t - pad)[:, None], mask, t).argmax(-1)
            out.append(tok)
        out = torch.stack(out, 1).tolist()  # (B, new_tokens)
        self.prefill_s += t1 - t0
        self.decode_s += time.perf_counter() - t1
        self.prefill_tokens += B * T0
        return out

    def _forward(self, ids, pos, mask, start):
        """ids/pos (B, T) written at cache indices start..start+T-1 -> last position's logits (B, V)."""
        m, (B, T) = self.m, ids.shape
        angles = pos[..., None].float() * m.inv_freq  # (B, T, hd/2)
        cos = (angles.cos() * m.rope_attn_factor)[:, :, None, :]  # (B, T, 1, hd/2)
        sin = (angles.sin() * m.rope_attn_factor)[:, :, None, :]
        x = m.embed_tokens(ids)  # (B, T, C)
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(B, T, self.nh, self.hd)  # (B, T, nh, hd)
            k = a.k_proj(h).view(B, T, self.nkv, self.hd)  # (B, T, nkv, hd)
            v = a.v_proj(h).view(B, T, self.nkv, self.hd)
            if hasattr(a, "q_norm"):
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k[i][:, :, start:start + T] = k.transpose(1, 2)
            self.v[i][:, :, start:start + T] = v.transpose(1, 2)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), self.k[i][:, :, :start + T], self.v[i][:, :, :start + T],
                attn_mask=mask, enable_gqa=self.nkv != self.nh)  # (B, nh, T, hd)
            x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.lm_head(m.norm(x[:, -1]))  # only the last position is sampled, as in the engine


# --------------------------------------------------------------------------------------------
# full recompute: no cache at all

@torch.inference_mode()
def recompute_steps(model, prompt, new_tokens):
    """Greedy decode one prompt (batch of one: no padding to waste) re-running the whole forward
    each token. -> (tokens, [(sequence length, seconds)] per step)."""
    ids, steps = list(prompt), []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        logits = model.lm_head(model.hidden(torch.tensor([ids]))[0, -1])
        ids.append(int(logits.argmax()))
        steps.append((len(ids) - 1, time.perf_counter() - t0))
    return ids[len(prompt):], steps


def fit_step_time(steps):
    """Least-squares seconds(T) = a + b*T + c*T^2 over measured (T, seconds): the forward is linear
    in T (matmuls) plus quadratic (attention)."""
    T = torch.tensor([s[0] for s in steps], dtype=torch.float64)
    y = torch.tensor([s[1] for s in steps], dtype=torch.float64)
    X = torch.stack([torch.ones_like(T), T, T * T], 1)
    coef = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    return lambda t: max(coef[0] + coef[1] * t + coef[2] * t * t, 0.0)


# --------------------------------------------------------------------------------------------
# CPU section

def bench_cpu(model, args):
    vocab = model.config.vocab_size
    prompts = make_prompts(args.num_prompts, args.min_len, args.max_len, vocab, args.seed)
    n_new, n_gen = args.new_tokens, args.num_prompts * args.new_tokens
    print(f"\n== throughput: {len(prompts)} prompts of {args.min_len}..{args.max_len} tokens "
          f"(mean {statistics.mean(map(len, prompts)):.0f}), {n_new} new tokens each, greedy, ignore EOS ==")
    loop = ContiguousLoop(model)
    # warm-up: first-call allocations and kernel selection stay out of the timings
    run_engine(model, prompts[:4], 4, **args.engine_kw)
    loop.generate(prompts[:4], 4, args.loop_batch)

    times = {"engine": [], "contiguous": []}
    for r in range(args.repeats):  # alternate, so slow phases of a shared machine hit both
        dt, engine_out, engine = run_engine(model, prompts, n_new, **args.engine_kw)
        times["engine"].append(dt)
        t0 = time.perf_counter()
        loop_out = loop.generate(prompts, n_new, args.loop_batch)
        times["contiguous"].append(time.perf_counter() - t0)
        print(f"  run {r + 1}: engine {dt:.2f}s  contiguous {times['contiguous'][-1]:.2f}s")
    s = engine.stats
    print(f"  split (last run): engine prefill {s['prefill_tokens']} tokens in {s['prefill_s']:.2f}s, "
          f"decode {s['decode_tokens']} tokens in {s['decode_s']:.2f}s; contiguous prefill "
          f"{loop.prefill_tokens} tokens (padding included) in {loop.prefill_s:.2f}s, decode {loop.decode_s:.2f}s")

    same = sum(c.token_ids == o for c, o in zip(engine_out, loop_out))
    first = next((i for i, (c, o) in enumerate(zip(engine_out, loop_out)) if c.token_ids != o), None)
    print(f"  check: contiguous loop's greedy tokens equal the engine's on {same}/{len(prompts)} prompts"
          + ("" if first is None else f" (first differing prompt: {first}; fp32 near-ties can flip an argmax)"))

    # recompute: a few prompts spread over the length range, the longest included
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    picks = [order[round(j * (len(order) - 1) / max(args.recompute_prompts - 1, 1))]
             for j in range(args.recompute_prompts)]
    steps, agree, t_sub = [], 0, 0.0
    for i in picks:
        toks, st = recompute_steps(model, prompts[i], args.recompute_tokens)
        agree += toks == engine_out[i].token_ids[:args.recompute_tokens]
        steps += st
        t_sub += sum(x for _, x in st)
    step_time = fit_step_time(steps)
    t_full = sum(step_time(len(p) + j) for p in prompts for j in range(n_new))
    print(f"  check: recompute's greedy tokens equal the engine's on {agree}/{len(picks)} prompts "
          f"(first {args.recompute_tokens} tokens)")

    best = {k: min(v) for k, v in times.items()}
    measured = f"measured, best of {args.repeats}"
    rows = [("engine (paged KV, continuous batching)", n_gen / best["engine"], measured),
            (f"contiguous KV loop, static batches of {args.loop_batch}", n_gen / best["contiguous"], measured),
            ("full recompute, no KV cache", n_gen / t_full,
             f"EXTRAPOLATED: {len(picks)} prompts x {args.recompute_tokens} tokens measured "
             f"({len(picks) * args.recompute_tokens / t_sub:.1f} tok/s on that subset), "
             f"step time fitted a+bT+cT^2 over T and summed over the full workload")]
    print(f"\n  {'method':<44} {'gen tok/s':>10} {'engine is':>10}")  # engine tok/s / this row's
    for name, tps, how in rows:
        print(f"  {name:<44} {tps:>10.1f} {rows[0][1] / tps:>9.2f}x   {how}")
    ratio = rows[0][1] / rows[1][1]
    print(f"  target: engine >= 3x the contiguous loop -> {ratio:.2f}x {'MET' if ratio >= 3 else 'NOT MET'}")
    if args.profile:
        profile_engine(model, prompts, args)


PROFILE_PARTS = [  # (label, function names whose cumulative time it is); later parts are inside earlier ones
    ("engine.generate", ("generate",)),
    ("  model forward (in _run)", ("hidden",)),
    ("    decode attention (kernels)", ("decode_attention",)),
    ("    prefill attention (kernels)", ("prefill_attention",)),
    ("    store_kv (kernels)", ("store_kv",)),
    ("    linear layers (torch)", ("<built-in method torch._C._nn.linear>",)),
    ("  sample()", ("sample",)),
    ("  scheduler.schedule", ("schedule",)),
    ("  _postprocess", ("_postprocess",)),
]


def profile_engine(model, prompts, args):
    """cProfile one engine.generate and print where its time goes."""
    import cProfile
    import pstats

    engine = Engine(model, **args.engine_kw)
    prof = cProfile.Profile()
    prof.runcall(engine.generate, prompts, greedy(args.new_tokens))
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, ncalls, tottime, cumtime, callers)
    total = sum(v[3] for k, v in stats.items() if k[2] == "generate" and k[0].endswith("rollout.py"))
    print(f"\n  profile of one engine.generate (cProfile, {total:.2f}s):")
    for label, names in PROFILE_PARTS:
        # max, not sum: a dispatcher and the kernel it calls share a name (kernels/__init__.py)
        t = max([v[3] for k, v in stats.items() if k[2] in names and "site-packages" not in k[0]], default=0.0)
        print(f"  {label:<36} {t:>7.2f}s {t / total:>6.1%}")


def bench_prefix_cache(model, args):
    """8 rollouts of one prompt, as MemAgent's n rollouts per question see it."""
    n, P = args.rollouts, args.shared_len
    print(f"\n== prefix cache: {n} rollouts of one {P}-token prompt ==")
    shared = make_prompts(1, P, P, model.config.vocab_size, args.seed + 1)[0]
    tails = make_prompts(n, 16, 16, model.config.vocab_size, args.seed + 2)
    # A prompt's last token is always computed (its logits start generation), so with identical
    # prompts no cache can skip more than P - 1 tokens of each of the n - 1 later rollouts.
    cases = (("identical prompts", [shared] * n, (n - 1) * (P - 1)),
             ("shared prompt + 16 distinct tokens each", [shared + t for t in tails], (n - 1) * P))
    for name, prompts, best in cases:
        _, out, engine = run_engine(model, prompts, 8, **args.engine_kw)
        hits = engine.blocks.cache_hits
        assert hits == sum(c.num_cached_tokens for c in out)
        print(f"  {name}: {sum(map(len, prompts))} prompt tokens, {engine.stats['prefill_tokens']} prefilled, "
              f"{hits} served by the cache = {hits / (n * P):.3f} of the {n} x {P} shared tokens "
              f"(target {(n - 1) / n:.3f}; the most any cache can skip: {best / (n * P):.3f})")
        print(f"    per rollout (Completion.num_cached_tokens): {[c.num_cached_tokens for c in out]}")
    print(f"  (the cache shares whole {engine.block_size}-token blocks, and the block holding a prompt's last "
          f"token is recomputed)")


# --------------------------------------------------------------------------------------------
# CUDA section

GPU_CONFIGS = {  # random-init models shaped like real ones: the weights do not matter for speed
    "0.5b": ModelConfig(family="qwen2", vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                        num_kv_heads=2, head_dim=64, intermediate_size=4864, attention_bias=True,
                        max_position_embeddings=32768),  # Qwen2.5-0.5B
    "1b": ModelConfig(family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                      num_kv_heads=8, head_dim=64, intermediate_size=8192, rope_theta=500000.0,
                      max_position_embeddings=32768),  # Llama-3.2-1B
}


class DecodeMeter:
    """Times each decode step of an engine (and the sampling inside it), and counts the K/V bytes
    its attention reads. It wraps the engine's own methods; rollout.py itself is untouched."""

    def __init__(self, engine):
        self.engine, self.inner_run, self.inner_sample = engine, engine._run, rollout.sample
        cfg = engine.model.config
        # one cached token = K and V, every layer, every KV head
        self.bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.k_cache.element_size()
        self.steps = []  # (batch, K/V tokens read, seconds, seconds of it in sample())
        self.sample_s = 0.0
        engine._run = self._run
        rollout.sample = self._sample  # _run looks `sample` up in rollout's globals

    def close(self):
        rollout.sample = self.inner_sample

    def _sync(self):
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    def _sample(self, *a):
        self._sync()
        t0 = time.perf_counter()
        out = self.inner_sample(*a)
        self._sync()
        self.sample_s += time.perf_counter() - t0
        return out

    def _run(self, seqs, counts, is_prefill):
        if is_prefill:
            return self.inner_run(seqs, counts, is_prefill)
        self._sync()
        self.sample_s = 0.0
        t0 = time.perf_counter()
        out = self.inner_run(seqs, counts, is_prefill)  # ends in .tolist(): synchronised
        # the new token's K/V are written, then all num_computed + 1 positions are read
        read = sum(s.num_computed + 1 for s in seqs)
        self.steps.append((len(seqs), read, time.perf_counter() - t0, self.sample_s))
        return out


def random_model(cfg, dev):
    """A bf16 model with random weights, initialised on the device (init_weights draws on the CPU:
    slow for a billion parameters)."""
    with torch.device(dev):
        model = Transformer(cfg)
    model = model.to(torch.bfloat16).eval()
    g = torch.Generator(dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0, 0.02, generator=g)
    return model


def bench_gpu(args, cfg, dev):
    model = random_model(cfg, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"\n== CUDA: {name}, {args.gpu_config} model ({model.num_params() / 1e6:.0f}M params, bf16), "
          f"prompts of {args.gpu_prompt_len} tokens, {args.gpu_new_tokens} new tokens, greedy ==")
    print(f"  KV-read bandwidth = bytes of K/V read per decode step / step time, where bytes = "
          f"(sum over the batch of cached positions) x layers x 2 (K,V) x kv_heads x head_dim x 2 bytes; "
          f"peak {args.peak_gbps:.0f} GB/s (--peak-gbps)")
    print(f"  {'batch':>5} {'graphs':>6} {'decode tok/s':>12} {'step ms':>8} {'sample ms':>9} {'KV GB/s':>8} "
          f"{'of peak':>7} {'KV+weights':>10}")
    L = args.gpu_prompt_len + args.gpu_new_tokens
    for B in args.gpu_batches:
        prompts = make_prompts(B, args.gpu_prompt_len, args.gpu_prompt_len, cfg.vocab_size, args.seed + B)
        blocks = B * (-(-(L + 1) // 16)) + 64  # what the batch needs, so no preemption
        for graphs in (True, False):
            try:
                engine = Engine(model, num_blocks=blocks, block_size=16, max_num_seqs=B, cuda_graphs=graphs)
                # warm-up on the same engine: Triton compiles and CUDA graph captures are not timed
                engine.generate(prompts, greedy(4))
                meter = DecodeMeter(engine)
                try:
                    engine.generate(prompts, greedy(args.gpu_new_tokens))
                finally:
                    meter.close()
            except torch.OutOfMemoryError:
                print(f"  {B:>5} {'on' if graphs else 'off':>6}  out of memory")
                break
            full = [st for st in meter.steps if st[0] == B]  # the steady state: the whole batch decoding
            secs = sum(st[2] for st in full)
            kv_bytes = sum(st[1] for st in full) * meter.bytes_per_token
            gbps = kv_bytes / secs / 1e9
            all_gbps = (kv_bytes + len(full) * weight_bytes) / secs / 1e9
            print(f"  {B:>5} {'on' if graphs else 'off':>6} {B * len(full) / secs:>12.0f} "
                  f"{secs / len(full) * 1e3:>8.2f} {sum(st[3] for st in full) / len(full) * 1e3:>9.2f} "
                  f"{gbps:>8.0f} {gbps / args.peak_gbps:>7.1%} {all_gbps / args.peak_gbps:>10.1%}")
            del engine, meter
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print("  (a step is the whole decode step: weights, attention, sampling and host work, so the KV share of "
          "peak is a lower bound for the attention kernel; 'KV+weights' adds the weight bytes each step reads)")


def bench_decode_kernel(cfg, args):
    """The Triton split-KV decode kernel alone: its own KV-read bandwidth, timed with CUDA events."""
    import kernels

    dev, bs = torch.device("cuda"), 16
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    print(f"\n  decode attention kernel alone (one layer, Hq={Hq}, Hkv={Hkv}, D={D}, bf16, block 16, pages "
          f"scattered at random; GB/s = K and V bytes of every context position / kernel time):")
    print(f"  {'batch':>5} {'context':>7} {'us':>8} {'GB/s':>8} {'of peak':>7}")
    for B, ctx in ((64, 2048), (256, 2048), (64, 8192), (256, 8192)):
        nb = B * ctx // bs
        try:
            kc = torch.randn(nb, bs, Hkv, D, device=dev, dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
        except torch.OutOfMemoryError:
            print(f"  {B:>5} {ctx:>7}  out of memory")
            continue
        tables = torch.randperm(nb, device=dev, dtype=torch.int32).view(B, ctx // bs)  # scattered pages
        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16)

        def call():
            return kernels.decode_attention(q, kc, vc, lens, tables, D ** -0.5, backend="triton")
        call()  # compile
        # replay a captured call: a ~20 us kernel would otherwise be timed as launch overhead
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 20
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        s = start.elapsed_time(end) / 1e3 / n
        gbps = 2 * B * ctx * Hkv * D * 2 / s / 1e9
        print(f"  {B:>5} {ctx:>7} {s * 1e6:>8.1f} {gbps:>8.0f} {gbps / args.peak_gbps:>7.1%}")
        del kc, vc, graph
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="a TINY_CONFIGS name (random init) or a checkpoint directory")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--loop-batch", type=int, default=16, help="static batch size of the contiguous loop")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of engine and loop")
    ap.add_argument("--recompute-prompts", type=int, default=4)
    ap.add_argument("--recompute-tokens", type=int, default=6)
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--shared-len", type=int, default=1024)
    # One thread by default: on a shared machine OpenMP threads spin-wait for each other, and with
    # more runnable threads than free cores the timings swing tenfold from run to run.
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also cProfile one engine.generate")
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU sections")
    ap.add_argument("--gpu-config", default="0.5b", choices=sorted(GPU_CONFIGS))
    ap.add_argument("--gpu-batches", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--gpu-prompt-len", type=int, default=512)
    ap.add_argument("--gpu-new-tokens", type=int, default=256)
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="HBM peak, GB/s (H100 SXM: 3350)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # the engine's KV cache: 256 MiB is ample for the tiny model (it holds ~4000 blocks of 16)
    args.engine_kw = dict(kv_cache_bytes=2**28)

    if not args.gpu_only:
        model = build_model(args.model, dtype=torch.float32).eval()
        print(f"model {args.model}: {model.num_params() / 1e6:.2f}M params, fp32, CPU, "
              f"{torch.get_num_threads()} threads")
        bench_cpu(model, args)
        bench_prefix_cache(model, args)
    if torch.cuda.is_available():
        bench_gpu(args, GPU_CONFIGS[args.gpu_config], torch.device("cuda"))
        bench_decode_kernel(GPU_CONFIGS[args.gpu_config], args)
    else:
        print("\n== CUDA: skipped (no GPU here); on a GPU machine the same script reports engine decode "
              "throughput with CUDA graphs on/off and KV-read bandwidth vs --peak-gbps ==")


if __name__ == "__main__":
    main()
