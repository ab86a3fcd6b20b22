"""The traces of an `eval.py --traces` run as one self-contained HTML page: what the agent remembered.

    python eval.py --model checkpoints/tiny --tasks niah_single --lengths 1k --samples 4 --traces runs/t.jsonl
    # -> runs/t.jsonl and runs/t.html

The page opens with an index: accuracy per task x length, each a link to its cell. Per question, in
collapsed sections so a 64K sweep stays light: the document as a strip of chunks, the chunks holding a
needed fact marked; each needed fact with the chunk it is read in, the chunk its memory first holds it
and the chunk it is lost in; the memory after every chunk with what changed from the one before; the
final answer beside the gold. A fact counts as held when its text, SQuAD-normalised, is part of the
normalised memory. No script, no font and nothing else is fetched: the file is the whole page.
"""
import difflib
import html
import os

from tasks import normalize_answer

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 80em; }
table { border-collapse: collapse; margin: .4em 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; vertical-align: top; }
.strip { display: flex; flex-wrap: wrap; gap: 1px; margin: .4em 0; }
.strip span { width: 9px; height: 16px; background: #ddd; display: inline-block; }
.strip .need { background: #d9480f; } .strip .other { background: #a5b4fc; }
tr.read td:first-child { background: #ffd8a8; } tr.same td { color: #999; }
ins { background: #c3fae8; text-decoration: none; } del { background: #ffc9c9; color: #a33; }
.right { color: #2b8a3e; } .wrong { color: #c92a2a; } summary { cursor: pointer; }
.mem { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; }
"""


def page_path(traces_path):
    """runs/t.jsonl -> runs/t.html"""
    stem, ext = os.path.splitext(traces_path)
    return (stem if ext == ".jsonl" else traces_path) + ".html"


def holds(memory, fact):
    return bool(fact) and normalize_answer(fact) in normalize_answer(memory or "")


def fact_chunks(rec, chunk_tokens):
    """The facts of a trace record: [(text, the chunks it spans (from 0) or None, relevant, the chunk an
    ideal memory drops it after or None)]."""
    needles = rec.get("needles") or []
    span = lambda n: list(range(n["offset"] // chunk_tokens, (n["offset"] + n["tokens"] - 1) // chunk_tokens + 1))
    facts = [(n["text"], span(n), n["relevant"], span(needles[n["until"]])[-1] if "until" in n else None)
             for n in needles]
    return facts + [(s, None, True, None) for s in rec.get("supporting") or []]


def diff_html(before, after):
    """`after` with the words it gained marked <ins> and those it lost from `before` marked <del>."""
    a, b = (before or "").split(), (after or "").split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            out.append(f"<del>{html.escape(' '.join(a[i1:i2]))}</del>")
        if op in ("insert", "replace"):
            out.append(f"<ins>{html.escape(' '.join(b[j1:j2]))}</ins>")
        if op == "equal":
            out.append(html.escape(" ".join(b[j1:j2])))
    return " ".join(out)


def fact_rows(facts, memories):
    """Per fact: where it is read, where the memory first holds it, where it is lost after that."""
    rows = []
    for text, chunks, relevant, until in facts:
        if not relevant:
            continue
        held = [holds(m, text) for m in memories]
        entered = next((c for c, h in enumerate(held) if h), None)
        lost = None if entered is None else next((c for c in range(entered, len(held)) if not held[c]), None)
        fate = "" if entered is None else "kept to the end" if lost is None else f"at chunk {lost + 1}"
        if until is not None:
            fate += f" (an ideal memory drops it after chunk {until + 1})"
        rows.append(f"<tr><td>{html.escape(text)}</td><td>{'?' if chunks is None else chunks[-1] + 1}</td>"
                    f"<td>{'never' if entered is None else entered + 1}</td><td>{fate}</td></tr>")
    if not rows:
        return ""
    return ("<table><tr><th>needed fact</th><th>read in chunk</th><th>memory holds it from chunk</th>"
            "<th>lost</th></tr>" + "".join(rows) + "</table>")


def strip_html(marks, num_chunks, chunk_tokens):
    """The document as a row of boxes, one per chunk; a box holding a needed fact is marked."""
    boxes = []
    for c in range(num_chunks):
        facts = marks.get(c, [])
        kind = "need" if any(r for _, r in facts) else "other" if facts else ""
        title = html.escape(f"chunk {c + 1}" + "".join(f": {t}" for t, _ in facts), quote=True)
        boxes.append(f'<span class="{kind}" title="{title}"></span>')
    return f'<div class="strip" title="the document, a box per chunk of {chunk_tokens} tokens">{"".join(boxes)}</div>'


def memory_html(memories, marks):
    """A row per chunk: the memory after it, marked against the one before."""
    if not memories:
        return "<p>No memory: the whole document was one prompt (direct mode).</p>"
    rows = []
    for c, memory in enumerate(memories):
        before = memories[c - 1] if c else ""
        read = "".join(f"<br><b>reads:</b> {html.escape(t)}" for t, r in marks.get(c, []) if r)
        same = c > 0 and memory == before
        body = "(unchanged)" if same else diff_html(before, memory) or "(empty)"
        rows.append(f'<tr class="{"read" if read else "same" if same else "new"}">'
                    f'<td>{c + 1}{read}</td><td class="mem">{body}</td></tr>')
    return f'<table class="memory"><tr><th>chunk</th><th>memory after it</th></tr>{"".join(rows)}</table>'


def question_html(rec, chunk_tokens):
    facts = fact_chunks(rec, chunk_tokens)
    memories = rec.get("memories") or []
    marks = {}
    for text, chunks, relevant, _ in facts:
        for c in chunks or []:
            marks.setdefault(c, []).append((text, relevant))
    num_chunks = len(memories) or -(-(rec.get("doc_tokens") or 0) // chunk_tokens)
    answer = "no answer" if rec.get("answer") is None else html.escape(str(rec["answer"]))
    gold = html.escape(", ".join(rec.get("answers") or []))
    verdict = "right" if rec.get("score") == 1.0 else "wrong"
    summary = (f'<span class="{verdict}">{rec.get("score", 0):.2f}</span> {html.escape(str(rec["id"]))} '
               f'(rollout {rec.get("rollout", 0)}): {answer} / gold {gold}')
    error = f'<p class="wrong">error: {html.escape(rec["error"])}</p>' if rec.get("error") else ""
    return (f'<details class="question"><summary>{summary}</summary>'
            f'<p><b>Question:</b> {html.escape(rec.get("question", ""))}</p>{error}'
            f'{strip_html(marks, num_chunks, chunk_tokens)}{fact_rows(facts, memories)}{memory_html(memories, marks)}'
            f'<p><b>Final answer:</b> <span class="mem">{html.escape(rec.get("answer_text") or "")}</span><br>'
            f'<b>Boxed:</b> {answer} &nbsp; <b>Gold:</b> {gold}</p></details>')


def index_html(rows):
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lengths = list(dict.fromkeys(str(r["length"]) for r in rows))
    by = {(r["task"], str(r["length"])): r for r in rows}
    head = "".join(f"<th>{html.escape(l)}</th>" for l in lengths)
    body = ""
    for t in tasks:
        cells = ""
        for l in lengths:
            r = by.get((t, l))
            cells += ("<td></td>" if r is None else
                      f'<td><a href="#{cell_id(t, l)}">{100 * r["accuracy"]:.1f}</a> [{100 * r["ci_low"]:.1f}, '
                      f'{100 * r["ci_high"]:.1f}] <small>n={r["samples"] * r["n"]}</small></td>')
        body += f"<tr><th>{html.escape(t)}</th>{cells}</tr>"
    return f"<table><tr><th>task \\ length</th>{head}</tr>{body}</table>"


def cell_id(task, length):
    return "cell-" + "".join(ch if ch.isalnum() else "-" for ch in f"{task}-{length}")


def render(records, rows, chunk_tokens, title="memory agent traces"):
    """eval.py's trace records with the sweep's result rows -> the page (HTML text)."""
    cells = {}
    for rec in records:
        cells.setdefault((rec["task"], str(rec["length"])), []).append(rec)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p>Accuracy x100 [95% Wilson interval] per task and document length, over its questions. "
             "Each cell below lists its questions: open one to see its document as a strip of chunks "
             "(marked: the chunks holding a needed fact), the memory after every chunk (<ins>gained</ins>, "
             "<del>lost</del>), and the answer beside the gold.</p>", index_html(rows)]
    for (task, length), recs in cells.items():
        row = next((r for r in rows if r["task"] == task and str(r["length"]) == length), None)
        acc = "" if row is None else f": accuracy {100 * row['accuracy']:.1f}"
        parts.append(f'<h2 id="{cell_id(task, length)}">{html.escape(task)} at {html.escape(length)}{acc}</h2>')
        parts += [question_html(rec, chunk_tokens) for rec in recs]
    parts.append("</body></html>")
    return "\n".join(parts)
