"""Where the shipped agent's engine time goes on CPU, and what compiling its decode step could win.

  OMP_NUM_THREADS=1 python bench/engine_overhead.py                # checkpoints/tiny, 1 thread
  OMP_NUM_THREADS=1 python bench/engine_overhead.py --no-compile --no-rl

1. steps   decode steps of the eager engine by batch size (300-token prompts, greedy and temperature
           1): ms per step, split into building the inputs, the forward, and sampling.
2. compile the decode forward at static shapes (a batch bucket, page tables padded to --pages pages),
           eager and under torch.compile: ms per step, compile time (cold: an empty inductor cache;
           warm: a second process reading inductor's on-disk cache) and whether the logits are
           bitwise equal. That forward does not write the KV cache: under torch.compile an in-place
           write into the cache is functionalized into a copy of the whole cache every step, so this
           is the best case for compiling, not a path the engine could take as it is.
3. cell    one evaluation cell of the shipped agent (niah_single at 8K, 16 questions, greedy), its
           engine time split by step kind (decode-only, mixed decode + prefill, prefill-only), and
           the most a faster decode step can give it: the cell's time if decode steps cost nothing.
4. rl      one RL step of the README's main job (train.py --config configs/tiny.json, 2 ranks, its
           second step): rollout, update and step seconds from its metrics.
Times are process CPU seconds (the machine is shared: wall time counts other people's work too).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rollout  # noqa: E402
from model import build_model  # noqa: E402
from rollout import Engine, SamplingParams  # noqa: E402


def cpu_ms(fn, reps):
    fn()
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return 1e3 * (time.process_time() - t0) / reps


def decode_engine(model, B, temperature, prompt_len=300):
    """An engine whose next step decodes B sequences (their prompts already prefilled)."""
    g = torch.Generator().manual_seed(B)
    engine = Engine(model, num_blocks=B * (prompt_len // 16 + 8) + 8)
    params = SamplingParams(temperature=temperature, max_new_tokens=10**6, stop_token_ids=())
    for _ in range(B):
        engine.add_request(torch.randint(4, model.config.vocab_size, (prompt_len,), generator=g).tolist(), params)
    while any(not s.output for s in engine.requests.values()):  # every prompt prefilled
        engine.step()
    return engine


def step_split(model, batch_sizes, reps):
    print("decode steps of the eager engine, ms per step (CPU time): inputs + forward + sampling = step")
    for B in batch_sizes:
        for temperature in (0.0, 1.0):
            engine = decode_engine(model, B, temperature)
            runner, (batch, _) = engine.runner, engine.scheduler.schedule()
            seqs = batch.seqs
            args = ([s.params.temperature for s in seqs], [s.params.top_p for s in seqs],
                    [s.params.top_k for s in seqs], [s.seed for s in seqs], [len(s) for s in seqs])
            with torch.inference_mode():
                ids, pos, kv, rows = runner._prepare(batch)
                logits = model(ids, pos, attn=kv, logits_rows=rows)[0]
                step = cpu_ms(lambda: runner.run(batch), reps)  # rewrites the same K/V: no state changes
                prep = cpu_ms(lambda: runner._prepare(batch), reps)
                samp = cpu_ms(lambda: rollout.sample(logits, *args), reps)
            fwd = step - prep - samp
            print(f"  B={B:<3} T={temperature:<3} {prep:6.3f} + {fwd:6.3f} + {samp:6.3f} = {prep + fwd + samp:6.3f}")


class StaticDecodeKV:
    """Decode attention at static shapes: every row reads all `pages` pages of its table (padding masked),
    one SDPA for the batch; the new K/V are not written (see the docstring)."""

    def __init__(self, k_cache, v_cache, context_lens, block_tables):
        self.k_cache, self.v_cache, self.tables = k_cache, v_cache, block_tables
        keys = block_tables.shape[1] * k_cache.shape[2]
        self.mask = (torch.arange(keys) < context_lens[:, None])[:, None, None, :]  # (B, 1, 1, keys)

    def attend(self, layer, q, k, v):  # q (1, B, Hq, D)
        q = q[0]
        B, Hq, D = q.shape
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        Hkv = kc.shape[2]
        keys = kc[self.tables].flatten(1, 2).transpose(1, 2)  # (B, Hkv, pages * block, D)
        values = vc[self.tables].flatten(1, 2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.view(B, Hkv, Hq // Hkv, D), keys, values, attn_mask=self.mask,
                                             scale=D ** -0.5)
        return out.reshape(1, B, Hq, D)


def compile_case(model, B, pages):
    """-> (eager ms, compiled ms, compile seconds, bitwise equal) for one static decode shape."""
    engine = decode_engine(model, B, 0.0)
    kc, vc = engine.runner.k_cache, engine.runner.v_cache
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (1, B), generator=g)
    pos = torch.full((1, B), 300)
    ctx = torch.full((B,), 301, dtype=torch.int32)
    tables = torch.arange(B * pages, dtype=torch.int32).view(B, pages) % kc.shape[1]

    def forward(ids, pos, ctx, tables):
        return model(ids, pos, attn=StaticDecodeKV(kc, vc, ctx, tables))[0]

    compiled = torch.compile(forward, dynamic=False)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = compiled(ids, pos, ctx, tables)
        seconds = time.perf_counter() - t0
        same = torch.equal(out, forward(ids, pos, ctx, tables))
        eager = cpu_ms(lambda: forward(ids, pos, ctx, tables), 200)
        fast = cpu_ms(lambda: compiled(ids, pos, ctx, tables), 200)
    return eager, fast, seconds, same


def compile_bound(model, batch_sizes, pages, cache_dir):
    print(f"compile's best case: static decode forward, tables of {pages} pages, ms per forward (CPU time);")
    print(f"  compile seconds are wall time; inductor cache {cache_dir}")
    for B in batch_sizes:
        eager, fast, seconds, same = compile_case(model, B, pages)
        print(f"  B={B:<3} eager {eager:6.3f}  compiled {fast:6.3f}  ({eager / fast:.2f}x)  "
              f"compile {seconds:5.1f} s  bitwise equal: {same}", flush=True)


def eval_cell(model, checkpoint):
    import eval as ev
    from memory_agent import AgentConfig
    from tokenizer import load_tokenizer

    kinds = {"decode-only": [0.0, 0], "mixed": [0.0, 0], "prefill-only": [0.0, 0]}
    run = rollout.ModelRunner.run

    def timed(runner, batch):
        t0 = time.process_time()
        out = run(runner, batch)
        kind = ("decode-only" if batch.num_decode == len(batch.seqs) else
                "prefill-only" if batch.num_decode == 0 else "mixed")
        kinds[kind][0] += time.process_time() - t0
        kinds[kind][1] += 1
        return out

    with open(os.path.join(checkpoint, "agent.json")) as f:
        agent = AgentConfig(**json.load(f))
    rollout.ModelRunner.run = timed
    try:
        t0 = time.process_time()
        res = ev.evaluate(model, load_tokenizer(checkpoint), ["niah_single"], ["8k"], 16, agent)
        total = time.process_time() - t0
    finally:
        rollout.ModelRunner.run = run
    row = res["results"][0]
    print(f"evaluation cell ({checkpoint}, niah_single 8K, 16 questions): {total:.2f} s CPU, "
          f"{round(row['accuracy'] * row['samples'])} of {row['samples']} right")
    for kind, (seconds, steps) in kinds.items():
        print(f"  {kind:<13} {steps:5d} steps {seconds:6.2f} s ({1e3 * seconds / max(steps, 1):.2f} ms a step)")
    rest = total - kinds["decode-only"][0]
    print(f"  with decode-only steps free the cell would take {rest:.2f} s: at most {total / rest:.2f}x")


def rl_step():
    with tempfile.TemporaryDirectory() as out:
        cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "train.py", "--config", "configs/tiny.json",
               "--steps", "2", "--checkpoint_every", "1000", "--out_dir", out]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(os.path.join(out, "metrics.jsonl")) as f:
            m = [json.loads(line) for line in f][-1]
    print(f"one RL step of configs/tiny.json (its step 2, rank 0, wall): rollout {m['rollout_s']:.2f} s, "
          f"update {m['update_s']:.2f} s, step {m['step_s']:.2f} s; with free rollouts at most "
          f"{m['step_s'] / (m['step_s'] - m['rollout_s']):.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "checkpoints/tiny"))
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--compile-batch-sizes", default="1,16", help="batch sizes of the static compiled forward")
    p.add_argument("--pages", type=int, default=24, help="table width of the static compiled forward")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-rl", action="store_true")
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)  # the warm-cache process
    args = p.parse_args()
    torch.set_num_threads(1)
    model = build_model(args.model, dtype=torch.float32).eval()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.compile_only:
        compiled_sizes = [int(b) for b in args.compile_batch_sizes.split(",")]
        return compile_bound(model, compiled_sizes, args.pages, os.environ["TORCHINDUCTOR_CACHE_DIR"])
    print(f"{args.model}, torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    step_split(model, sizes, args.reps)
    if not args.no_compile:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            again = [sys.executable, os.path.abspath(__file__), "--compile-only", "--model", args.model,
                     "--compile-batch-sizes", args.compile_batch_sizes, "--pages", str(args.pages)]
            print("cold:", flush=True)
            subprocess.run(again, env=env, check=True)
            print("warm (a new process, the same cache):", flush=True)
            subprocess.run(again, env=env, check=True)
    eval_cell(model, args.model)
    if not args.no_rl:
        rl_step()


if __name__ == "__main__":
    main()
