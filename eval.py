"""Length sweeps: run a model as a memory agent (or on one long prompt) over tasks x lengths.

    python eval.py --model checkpoints/tiny --tasks niah_single,vt --lengths 1k,64k --out tiny.json
    python eval.py --model out/memagent-7b --tasks hotpotqa:hotpot_dev.json --protocol memagent --out 7b.json
    python eval.py --model out/memagent-7b --tasks niah_single_2:essays.txt,qa_1:squad_dev.json --protocol ruler
    python eval.py --report tiny.json,qwen7b.json --plot overlay.png --markdown   # nothing is run
    python eval.py --model Qwen2.5-7B-Instruct --tasks hotpotqa:hotpot_dev.json --closed-book hard.jsonl --samples 200

Each task x length cell rolls --samples questions out --n times and reports the mean score (the
task's scorer on the final answer, in the --frame it was asked in) with its 95% Wilson interval over
the questions, document tokens read, wall time and tokens read per second; a failing rollout scores
0, keeps its error, and the run goes on. Every input is checked before the first cell, and --out is
rewritten after each cell ("complete": false until the end). Lengths are tokens of the model's
tokenizer; for hotpotqa:FILE a plain number is a document count (k/m convert at the paper's 200
documents per 28K tokens); a jsonl:FILE task is the file's lines. The protocols are PROTOCOLS, the
closed-book filter CLOSED_BOOK; `--help` lists every setting.
"""
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

import trace_page
from memory_agent import AgentConfig, MemoryAgent, ModelSettings, agent_json, document_tokens
from model import build_model
from rollout import Engine, SamplingParams, derive_seed
from run_outputs import Outputs, write_file
from settings import (INT64, TEMPERATURE, TOP_P, EvalConfig, SettingError, at_least, check_repeats, merge, one_of,
                      option, parse_flags, read_json, within)
from tasks import (FRAMES, RULER_QA, SOURCED, TASKS, Sample, boxed_em, check_length, extract_boxed, load_hotpotqa,
                   hotpot_questions, load_jsonl, load_ruler_qa, make_samples, parse_length, read_records, sample_at,
                   score)
from tokenizer import load_tokenizer

# the release's RULER-HotpotQA evaluation (its lengths are documents: about 7K ... 3.5M tokens): its
# final turn asks for "Therefore, the answer is ..." (--frame boxed asks for a box instead)
PROTOCOLS = {"memagent": dict(lengths=",".join(str(50 * 2**i) for i in range(10)), samples=128, n=1,
                              temperature=0.7, top_p=0.95, seed=0, frame="answer_is"),
             # the release's RULER sweep: 128 questions a task at 8K ... 512K tokens, same sampling and frame
             "ruler": dict(lengths="8k,16k,32k,64k,128k,256k,512k", samples=128, n=1, temperature=0.7, top_p=0.95,
                           seed=0, frame="answer_is")}
# the release's RULER tasks by their names here (the essay ones take the essay file, niah_single_2:FILE;
# qa_1 SQuAD's dev file, qa_1:FILE)
RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue_essay", "niah_multiquery_essay", "vt", "fwe", "qa_1")
OPEN = ("lengths", "frame")  # the protocol flags a user may still set
HEADER = (f"{'task':<16} {'length':>9} {'samples':>7} {'n':>3} {'acc':>6} {'95% CI':>13} {'tokens read':>11} "
          f"{'seconds':>8} {'tok/s':>8} {'errors':>6}")


def hotpotqa_docs(length):
    """A HotpotQA length in documents: '200' is 200 documents, '28k' converts to 200."""
    n = parse_length(length)
    return n if str(length).strip().isdigit() else max(1, round(n * 200 / 28672))


def plan(tasks, lengths):
    """The (name, kind, file, length) cells of a sweep; raises ValueError on any bad argument, before work."""
    tokens, cells = [parse_length(l) for l in lengths], []
    for spec in tasks:
        kind, _, path = spec.partition(":")
        if kind in SOURCED and not path:
            raise ValueError(f"task {kind!r} reads its haystack from a text file: give it as {kind}:FILE")
        if not (kind in TASKS and bool(path) == (kind in SOURCED) or path and kind in (*RULER_QA, "hotpotqa", "jsonl")):
            raise ValueError(f"unknown task {spec!r}: expected one of {', '.join(TASKS)}, hotpotqa:FILE, jsonl:FILE, "
                             f"qa_1:SQUAD_FILE or qa_2:HOTPOTQA_FILE")
        if path and not os.path.isfile(path):
            raise ValueError(f"task {spec!r}: no such file {path!r}")
        if kind == "jsonl":
            cells.append((os.path.splitext(os.path.basename(path))[0], kind, path, None))
        else:
            cells += [(kind, kind, path or None, hotpotqa_docs(l) if kind == "hotpotqa" else n)
                      for l, n in zip(lengths, tokens)]
    cells = list(dict.fromkeys(cells))  # "1k,1024" is one cell
    files = {}  # a name two files share (two dev.jsonl) would merge their rows: such tasks are named by file
    for name, _, path, _ in cells:
        files.setdefault(name, set()).add(path)
    return [(f"{name}:{path}" if len(files[name]) > 1 else name, kind, path, n) for name, kind, path, n in cells]


def task_files(cells):
    return sorted({path for _, _, path, _ in cells if path})


def check_sweep(tasks, lengths, samples, tokenizer, seed):
    """Every input of a sweep checked before any cell runs -> its cells. ValueError naming the bad one."""
    cells = plan(tasks, lengths)
    docs = {}  # hotpotqa file -> its document counts
    for name, kind, path, length in cells:
        if kind in TASKS:
            check_length(kind, length, tokenizer, num=samples, seed=seed, source=path)
        elif kind == "hotpotqa":
            docs.setdefault(path, []).append(length)
        elif kind == "jsonl":
            load_jsonl(path)
        elif kind in RULER_QA and length == min(n for _, k, p, n in cells if (k, p) == (kind, path)):
            load_ruler_qa(kind, path, length, tokenizer, samples, seed)  # the shortest bounds the question's own
    for path, counts in docs.items():  # the fewest documents bound the gold paragraphs, the most the distractors
        for num_docs in {min(counts), max(counts)}:
            load_hotpotqa(path, num_docs, num_samples=samples, seed=seed)
    return cells


def load_samples(kind, path, length, tokenizer, num, seed):
    if kind == "hotpotqa":
        return load_hotpotqa(path, length, num_samples=num, seed=seed)
    if kind == "jsonl":
        return load_jsonl(path)[:num]
    if kind in RULER_QA:
        return load_ruler_qa(kind, path, length, tokenizer, num, seed)
    return make_samples(kind, length, tokenizer, num, seed, source=path)


def wilson(mean, count, z=1.96):
    """The Wilson score interval of a proportion `mean` seen over `count` Bernoulli trials (95% at z=1.96)."""
    if count == 0:
        return 0.0, 1.0
    denom = 1 + z * z / count
    center = (mean + z * z / (2 * count)) / denom
    half = z * math.sqrt(mean * (1 - mean) / count + z * z / (4 * count * count)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def answer_prompts(engine, tok, prompts, params, n, extract=extract_boxed):
    """(sample index i, prompt ids) pairs -> n (completion, text, extracted answer) each, sample-major.
    Rollout k of sample i draws its own noise, as the agent seeds its turns; a None seed stays unseeded."""
    completions = engine.generate([p for _, p in prompts for _ in range(n)],
                                  [replace(params, seed=None if params.seed is None else derive_seed(params.seed, i, k))
                                   for i, _ in prompts for k in range(n)])
    texts = [tok.decode([i for i in c.token_ids if i not in tok.stop_ids and i != tok.pad_id]) for c in completions]
    return [(c, text, extract(text)) for c, text in zip(completions, texts)]


def run_direct(agent, engine, samples, params, n, max_prompt_tokens):
    outs, prompts = [], []
    for i, s in enumerate(samples):
        try:
            prompt = agent.direct_prompt(s, max_prompt_tokens)
            frame = len(agent.direct_prompt(replace(s, document=""), max_prompt_tokens))  # all but the document
            doc = s.meta.get("doc_tokens") or sum(map(len, document_tokens(s.document, agent.tok)))
        except ValueError as e:  # a question longer than the window, an unreadable file: this sample fails
            outs += [dict(answer_text=None, answer=None, tokens_read=0, doc_tokens=0, error=str(e), memories=[])] * n
            continue
        outs += [dict(tokens_read=len(prompt) - frame, doc_tokens=doc, error=None, memories=[]) for _ in range(n)]
        prompts.append((i, prompt))
    answers = iter(answer_prompts(engine, agent.tok, prompts, params, n, agent.extract))
    for o in outs:
        if o["error"] is None:
            c, text, answer = next(answers)
            o.update(answer_text=text, answer=answer, error=c.error)
    return outs


def cell_row(name, length, mode, cell, preds, n, seconds):
    """One cell's summary: accuracy is the mean over questions x rollouts; its interval is Wilson's over
    the questions, the independent draws (a question's n rollouts share its document and answer, so
    they are not n more trials). For fractional scores (string_match_all, f1, a question's mean over
    rollouts) it is conservative: a score in [0, 1] with mean p has variance at most p(1 - p)."""
    count = max(len(preds), 1)
    accuracy = sum(p["score"] for p in preds) / count
    low, high = wilson(accuracy, len(preds) // n)
    read = sum(p["tokens_read"] for p in preds)
    return dict(task=name, length=length, mode=mode, samples=len(cell), n=n, accuracy=accuracy, ci_low=low,
                ci_high=high, tokens_read=read / count, doc_tokens=sum(p["doc_tokens"] for p in preds) / count,
                seconds=seconds, tokens_per_s=read / max(seconds, 1e-9),
                errors=sum(p["error"] is not None for p in preds))


def make_engine(model, sequences, seed, progress):
    """Off CUDA the KV cache is a fixed size: room for every sequence at full length, <= 1 GiB."""
    cfg, p = model.config, next(model.parameters())
    token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * p.element_size()
    return Engine(model, kv_cache_bytes=min(2**30, sequences * (cfg.max_position_embeddings + 16) * token_bytes),
                  seed=seed, progress=progress)


def cell_runner(engine, tokenizer, agent, mode, params, n, progress, frame):
    """-> run(samples): one output per rollout, sample-major."""
    if mode == "agent":
        runner = MemoryAgent(engine, tokenizer, agent, keep_conversations=False, progress=progress, frame=frame)
        return lambda cell: [dict(answer_text=t.answer_text, answer=t.answer, tokens_read=t.tokens_read, error=t.error,
                                  doc_tokens=cell[j // n].meta.get("doc_tokens") or t.tokens_read, memories=t.memories)
                             for j, t in enumerate(runner.run(cell, n=n, params=params))]
    runner = MemoryAgent(None, tokenizer, agent, frame=frame)  # builds the prompts only: no update-turn budget
    max_prompt = engine.max_len - agent.answer_tokens
    if max_prompt <= 0:
        raise SettingError(f"agent.answer_tokens={agent.answer_tokens} leaves no room in the model's "
                         f"{engine.max_len} positions")
    params = replace(params, max_new_tokens=agent.answer_tokens, stop_token_ids=tuple(tokenizer.stop_ids))
    return lambda cell: run_direct(runner, engine, cell, params, n, max_prompt)


def trace_records(cell, preds, outs, n):
    """What --traces keeps of each rollout: the question, its gold, the memory after every chunk, the answer."""
    return [dict(task=p["task"], length=p["length"], id=p["id"], rollout=p["rollout"], question=s.question,
                 answers=s.answers, doc_tokens=p["doc_tokens"], needles=s.meta.get("needles", []),
                 supporting=s.meta.get("supporting", []), memories=o["memories"], answer_text=o["answer_text"],
                 answer=o["answer"], score=p["score"], error=o["error"])
            for p, o, s in zip(preds, outs, (s for s in cell for _ in range(n)))]


def evaluate(model, tokenizer, tasks, lengths, samples, agent: AgentConfig, mode="agent", temperature=0.0,
             top_p=1.0, n=1, seed=0, engine=None, progress=False, out=None, traces=None, outputs=None,
             frame="boxed") -> dict:
    """Run every task x length cell -> {"config", "complete", "results" (a row per cell), "predictions"
    (one per question and rollout)}. `engine` lets a caller (train.py) reuse its own; with `progress`,
    bars and a table row per cell. `out`: the JSON, rewritten after each cell; `traces`: JSONL of each
    rollout's memories and answer, and beside it their page (trace_page.py), both after each cell; all
    claimed in `outputs` (a new Outputs if None). `frame` (tasks.FRAMES): how the final turn gives its
    answer, and so which form of each task's scorer reads it."""
    sweep = EvalConfig(samples=samples, n=n, temperature=temperature, top_p=top_p, seed=seed)
    if mode not in ("agent", "direct"):
        raise SettingError(f"mode must be 'agent' or 'direct', got {mode!r}")
    cells = check_sweep(tasks, lengths, samples, tokenizer, seed)
    own = outputs is None
    outputs = outputs or Outputs(reads=task_files(cells))
    try:
        for path, what in ((out, "out"), (traces, "traces"), (traces and trace_page.page_path(traces), "traces page"))\
                if own else ():
            outputs.claim(path, what)
        params = SamplingParams(temperature=sweep.temperature, top_p=sweep.top_p, seed=seed)
        if engine is None:
            engine = make_engine(model, samples * n, seed, progress)
        run_cell = cell_runner(engine, tokenizer, agent, mode, params, n, progress, frame)
        config = dict(tasks=list(tasks), lengths=[str(l) for l in lengths], samples=samples, n=n, mode=mode,
                      agent=asdict(agent), temperature=temperature, top_p=top_p, seed=seed, frame=frame)
        res, trace_lines = dict(config=config, complete=False, results=[], predictions=[]), []
        if progress:
            print(HEADER, flush=True)
        for name, kind, path, length in cells:
            cell = load_samples(kind, path, length, tokenizer, samples, seed)
            t0 = time.perf_counter()
            outs = run_cell(cell)
            seconds = time.perf_counter() - t0
            preds = [dict(task=name, length=length, id=s.id, rollout=j % n, answer=o["answer"], answers=s.answers,
                          score=0.0 if o["error"] else score(s, o["answer_text"], frame), error=o["error"],
                          answer_text=o["answer_text"], tokens_read=o["tokens_read"], doc_tokens=o["doc_tokens"])
                     for j, (s, o) in enumerate(zip((s for s in cell for _ in range(n)), outs))]  # sample-major
            row = cell_row(name, length, mode, cell, preds, n, seconds)
            res["results"].append(row)
            res["predictions"] += preds
            if progress:
                print(format_row(row), flush=True)
            if out:
                outputs.write_json(out, res)
            if traces:
                trace_lines += trace_records(cell, preds, outs, n)
                outputs.write_lines(traces, trace_lines)
                write_file(trace_page.page_path(traces), trace_page.render(trace_lines, res["results"],
                                                                           agent.chunk_tokens))
        res["complete"] = True
        if out:
            outputs.write_json(out, res)
    finally:
        if own:
            outputs.release()
    return res


# --------------------------------------------------------------------------------------------
# the closed-book filter: questions the model answers without the document teach nothing

def question_file(kind, path):
    """A hotpotqa or jsonl file -> (its records as read, a Sample per record with no document)."""
    if kind == "jsonl":
        return [rec for _, rec in read_records(path)], [replace(s, document="") for s in load_jsonl(path)]
    records = hotpot_questions(path)
    return [r for _, r in records], [sample_at(where, r["_id"], r["question"], "", [r["answer"]], dict(scorer="sub_em"))
                                     for where, r in records]


# the release's closed-book rule: each model answers each question twice, sampled (temperature 1.0,
# top_p 0.7, 512 tokens), asked for a boxed answer with no document; the question is dropped if any
# answer boxes a gold answer (its training reward) or contains one anywhere. With several models, run
# the filter once per model, each on the previous run's output: a question survives only if every
# model misses it.
CLOSED_BOOK = dict(n=2, temperature=1.0, top_p=0.7, seed=0)
CLOSED_BOOK_TOKENS = 512
CLOSED_BOOK_PROMPT = "Answer the question; put the final answer in \\boxed{{}}.\n\n<problem>\n{problem}\n</problem>"


def closed_book(engine, tokenizer, samples, params: SamplingParams, n=CLOSED_BOOK["n"],
                max_new_tokens=CLOSED_BOOK_TOKENS):
    """-> (answered flags, rollouts that failed): whether any of n rollouts answers without the
    document (see CLOSED_BOOK); None where every rollout failed (neither kept nor dropped)."""
    head, tail = CLOSED_BOOK_PROMPT.split("{problem}")
    head, tail = tokenizer.encode(head.replace("{{}}", "{}")), tokenizer.encode(tail)
    prompts = [(i, tokenizer.apply_chat_template([{"role": "user", "content": head + tokenizer.encode(q.question)
                                                   + tail}])) for i, q in enumerate(samples)]
    params = replace(params, max_new_tokens=max_new_tokens, stop_token_ids=tuple(tokenizer.stop_ids))
    outs = answer_prompts(engine, tokenizer, prompts, params, n)

    def answers(text, golds):
        return boxed_em(text, golds) > 0 or any(g.lower() in text.lower() for g in golds)

    answered = [None if all(c.finish_reason == "error" for c, _, _ in outs[i * n:(i + 1) * n]) else
                any(c.finish_reason != "error" and answers(text, s.answers) for c, text, _ in outs[i * n:(i + 1) * n])
                for i, s in enumerate(samples)]
    return answered, sum(c.finish_reason == "error" for c, _, _ in outs)


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
    ci = f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
    return (f"{r['task']:<16} {length_label(r['task'], r['length']):>9} {r['samples']:>7} {r['n']:>3} "
            f"{100 * r['accuracy']:>6.1f} {ci:>13} {r['tokens_read']:>11.0f} {r['seconds']:>8.1f} "
            f"{r['tokens_per_s']:>8.0f} {r['errors']:>6}")


def markdown(runs):
    """One table per task: a row per (run, mode), a column per length, accuracy x100 and its 95%
    Wilson interval where the results carry one."""
    def cell(r):
        ci = f" [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]" if "ci_low" in r else ""
        return f"{100 * r['accuracy']:.1f}{ci}" if ci else f"{100 * r['accuracy']:.2f}"

    out = []
    for task in dict.fromkeys(r["task"] for _, res in runs for r in res["results"]):
        cells = {(f"{label} ({r['mode']})", r["length"]): cell(r)
                 for label, res in runs for r in res["results"] if r["task"] == task}
        lengths = sorted({l for _, l in cells}, key=lambda l: l or 0)
        out += [f"**{task}** (accuracy x100)", "",
                "| run | " + " | ".join(length_label(task, l) for l in lengths) + " |",
                "|---" * (len(lengths) + 1) + "|"]
        out += [f"| {name} | " + " | ".join(cells.get((name, l), "—") for l in lengths) + " |"
                for name in dict.fromkeys(name for name, _ in cells)]
        out.append("")
    return "\n".join(out)


def task_panels(what, path, names, draw, **subplots):
    """A PNG with a panel per task, each drawn by draw(axes, task) -> path, or None without matplotlib
    (said) or without a task."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {what} (pip install matplotlib)", flush=True)
        return None
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(1 + 4.2 * len(names), 4), squeeze=False, **subplots)
    for ax, task in zip(axes[0], names):
        draw(ax, task)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_file(path, png.getvalue())
    return path


def plot(runs, path):
    """A panel per task (one y axis), a line per (run, mode): accuracy vs document tokens (log x),
    shaded with its 95% interval where the results have one. False if matplotlib is missing."""
    def draw(ax, task):
        for label, res in runs:
            for mode in dict.fromkeys(r["mode"] for r in res["results"] if r["task"] == task):
                rows = sorted((r for r in res["results"] if r["task"] == task and r["mode"] == mode),
                              key=lambda r: r["doc_tokens"])
                x = [r["doc_tokens"] for r in rows]
                ax.plot(x, [100 * r["accuracy"] for r in rows], marker="o", label=f"{label} ({mode})")
                if all("ci_low" in r for r in rows):
                    ax.fill_between(x, [100 * r["ci_low"] for r in rows], [100 * r["ci_high"] for r in rows],
                                    alpha=0.15)
        ax.set(xscale="log", xlabel="document tokens", ylabel="accuracy (x100)", ylim=(-2, 102))

    names = list(dict.fromkeys(r["task"] for _, res in runs for r in res["results"]))
    if task_panels(f"the plot {path}", path, names, draw, sharey=True):
        print(f"wrote {path}")
        return True
    return False


def plot_curves(metrics_path):
    """Reward, accuracy, groups kept and held-out accuracy per task over the steps of metrics.jsonl,
    a panel per task, to curves.png beside it -> its path (None without matplotlib or anything to plot)."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]

    def draw(ax, task):
        for key, label, style in ((f"reward/{task}", "reward", "-"), (f"accuracy/{task}", "accuracy", "--"),
                                  (f"val_accuracy/{task}", "held-out accuracy", "o-")):
            points = [(m["step"], m[key]) for m in rows if key in m]
            if points:
                ax.plot(*zip(*points), style, label=label, markersize=3)
        kept = [(m["step"], m[f"kept_groups/{task}"] / max(m[f"groups/{task}"], 1))
                for m in rows if f"groups/{task}" in m]
        if kept:
            ax.plot(*zip(*kept), ":", color="gray", label="groups kept / generated")
        ax.set(xlabel="step", ylim=(-0.02, 1.02))

    names = sorted({k.split("/", 1)[1] for m in rows for k in m if k.startswith(("reward/", "val_accuracy/"))})
    return task_panels("training curves", os.path.join(os.path.dirname(metrics_path), "curves.png"), names, draw)


# --------------------------------------------------------------------------------------------
# command line

ROW = dict(task=str, mode=str, accuracy=(int, float), doc_tokens=(int, float))  # what a report reads of a row


def read_results(paths):
    """eval.py results files -> [(label, results)]: a run's label, else its file's name (with its path where
    two share one); "(incomplete)" marks a sweep that did not finish."""
    runs = []
    for f in paths:
        res = read_json(f, "eval.py results")
        rows = res.get("results")
        if not (isinstance(res.get("config"), dict) and isinstance(rows, list) and all(
                isinstance(r, dict) and all(isinstance(r.get(k), t) and not isinstance(r.get(k), bool)
                                            for k, t in ROW.items()) and (r.get("length") is None or
                                                                          type(r.get("length")) is int) for r in rows)):
            raise SettingError(f"{f}: not eval.py results (a 'config' object and 'results' rows with task, length, "
                               "mode, accuracy and doc_tokens)")
        label = res["config"].get("label") or os.path.splitext(os.path.basename(f))[0]
        runs.append((label + ("" if res.get("complete", True) else " (incomplete)"), res))
    labels = [label for label, _ in runs]  # two runs of one name would share a table row: name them by file
    return [(label if labels.count(label) == 1 else f"{label} ({f})", res) for (label, res), f in zip(runs, paths)]


@dataclass
class SweepSettings(ModelSettings):
    tasks: str = "niah_single"  # comma list: task names, NAME:FILE (essay tasks, qa_1, qa_2), hotpotqa:FILE, jsonl:FILE
    mode: str = option("agent", one_of("agent", "direct"))  # direct: the whole document in one prompt
    lengths: str = "8k"  # comma list: tokens (8k, 128k); documents for hotpotqa
    samples: int | None = option(64, at_least(1))  # questions per cell (--closed-book: default all)
    n: int = option(1, at_least(1))  # rollouts per question, all scored
    temperature: float = option(0.0, TEMPERATURE)  # 0: greedy
    top_p: float = option(1.0, TOP_P)
    seed: int = option(0, within(0, INT64))
    frame: str = option("boxed", one_of(*FRAMES))  # how the final turn gives its answer
    protocol: str = option("", one_of("", *PROTOCOLS))  # a published evaluation's settings (PROTOCOLS)
    label: str = ""  # the run's name in plots and tables (default: the model's)
    out: str = ""  # results and predictions, JSON, rewritten after every cell
    traces: str = ""  # each rollout's memories and answer, JSONL, and a page of them beside it (X.html)
    closed_book: str = ""  # JSONL: the records of the one hotpotqa or jsonl task the model cannot answer alone
    plot: str = ""  # accuracy vs length, PNG (needs matplotlib)
    markdown: bool = False  # print markdown tables of the results
    report: str = ""  # comma list of results files to report (with plot, markdown): nothing is run

    @classmethod
    def below(cls, values):
        """A protocol's values (it fixes them), or --closed-book's (the release's filter), under the flags."""
        protocol = values.get("protocol")  # checked as a setting once built; here only looked up
        preset = PROTOCOLS.get(protocol if isinstance(protocol, str) else "") or (
            dict(CLOSED_BOOK, samples=None) if values.get("closed_book") else {})
        fixed = [k for k in preset if k not in OPEN and k in values] if values.get("protocol") else []
        if fixed:
            raise SettingError(f"--protocol {values['protocol']} fixes {', '.join('--' + k for k in fixed)}")
        return merge(preset, agent_json(values.get("model")))

    def check_together(self):
        if bool(self.model) == bool(self.report):
            raise SettingError("give --model to run a sweep, or --report FILES to report saved results")
        super().check_together()
        writes = {"out": self.out, "traces": self.traces, "plot": self.plot, "markdown": self.markdown}
        unused = [k for k, v in writes.items() if v and (self.closed_book or self.report and k in ("out", "traces"))]
        if unused:
            raise SettingError(f"{', '.join('--' + k for k in unused)} cannot go with "
                               f"{'--closed-book' if self.closed_book else '--report'}: it writes no results there")
        kinds = [t.partition(":")[0] for t in self.tasks.split(",")]
        if self.closed_book and (len(kinds) != 1 or kinds[0] not in ("hotpotqa", "jsonl") or self.protocol):
            raise SettingError(f"--closed-book takes one hotpotqa:FILE or jsonl:FILE task and no --protocol (it is "
                               f"the release's filter, CLOSED_BOOK), got {self.tasks!r}")
        if self.samples is None and not self.closed_book:
            raise SettingError("'samples' must be >= 1, got None")
        if self.protocol == "memagent" and not set(kinds) <= {"hotpotqa", "jsonl"}:
            raise SettingError("--protocol memagent scores hotpotqa or jsonl questions with sub_em; the synthetic "
                               "tasks have their own scorers")
        check_repeats(self.n, self.temperature)


def check_inputs(args, tokenizer, config):
    """Every file a sweep reads (`config`: the --config file) or writes, checked before the model is loaded
    -> (the closed-book question file or None, the claimed Outputs). ValueError/OSError naming the bad input."""
    tasks = args.tasks.split(",")
    cells = plan(tasks, ["1"]) if args.closed_book else check_sweep(tasks, args.lengths.split(","), args.samples,
                                                                    tokenizer, args.seed)
    template = args.agent.template if os.path.isfile(args.agent.template) else None
    outputs = Outputs(reads=task_files(cells) + [args.model, args.tokenizer, template, config])
    for path, what in ((args.out, "--out"), (args.traces, "--traces"), (args.closed_book, "--closed-book"),
                       (args.traces and trace_page.page_path(args.traces), "--traces page"),
                       (args.plot, "--plot")):
        outputs.claim(path, what)
    questions = question_file(*tasks[0].split(":", 1)) if args.closed_book else None
    return questions, outputs


def run_closed_book(args, model, tokenizer, question_set, outputs):
    records, questions = (part[:args.samples] for part in question_set)  # the release: dev's first 200
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    answered, failed = closed_book(make_engine(model, args.n, args.seed, progress=True), tokenizer, questions,
                                   params, args.n)
    outputs.write_lines(args.closed_book, [rec for rec, known in zip(records, answered) if known is False])
    unknown = answered.count(None)
    print(f"closed book: {answered.count(True)} of {len(records)} questions answered without the "
          f"document; wrote the {answered.count(False)} unanswered to {args.closed_book}"
          + (f"; {unknown} left out, all their rollouts failed ({failed} in all)" if unknown else ""))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, config = SweepSettings.from_argv(argv, __doc__), parse_flags(argv)[1]
        if args.report:
            runs, outputs = read_results(args.report.split(",")), Outputs(reads=args.report.split(",") + [config])
            outputs.claim(args.plot, "--plot")
        else:
            print(f"agent: {asdict(args.agent)}")
            questions, outputs = check_inputs(args, load_tokenizer(args.tokenizer or args.model), config)
            tokenizer, model = args.load()
            if questions:
                return run_closed_book(args, model, tokenizer, questions, outputs)
            res = evaluate(model, tokenizer, args.tasks.split(","), args.lengths.split(","), args.samples, args.agent,
                           args.mode, args.temperature, args.top_p, args.n, args.seed, progress=True, out=args.out,
                           traces=args.traces, outputs=outputs, frame=args.frame)
    except (ValueError, OSError) as e:
        sys.exit(f"eval.py: {e}")
    if not args.report:
        res["config"].update(model=args.model, tokenizer=args.tokenizer or args.model, dtype=args.dtype,
                             device=args.device, label=args.label, protocol=args.protocol)
        if args.out:  # evaluate wrote each cell; this adds where the run came from
            outputs.write_json(args.out, res)
        runs = [(args.label or os.path.basename(os.path.normpath(args.model)), res)]
    if args.plot:
        plot(runs, args.plot)
    if args.markdown:
        print(markdown(runs))


if __name__ == "__main__":
    main()
