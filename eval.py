"""Length sweeps: run a model as a memory agent (or on one long prompt) over tasks x lengths.

    python eval.py --model runs/tiny --tasks niah_single,vt,hotpotqa:hotpot_dev.json \\
        --lengths 8k,32k,128k --samples 64 --out tiny.json --plot tiny.png
    python eval.py --from tiny.json qwen7b.json --plot overlay.png --markdown   # nothing is run

Every task x length cell runs its samples once (greedy by default) and reports the mean score (the
task's scorer on the last \\boxed{} of the answer), the mean document tokens read, the wall time, and
document tokens read per second. A failing sample scores 0, keeps its error, and the run goes on.
Lengths are tokens of the model's tokenizer ("8k", "128k", "3.5m") for the synthetic tasks
(tasks.TASKS). For hotpotqa:FILE they are numbers of documents: a plain number is a document count
(50, 100, 200, ...) and a k/m length converts at the paper's 200 documents per 28K tokens (7k -> 50,
28k -> 200, 3.5m -> 25600). A jsonl:FILE task is the file's lines and ignores --lengths.

--mode direct puts the whole document in one prompt, cut in the middle to fit the model's window
(the paper's baselines); tokens read are then the document tokens that fit.
"""
import argparse
import json
import os
import time
from dataclasses import replace

import torch

from memory_agent import MemoryAgent, document_tokens, extract_boxed, load_template
from model import build_model
from rollout import Engine, SamplingParams
from tasks import TASKS, load_hotpotqa, load_jsonl, make_samples, parse_length, score
from tokenizer import load_tokenizer

HEADER = (f"{'task':<16} {'length':>9} {'samples':>7} {'acc':>6} {'tokens read':>11} {'seconds':>8} {'tok/s':>8} "
          f"{'errors':>6}")


def hotpotqa_docs(length):
    """A HotpotQA length in documents: '200' is 200 documents, '28k' converts to 200."""
    n = parse_length(length)
    return n if str(length).strip().isdigit() else max(1, round(n * 200 / 28672))


def plan(tasks, lengths):
    """The (name, kind, file, length) cells of a sweep; raises ValueError on any bad argument, before work."""
    tokens = [parse_length(l) for l in lengths]
    cells = []
    for spec in tasks:
        kind, _, path = spec.partition(":")
        if kind in TASKS and not path:
            cells += [(kind, kind, None, n) for n in tokens]
        elif kind in ("hotpotqa", "jsonl") and path:
            if not os.path.isfile(path):
                raise ValueError(f"task {spec!r}: no such file {path!r}")
            if kind == "hotpotqa":
                cells += [("hotpotqa", kind, path, hotpotqa_docs(l)) for l in lengths]
            else:
                cells.append((os.path.splitext(os.path.basename(path))[0], kind, path, None))
        else:
            raise ValueError(f"unknown task {spec!r}: expected one of {', '.join(TASKS)}, hotpotqa:FILE or jsonl:FILE")
    return cells


def load_samples(kind, path, length, tokenizer, num, seed):
    if kind == "hotpotqa":
        return load_hotpotqa(path, length, num_samples=num, seed=seed)
    if kind == "jsonl":
        return load_jsonl(path)[:num]
    return make_samples(kind, length, tokenizer, num, seed)


def run_agent(agent, samples, params):
    return [dict(answer_text=t.answer_text, answer=t.answer, tokens_read=t.tokens_read,
                 doc_tokens=s.meta.get("doc_tokens") or t.tokens_read, error=t.error)
            for s, t in zip(samples, agent.run(samples, params=params))]


def run_direct(agent, engine, samples, params, max_prompt_tokens):
    outs, prompts, per_prompt = [], [], []
    for i, s in enumerate(samples):
        try:
            prompt = agent.direct_prompt(s, max_prompt_tokens)
            frame = len(agent.direct_prompt(replace(s, document=""), max_prompt_tokens))  # all but the document
            doc = s.meta.get("doc_tokens") or sum(map(len, document_tokens(s.document, agent.tok)))
        except ValueError as e:  # a question longer than the window, an unreadable file: this sample fails
            outs.append(dict(answer_text=None, answer=None, tokens_read=0, doc_tokens=0, error=str(e)))
            continue
        outs.append(dict(tokens_read=len(prompt) - frame, doc_tokens=doc, error=None))
        prompts.append(prompt)
        per_prompt.append(replace(params, seed=hash((params.seed, i)) & 0x7FFFFFFF))  # as the agent seeds its turns
    completions = iter(engine.generate(prompts, per_prompt))
    for o in outs:
        if o["error"] is None:
            c = next(completions)
            text = agent.tok.decode(c.token_ids)  # special tokens (the stop token) dropped
            o.update(answer_text=text, answer=extract_boxed(text), error=c.error)
    return outs


def evaluate(model, tokenizer, tasks, lengths, samples, mode="agent", chunk_tokens=5000, memory_tokens=1024,
             answer_tokens=1024, question_tokens=1024, template="default", temperature=0.0, seed=0,
             engine=None, progress=False) -> dict:
    """Run every task x length cell -> {"config", "results" (a row per cell), "predictions" (per sample)}.
    `engine` lets a caller (train.py) reuse its own; with `progress`, bars and a table row per cell."""
    if mode not in ("agent", "direct"):
        raise ValueError(f"mode must be 'agent' or 'direct', got {mode!r}")
    cells = plan(tasks, lengths)
    if engine is None:  # off CUDA the cache is a fixed size: room for every sample at full length, <= 1 GiB
        cfg, p = model.config, next(model.parameters())
        token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * p.element_size()
        engine = Engine(model, kv_cache_bytes=min(2**30, samples * (cfg.max_position_embeddings + 16) * token_bytes),
                        seed=seed, progress=progress)
    if mode == "agent":
        agent = MemoryAgent(engine, tokenizer, chunk_tokens, memory_tokens, answer_tokens, question_tokens,
                            template, keep_conversations=False, progress=progress)
        params = SamplingParams(temperature=temperature, seed=seed)
    else:  # the agent only builds the prompts: the update turn's budget does not apply
        agent = MemoryAgent(None, tokenizer, template=template)
        max_prompt = engine.max_len - answer_tokens
        if max_prompt <= 0:
            raise ValueError(f"answer_tokens={answer_tokens} leaves no room in the model's {engine.max_len} positions")
        params = SamplingParams(temperature=temperature, max_new_tokens=answer_tokens,
                                stop_token_ids=tuple(tokenizer.stop_ids), seed=seed)
    config = dict(tasks=list(tasks), lengths=[str(l) for l in lengths], samples=samples, mode=mode,
                  chunk_tokens=chunk_tokens, memory_tokens=memory_tokens, answer_tokens=answer_tokens,
                  question_tokens=question_tokens, template=template, temperature=temperature, seed=seed)
    results, predictions = [], []
    if progress:
        print(HEADER, flush=True)
    for name, kind, path, length in cells:
        cell = load_samples(kind, path, length, tokenizer, samples, seed)
        t0 = time.perf_counter()
        outs = (run_agent(agent, cell, params) if mode == "agent"
                else run_direct(agent, engine, cell, params, max_prompt))
        seconds = time.perf_counter() - t0
        preds = [dict(task=name, length=length, id=s.id, answer=o["answer"], answers=s.answers,
                      score=0.0 if o["error"] else score(s, o["answer"]), error=o["error"],
                      answer_text=o["answer_text"], tokens_read=o["tokens_read"]) for s, o in zip(cell, outs)]
        n, read = max(len(preds), 1), sum(p["tokens_read"] for p in preds)
        row = dict(task=name, length=length, mode=mode, samples=len(preds), accuracy=sum(p["score"] for p in preds) / n,
                   tokens_read=read / n, doc_tokens=sum(o["doc_tokens"] for o in outs) / n, seconds=seconds,
                   tokens_per_s=read / max(seconds, 1e-9), errors=sum(p["error"] is not None for p in preds))
        if progress:
            print(format_row(row), flush=True)
        results.append(row)
        predictions += preds
    return dict(config=config, results=results, predictions=predictions)


# --------------------------------------------------------------------------------------------
# reports: table rows, markdown, plot

def length_label(task, length):
    if length is None:
        return "all"
    if task == "hotpotqa":
        return f"{length} docs"
    if length % 1024:
        return str(length)
    return f"{length / 2**20:g}m" if length >= 2**20 else f"{length // 1024}k"


def format_row(r):
    return (f"{r['task']:<16} {length_label(r['task'], r['length']):>9} {r['samples']:>7} {100 * r['accuracy']:>6.1f} "
            f"{r['tokens_read']:>11.0f} {r['seconds']:>8.1f} {r['tokens_per_s']:>8.0f} {r['errors']:>6}")


def markdown(runs):
    """One table per task: a row per (run, mode), a column per length, accuracy x100."""
    out = []
    for task in dict.fromkeys(r["task"] for _, res in runs for r in res["results"]):
        cells = {(f"{label} ({r['mode']})", r["length"]): f"{100 * r['accuracy']:.2f}"
                 for label, res in runs for r in res["results"] if r["task"] == task}
        lengths = sorted({l for _, l in cells}, key=lambda l: l or 0)
        out += [f"**{task}** (accuracy x100)", "",
                "| run | " + " | ".join(length_label(task, l) for l in lengths) + " |",
                "|---" * (len(lengths) + 1) + "|"]
        out += [f"| {name} | " + " | ".join(cells.get((name, l), "—") for l in lengths) + " |"
                for name in dict.fromkeys(name for name, _ in cells)]
        out.append("")
    return "\n".join(out)


def plot(runs, path):
    """Accuracy vs document tokens (log x), a line per (run, task, mode). False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path} (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, res in runs:
        lines = {}
        for r in res["results"]:
            lines.setdefault((r["task"], r["mode"]), []).append(r)
        for (task, mode), rows in lines.items():
            rows.sort(key=lambda r: r["doc_tokens"])
            ax.plot([r["doc_tokens"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o",
                    label=f"{task} ({mode})" if len(runs) == 1 else f"{label}: {task} ({mode})")
    ax.set(xscale="log", xlabel="document tokens", ylabel="accuracy (x100)", ylim=(-2, 102))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a model as a memory agent over tasks x lengths.")
    p.add_argument("--model", help="HF checkpoint directory (or a tiny config name: random weights)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the model directory)")
    p.add_argument("--tasks", default="niah_single", help="comma-separated: task names, hotpotqa:FILE, jsonl:FILE")
    p.add_argument("--lengths", default="8k", help="comma-separated: tokens (8k,128k); documents for hotpotqa")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--mode", choices=("agent", "direct"), default="agent")
    for name, default in (("chunk", 5000), ("memory", 1024), ("answer", 1024), ("question", 1024)):
        p.add_argument(f"--{name}-tokens", type=int, default=default)
    p.add_argument("--template", default="default", help="default, section_first, or a JSON file")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--label", help="the run's name in plots and tables (default: the model's)")
    p.add_argument("--out", help="write results and predictions to this JSON file")
    p.add_argument("--plot", help="write accuracy vs length to this PNG (needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print markdown tables of the results")
    p.add_argument("--from", dest="sources", nargs="+", metavar="JSON", help="report these results; run nothing")
    args = p.parse_args(argv)

    if args.sources and args.model:
        p.error("--from reports saved results: give it without --model")
    if args.sources:
        runs = []
        for f in args.sources:
            try:
                with open(f) as fh:
                    res = json.load(fh)
            except (OSError, json.JSONDecodeError) as e:
                p.error(f"{f}: cannot read results ({e})")
            runs.append((res["config"].get("label") or os.path.splitext(os.path.basename(f))[0], res))
    elif not args.model:
        p.error("--model is required (or --from to report saved results)")
    else:
        tasks, lengths = args.tasks.split(","), args.lengths.split(",")
        try:  # every argument is checked before the model is loaded
            plan(tasks, lengths)
            load_template(args.template)
            tokenizer = load_tokenizer(args.tokenizer or args.model)
        except (ValueError, OSError) as e:
            p.error(str(e))
        dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
        model = build_model(args.model, dtype=getattr(torch, dtype), device=args.device)
        res = evaluate(model, tokenizer, tasks, lengths, args.samples, args.mode, args.chunk_tokens,
                       args.memory_tokens, args.answer_tokens, args.question_tokens, args.template,
                       args.temperature, args.seed, progress=True)
        res["config"].update(model=args.model, tokenizer=args.tokenizer or args.model, dtype=dtype,
                             device=args.device, label=args.label)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        runs = [(args.label or os.path.basename(os.path.normpath(args.model)), res)]
    if args.plot:
        plot(runs, args.plot)
    if args.markdown:
        print(markdown(runs))


if __name__ == "__main__":
    main()
