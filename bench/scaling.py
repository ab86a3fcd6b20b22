"""Linear time and constant memory: the memory agent reads niah_single documents of growing length.

    python bench/scaling.py                              # random-init tiny model, 16/64/256 chunks
    python bench/scaling.py --model runs/tiny --chunks 16,64,256,1024

Each length runs in a fresh process, so the peak RSS (ru_maxrss) it reports is that length's own;
each process warms up on a short document first, untimed. Time per document token should stay flat
(linear cost) and peak RSS should not grow (the agent holds one chunk and one memory at a time).
Wall and CPU time are both shown (on an idle machine they agree); --repeats runs rounds over all
lengths and keeps each length's fastest run, filtering out other load on a shared machine.
Generation stops only at the caps, so every turn writes exactly --memory-tokens whatever the model
emits: the cost measured is the agent's and the engine's, not a random model's luck with EOS.

Then the prefix cache: one question rolled out n=4 times at temperature 1, with the default and the
section_first templates, counting the prefill tokens computed and those served from cached KV blocks.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory_agent import TEMPLATES, AgentConfig, MemoryAgent  # noqa: E402
from model import build_model  # noqa: E402
from rollout import Engine, SamplingParams  # noqa: E402
from tasks import RULER_NIAH, TASKS, document_text, make_samples  # noqa: E402
from tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402

NO_STOP = (-1,)  # a stop id no token has: turns end at their length caps


class Words:
    """Fits documents to a length in words: enough to make training text for the tokenizer."""

    def encode(self, text):
        return text.split()


def train_tokenizer(path, vocab_size):
    lines = [t for template in TEMPLATES.values() for t in template.values()]
    for task in (t for t in TASKS if t not in RULER_NIAH):  # RULER's variants: the same words, some need a file
        for seed in range(4):
            lines += document_text(make_samples(task, 2000, Words(), 1, seed=seed)[0]).split(". ")
    return train_sentencepiece(lines, vocab_size, path)


def build_agent(args, n=1, template="default"):
    """The model, an engine whose KV cache is sized by the turn, not the document, and the agent."""
    tok = load_tokenizer(args.tokenizer)
    model = build_model(args.model, dtype=torch.float32, device=args.device)
    turn_blocks = -(-(args.chunk_tokens + 2 * args.memory_tokens + args.question_tokens + 512) // 16)
    engine = Engine(model, num_blocks=2 * n * turn_blocks, block_size=16)
    agent = MemoryAgent(engine, tok, AgentConfig(args.chunk_tokens, args.memory_tokens, args.answer_tokens,
                                                 args.question_tokens, template), keep_conversations=False)
    return engine, agent, tok


def child(args):
    """Read one document of args.child chunks; print one JSON line."""
    engine, agent, tok = build_agent(args)
    greedy = SamplingParams(temperature=0.0, stop_token_ids=NO_STOP, seed=0)
    agent.run(make_samples("niah_single", 4 * args.chunk_tokens, tok, 1, seed=1), params=greedy)  # warm-up
    sample = make_samples("niah_single", args.child * args.chunk_tokens, tok, 1)[0]
    t0, c0 = time.perf_counter(), time.process_time()
    traj = agent.run([sample], params=greedy)[0]
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert traj.error is None, traj.error
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(dict(chunks=args.child, tokens=traj.tokens_read, turns=traj.turns, seconds=seconds, cpu=cpu,
                          generated=traj.tokens_generated, rss_mb=rss_mb)))


def scaling(args):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("model", "tokenizer", "device", "threads", "chunk_tokens", "memory_tokens", "answer_tokens",
                      "question_tokens")]
    lengths = [int(c) for c in args.chunks.split(",")]
    runs = {c: [] for c in lengths}
    for _ in range(args.repeats):  # rounds over all lengths: a busy spell hits one round, not one length
        for chunks in lengths:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={chunks}", *flags],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"the {chunks}-chunk run failed:\n{proc.stderr}")
            runs[chunks].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # the least disturbed repeat of each length: the fastest time, the highest memory
    rows = [dict(runs[c][0], seconds=min(r["seconds"] for r in runs[c]), cpu=min(r["cpu"] for r in runs[c]),
                 rss_mb=max(r["rss_mb"] for r in runs[c])) for c in lengths]
    print(f"\nreading niah_single: chunk {args.chunk_tokens}, memory {args.memory_tokens}, answer "
          f"{args.answer_tokens} tokens, greedy, one document per fresh process, best of {args.repeats}, "
          f"{args.threads} thread(s)")
    print(f"{'chunks':>7} {'doc tokens':>10} {'turns':>6} {'new/turn':>8} {'seconds':>8} {'s/1K tok':>9} {'ratio':>6} "
          f"{'CPU s/1K':>9} {'ratio':>6} {'peak RSS MB':>11} {'ratio':>6}")
    base = rows[0]
    for r in rows:
        wall, cpu = 1000 * r["seconds"] / r["tokens"], 1000 * r["cpu"] / r["tokens"]
        print(f"{r['chunks']:>7} {r['tokens']:>10} {r['turns']:>6} {r['generated'] / r['turns']:>8.1f} "
              f"{r['seconds']:>8.1f} {wall:>9.3f} {wall / (1000 * base['seconds'] / base['tokens']):>6.2f} "
              f"{cpu:>9.3f} {cpu / (1000 * base['cpu'] / base['tokens']):>6.2f} "
              f"{r['rss_mb']:>11.0f} {r['rss_mb'] / base['rss_mb']:>6.2f}")


def prefix_cache(args, n=4, chunks=16):
    print(f"\nprefix cache: one question, n={n} rollouts at temperature 1, {chunks} chunks of {args.chunk_tokens}")
    print(f"{'template':>14} {'prompt tokens':>13} {'computed':>9} {'from cache':>10} {'saved':>6}")
    for template in ("default", "section_first"):
        engine, agent, tok = build_agent(args, n, template)
        sample = make_samples("niah_single", chunks * args.chunk_tokens, tok, 1)[0]
        trajs = agent.run([sample], n=n, params=SamplingParams(temperature=1.0, stop_token_ids=NO_STOP, seed=0))
        assert all(t.error is None for t in trajs)
        computed, hits = engine.stats["prefill_tokens"], engine.blocks.cache_hits
        print(f"{template:>14} {computed + hits:>13} {computed:>9} {hits:>10} {hits / (computed + hits):>6.1%}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a checkpoint directory or a tiny config name (random weights)")
    p.add_argument("--tokenizer", help="default: the model directory; for a tiny config, one trained here")
    p.add_argument("--chunks", default="16,64,256", help="document lengths in chunks")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--memory-tokens", type=int, default=64)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--question-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="runs of each length (the fastest is shown)")
    p.add_argument("--device", default="cpu")
    # a tiny model's ops are too small to share between threads: one thread is faster and steadier
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer is None:
            if os.path.isdir(args.model):
                args.tokenizer = args.model
            else:
                args.tokenizer = os.path.join(tmp, "tokenizer.model")
                train_tokenizer(args.tokenizer, build_model(args.model).config.vocab_size)
        scaling(args)
        prefix_cache(args)


if __name__ == "__main__":
    main()
