"""eval.py --traces writes a page beside its JSONL: per question the document as a strip of chunks with
the needed facts marked, the memory after every chunk with what changed, and where each fact entered
the memory and where it was lost."""
import json
import os
from html.parser import HTMLParser

import eval as ev
import trace_page
from memory_agent import AgentConfig
from model import build_model
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Questions(HTMLParser):
    """Per question section: the strip's box classes, the memory table's rows, the facts table's rows."""

    def __init__(self, text):
        super().__init__()
        self.questions, self.table, self.row = [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "details" and a.get("class") == "question":
            self.questions.append(dict(strip=[], memory=[], facts=[]))
        elif tag == "span" and self.questions and a.get("title", "").startswith("chunk"):
            self.questions[-1]["strip"].append(a.get("class", ""))
        elif tag == "table" and self.questions:
            self.table = "memory" if a.get("class") == "memory" else "facts"
        elif tag == "tr" and self.table:
            self.row = []
        elif tag == "td" and self.row is not None:
            self.row.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None
        elif tag == "tr" and self.row:
            self.questions[-1][self.table].append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.row:
            self.row[-1] += data


def test_a_small_sweep_writes_a_page_with_a_memory_per_chunk(tmp_path):
    path = os.path.join(ROOT, "checkpoints", "tiny")
    tok, agent = load_tokenizer(path), AgentConfig.load(path)
    traces = str(tmp_path / "t.jsonl")
    res = ev.evaluate(build_model(path), tok, ["niah_single", "vt"], ["512"], 2, agent, traces=traces)
    page = (tmp_path / "t.html").read_text()
    assert "<script" not in page and "http" not in page and "url(" not in page  # nothing to fetch
    for row in res["results"]:  # the index links each cell, with its accuracy
        assert f'href="#{trace_page.cell_id(row["task"], row["length"])}">{100 * row["accuracy"]:.1f}<' in page
    records = [json.loads(l) for l in open(traces)]
    questions = Questions(page).questions
    assert len(questions) == len(records) == 4
    for rec, q in zip(records, questions):
        chunks = -(-rec["doc_tokens"] // agent.chunk_tokens)
        assert len(rec["memories"]) == len(q["strip"]) == len(q["memory"]) == chunks
        assert [r[0].split("reads:")[0] for r in q["memory"]] == [str(c + 1) for c in range(chunks)]
        spans = [range(n["offset"] // agent.chunk_tokens, (n["offset"] + n["tokens"] - 1) // agent.chunk_tokens + 1)
                 for n in rec["needles"] if n["relevant"]]  # every chunk a needed fact spans
        needed = {c for span in spans for c in span}
        assert {c for c, cls in enumerate(q["strip"]) if cls == "need"} == needed
        assert len(q["facts"]) == sum(n["relevant"] for n in rec["needles"])
        assert rec["answers"][0] in page and rec["question"] in page


def test_where_a_fact_entered_the_memory_and_where_it_was_lost():
    fact = "VAR ABCDE = 12345."
    rec = dict(task="vt", length=512, id="q", rollout=0, question="Which?", answers=["ABCDE"], score=0.0,
               doc_tokens=400, needles=[dict(text=fact, offset=130, tokens=8, relevant=True)], answer="X",
               answer_text="\\boxed{X}", error=None, memories=["", "var abcde = 12345", "VAR ABCDE = 12345.", "gone"])
    html = trace_page.question_html(rec, chunk_tokens=128)
    facts = Questions(html).questions[0]["facts"]
    assert facts == [[fact, "2", "2", "at chunk 4"]]  # read in chunk 2, held from 2 (normalised), lost at 4
    assert [r[0] for r in Questions(html).questions[0]["memory"]] == ["1", "2reads: " + fact, "3", "4"]
    assert "(empty)" in html and "<del>VAR ABCDE = 12345.</del> <ins>gone</ins>" in html


def test_diff_marks_what_the_memory_gained_and_lost():
    assert trace_page.diff_html("a b c", "a c d") == "a <del>b</del> c <ins>d</ins>"
    assert trace_page.diff_html("", "x <y>") == "<ins>x &lt;y&gt;</ins>"
