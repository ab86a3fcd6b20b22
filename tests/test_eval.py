"""eval.py: the in-process sweep in agent and direct mode, the JSON schema, the CLI, bad arguments, reports.
Accuracy, its interval and the closed-book filter are checked against an oracle stand-in for the
model that knows the answers to some questions; a random micro model runs the real pipeline.
"""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import hypothesis
import pytest
import torch
from hypothesis import strategies as st

import eval as ev
from memory_agent import AgentConfig
from model import TINY_CONFIGS, Transformer
from rollout import Completion
from run_outputs import Outputs
from stub_engine import QueueEngine
from tasks import document_text, make_samples
from test_memory_agent import CharTokenizer
from tokenizer import train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = AgentConfig(chunk_tokens=256, memory_tokens=8, answer_tokens=4, question_tokens=64)
ROW_KEYS = {"task", "length", "mode", "samples", "n", "accuracy", "ci_low", "ci_high", "tokens_read", "doc_tokens",
            "seconds", "tokens_per_s", "errors"}
PRED_KEYS = {"task", "length", "id", "rollout", "answer", "answers", "score", "error", "answer_text", "tokens_read",
             "doc_tokens"}
TOK = CharTokenizer()
ORACLE_AGENT = AgentConfig(chunk_tokens=40, memory_tokens=50, answer_tokens=50, question_tokens=100)


class Words:
    def encode(self, text):
        return text.split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro-model ops are too small to split: a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random micro model and a sentencepiece tokenizer trained on task text, in one HF directory."""
    path = tmp_path_factory.mktemp("ckpt")
    lines = [line for task in ("niah_single", "vt", "fwe", "niah_single_words")
             for i in range(4) for line in document_text(make_samples(task, 600, Words(), 1, seed=i)[0]).split(". ")]
    tok = train_sentencepiece(lines, TINY_CONFIGS["micro"].vocab_size, path / "tokenizer.model")
    model = Transformer(TINY_CONFIGS["micro"]).init_weights(seed=0)
    model.save_pretrained(path)
    return path, model, tok


class Oracle(QueueEngine):
    """The engine's interface around a model that knows the answers to some questions: a memory
    update writes "read", a final turn (or a direct prompt) boxes the known answer or "unknown"."""

    def __init__(self, known, fail_on=None):
        super().__init__()
        self.known, self.fail_on, self.prompts = known, fail_on, []

    def reply(self, rid, prompt, params):
        text = TOK.decode(prompt)
        self.prompts.append(text)
        problem = re.search(r"<problem>\n(.*?)\n</problem>", text, re.S).group(1)
        if problem == self.fail_on:
            raise RuntimeError("the model crashed")
        reply = "read" if "<section>" in text else f"\\boxed{{{self.known.get(problem, 'unknown')}}}"
        ids = TOK.encode(reply)[:params.max_new_tokens - 1] + [1]
        return Completion(ids, [0.0] * len(ids), "stop", None, rid)

    def generate(self, prompts, params):
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done = {c.request_id: c for c in self.step()}
        return [done[i] for i in ids]


def qa_file(path, n, known=()):
    """n questions in the jsonl layout, each with a 100-character context (3 chunks of 40)."""
    records = [dict(id=f"q{i}", question=f"Where is lamp {i}?", context=f"Lamp {i} is in room {i}. " + "x" * 79,
                    answers=[f"room {i}"]) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records, {r["question"]: r["answers"][0] for r in records if r["id"] in known}


def test_wilson_interval_against_hand_computed_values():
    for mean, count, want in ((0.8, 10, (0.4902, 0.9433)), (0.6, 5, (0.2307, 0.8824)), (0.0, 10, (0.0, 0.2775)),
                              (1.0, 10, (0.7225, 1.0)), (0.5, 100, (0.4038, 0.5962))):
        assert ev.wilson(mean, count) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("mode", ["agent", "direct"])
def test_accuracy_is_the_mean_over_questions_and_rollouts(tmp_path, mode):
    _, known = qa_file(tmp_path / "qa.jsonl", 5, known=("q0", "q2", "q3"))
    res = ev.evaluate(None, TOK, [f"jsonl:{tmp_path / 'qa.jsonl'}"], ["1"], 5, ORACLE_AGENT, mode=mode, n=2,
                      temperature=0.7, engine=Oracle(known))
    (row,) = res["results"]
    assert (row["samples"], row["n"], row["errors"]) == (5, 2, 0)
    assert row["accuracy"] == 0.6  # 3 of 5 known, each rollout right
    # Wilson over the 5 questions, the independent draws: a question's 2 rollouts are not 2 more trials
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.2307, 0.8824), abs=1e-4)
    assert [(p["id"], p["rollout"], p["score"]) for p in res["predictions"]] == [
        (f"q{i}", k, float(f"q{i}" in ("q0", "q2", "q3"))) for i in range(5) for k in range(2)]
    assert row["tokens_read"] == 100 and row["doc_tokens"] == 100  # the whole context, read or fitted
    assert res["complete"]


def test_out_keeps_finished_cells_when_the_sweep_crashes(tmp_path):
    _, known = qa_file(tmp_path / "a.jsonl", 2, known=("q0",))
    records, _ = qa_file(tmp_path / "b.jsonl", 2)
    out = tmp_path / "res.json"
    tasks = [f"jsonl:{tmp_path / 'a.jsonl'}", f"jsonl:{tmp_path / 'b.jsonl'}"]
    (tmp_path / "b.jsonl").write_text(json.dumps(dict(records[0], question="boom")) + "\n")
    with pytest.raises(RuntimeError, match="crashed"):
        ev.evaluate(None, TOK, tasks, ["1"], 2, ORACLE_AGENT, engine=Oracle(known, fail_on="boom"), out=str(out))
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and [(r["task"], r["accuracy"]) for r in saved["results"]] == [("a", 0.5)]
    ev.evaluate(None, TOK, tasks, ["1"], 2, ORACLE_AGENT, engine=Oracle(known), out=str(out))
    saved = json.loads(out.read_text())
    assert saved["complete"] is True and [r["task"] for r in saved["results"]] == ["a", "b"]


def test_every_input_is_checked_before_the_first_cell(tmp_path):
    qa_file(tmp_path / "qa.jsonl", 2)
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "bad.json").write_text("[{}]")
    good = [f"jsonl:{tmp_path / 'qa.jsonl'}"]
    engine = Oracle({})
    for kw, match in ((dict(samples=0), "'eval.samples' must be >= 1, got 0"), (dict(n=0), "'eval.n' must be"),
                      (dict(n=3), "eval.n=3 at eval.temperature=0 repeats one greedy rollout"),
                      (dict(out=str(tmp_path / "qa.jsonl")), "would overwrite .*qa.jsonl.*which this run reads"),
                      (dict(out=str(tmp_path / "r.json"), traces=str(tmp_path / "r.json")), "is also out"),
                      (dict(out=str(tmp_path / "no" / "r.json")), "out .*no such directory"),
                      (dict(traces=str(tmp_path)), "traces .*cannot write"),
                      (dict(tasks=good + [f"jsonl:{tmp_path / 'bad.jsonl'}"]), "bad.jsonl:1: missing field"),
                      (dict(tasks=good + [f"hotpotqa:{tmp_path / 'bad.json'}"]), r"bad.json\[0\]: missing field '_id'"),
                      (dict(tasks=good + ["niah_single"]), "too short")):
        args = dict(tasks=good, lengths=["1"], samples=2, n=1) | kw
        with pytest.raises(ValueError, match=match):
            ev.evaluate(None, TOK, args.pop("tasks"), args.pop("lengths"), args.pop("samples"), ORACLE_AGENT,
                        engine=engine, **args)
        assert engine.ids == 0  # nothing ran


def test_an_output_another_live_run_writes_is_refused(tmp_path):
    qa_file(tmp_path / "qa.jsonl", 2)
    other = Outputs()
    other.claim(str(tmp_path / "r.json"), "--out")  # a run in progress holds it
    with pytest.raises(ValueError, match="being written by another run"):
        ev.evaluate(None, TOK, [f"jsonl:{tmp_path / 'qa.jsonl'}"], ["1"], 2, ORACLE_AGENT, engine=Oracle({}),
                    out=str(tmp_path / "r.json"))
    other.release()
    ev.evaluate(None, TOK, [f"jsonl:{tmp_path / 'qa.jsonl'}"], ["1"], 2, ORACLE_AGENT, engine=Oracle({}),
                out=str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["complete"]


def test_traces_hold_each_rollouts_memories_and_answer(tmp_path):
    _, known = qa_file(tmp_path / "qa.jsonl", 2, known=("q1",))
    ev.evaluate(None, TOK, [f"jsonl:{tmp_path / 'qa.jsonl'}"], ["1"], 2, ORACLE_AGENT, n=2, temperature=1.0,
                engine=Oracle(known), traces=str(tmp_path / "t.jsonl"))
    lines = [json.loads(l) for l in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [(l["id"], l["rollout"], l["memories"], l["answer"], l["score"]) for l in lines] == [
        ("q0", 0, ["read"] * 3, "unknown", 0.0), ("q0", 1, ["read"] * 3, "unknown", 0.0),
        ("q1", 0, ["read"] * 3, "room 1", 1.0), ("q1", 1, ["read"] * 3, "room 1", 1.0)]


@pytest.mark.parametrize("kind", ["jsonl", "hotpotqa"])
def test_closed_book_keeps_only_the_questions_the_model_cannot_answer(tmp_path, kind):
    records, known = qa_file(tmp_path / "qa.jsonl", 4, known=("q1", "q2"))
    if kind == "hotpotqa":  # the raw HotpotQA layout, one item per line
        records = [dict(_id=r["id"], question=r["question"], answer=r["answers"][0], supporting_facts=[["T", 0]],
                        context=[["T", [r["context"]]]], level="easy") for r in records]
        (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    kept_records, questions = ev.question_file(kind, tmp_path / "qa.jsonl")
    engine = Oracle(known)
    answered, failed = ev.closed_book(engine, TOK, questions, ev.SamplingParams(temperature=0.0), n=2)
    assert answered == [False, True, True, False] and failed == 0 and kept_records == records
    assert all("<section>" not in p and "<memory>" not in p and "\\boxed{}" in p for p in engine.prompts)
    assert len(engine.prompts) == 8  # two answers to each question

    class Chatty(Oracle):  # the gold anywhere in an answer, boxed or not, drops the question too
        def reply(self, rid, prompt, params):
            text = TOK.decode(prompt)
            reply = {"lamp 0?": "it may be in Room 0 I think", "lamp 3?": "\\boxed{Room 3.}"}
            said = next((r for q, r in reply.items() if q in text), "\\boxed{nowhere}")
            ids = TOK.encode(said) + [1]
            return Completion(ids, [0.0] * len(ids), "stop", None, rid)
    answered, _ = ev.closed_book(Chatty({}), TOK, questions, ev.SamplingParams(), n=1)
    assert answered == [True, False, False, True]

    class Refusing(Oracle):  # every rollout of question 3 fails, as a prompt too long for the window would
        def step(self):
            start, out = len(self.prompts), super().step()
            return [Completion([], [], "error", "too long", c.request_id) if "lamp 3?" in p else c
                    for c, p in zip(out, self.prompts[start:])]
    answered, failed = ev.closed_book(Refusing(known), TOK, questions, ev.SamplingParams(), n=2)
    assert answered == [False, True, True, None] and failed == 2  # a failure is not "unanswerable"


@pytest.mark.parametrize("mode", ["agent", "direct"])
def test_evaluate_in_process(checkpoint, mode):
    _, model, tok = checkpoint
    res = ev.evaluate(model, tok, ["niah_single", "vt"], ["300", "1200"], 2, AGENT, mode=mode, n=2,
                      temperature=1.0, top_p=0.9)
    assert [(r["task"], r["length"]) for r in res["results"]] == [
        ("niah_single", 300), ("niah_single", 1200), ("vt", 300), ("vt", 1200)]
    assert len(res["predictions"]) == 16 and res["complete"]
    assert AgentConfig(**res["config"]["agent"]) == AGENT
    json.loads(json.dumps(res))  # serialisable as is
    for r in res["results"]:
        assert set(r) == ROW_KEYS and r["mode"] == mode and (r["samples"], r["n"], r["errors"]) == (2, 2, 0)
        preds = [p for p in res["predictions"] if (p["task"], p["length"]) == (r["task"], r["length"])]
        assert r["accuracy"] == sum(p["score"] for p in preds) / 4
        assert (r["ci_low"], r["ci_high"]) == ev.wilson(r["accuracy"], 2)  # over the 2 questions
    for p in res["predictions"]:
        assert set(p) == PRED_KEYS and p["error"] is None
        doc = next(s for s in make_samples(p["task"], p["length"], tok, 2) if s.id == p["id"]).meta["doc_tokens"]
        assert p["doc_tokens"] == doc
        if mode == "agent":
            assert p["tokens_read"] == doc
        else:  # cut in the middle to the window: 1024 positions less the answer and the prompt frame
            assert p["tokens_read"] == doc if p["length"] == 300 else 700 < p["tokens_read"] < 1024 - 4 < doc


def test_files_hotpotqa_and_a_failing_sample(checkpoint, tmp_path):
    _, model, tok = checkpoint
    lines = [dict(id="long-q", question="why " * 200, context="text", answers=["x"]),
             dict(id="ok", question="What is it?", context="It is blue.", answers=["blue"])]
    (tmp_path / "qa.jsonl").write_text("\n".join(map(json.dumps, lines)))
    items = [dict(_id=f"h{i}", question=f"Where is lamp {i}?", answer="attic", supporting_facts=[[f"T{i}", 0]],
                  context=[[f"T{i}", [f"Lamp {i} is in the attic."]], [f"U{i}", ["The sky is wide."]]])
             for i in range(3)]
    (tmp_path / "hotpot.json").write_text(json.dumps(items))
    res = ev.evaluate(model, tok, [f"jsonl:{tmp_path / 'qa.jsonl'}", f"hotpotqa:{tmp_path / 'hotpot.json'}"],
                      ["2", "4"], 5, AGENT)
    assert [(r["task"], r["length"], r["samples"], r["errors"]) for r in res["results"]] == [
        ("qa", None, 2, 1), ("hotpotqa", 2, 3, 0), ("hotpotqa", 4, 3, 0)]
    bad, ok = res["predictions"][:2]  # the failing sample scores 0, keeps its error, and the run goes on
    assert bad["score"] == 0 and "question_tokens=64" in bad["error"] and ok["error"] is None
    assert all(p["tokens_read"] > 0 for p in res["predictions"][1:])


def test_bad_arguments(checkpoint, tmp_path, capsys):
    path, model, tok = checkpoint
    for tasks, lengths, match in ((["nope"], ["8k"], "unknown task 'nope'"),
                                  (["niah_single"], ["8x"], "bad length '8x'"),
                                  (["hotpotqa:/no/such.json"], ["50"], "no such file")):
        with pytest.raises(ValueError, match=match):
            ev.evaluate(model, tok, tasks, lengths, 1, AGENT)
        with pytest.raises(SystemExit, match=match):
            ev.main(["--model", str(path), "--tasks", ",".join(tasks), "--lengths", ",".join(lengths)])
    (tmp_path / "old.json").write_text('{"results": []}')
    for argv, match in ((["--samples", "0"], "'samples' must be >= 1, got 0"),
                        (["--agent.chunk_tokens", "0"], "'agent.chunk_tokens' must be"),
                        (["--chunk-tokens", "0"], "unknown key 'chunk_tokens'"),
                        (["--protocol", "memagent", "--temperature", "1"], "--protocol memagent fixes --temperature"),
                        (["--protocol", "memagent"], "scores hotpotqa or jsonl questions"),
                        (["--closed-book", str(tmp_path / "cb.jsonl")], "--closed-book takes one hotpotqa"),
                        (["--out", str(tmp_path / "no" / "r.json")], "no such directory"),
                        (["--report", str(tmp_path / "old.json")], "give --model to run a sweep, or --report"),
                        (["--n", "2"], "repeats one greedy rollout"), (["--device", "gpu9"], "'device' 'gpu9'")):
        with pytest.raises(SystemExit, match=re.escape(match)):
            ev.main(["--model", str(path), "--lengths", "300"] + argv)
    with pytest.raises(SystemExit, match="old.json: not eval.py results"):
        ev.main(["--report", str(tmp_path / "old.json")])
    assert ev.hotpotqa_docs("50") == 50 and ev.hotpotqa_docs("28k") == 200 and ev.hotpotqa_docs("3.5m") == 25600


def settings(*argv):
    return ev.SweepSettings.from_argv(["--model", f"{ROOT}/checkpoints/tiny", "--tasks", "jsonl:q.jsonl", *argv])


def test_protocol_memagent_is_the_release_evaluation():
    args = settings("--protocol", "memagent")
    assert (args.temperature, args.top_p, args.samples, args.n, args.seed) == (0.7, 0.95, 128, 1, 0)
    assert args.lengths == "50,100,200,400,800,1600,3200,6400,12800,25600"
    args = settings("--protocol", "memagent", "--lengths", "50")
    assert args.lengths == "50" and args.temperature == 0.7
    args = settings()
    assert (args.temperature, args.top_p, args.samples, args.n, args.lengths) == (0.0, 1.0, 64, 1, "8k")
    assert args.frame == "boxed"
    # the release's final turn asks for "Therefore, the answer is ..."; the boxed frame is one flag away
    assert settings("--protocol", "memagent").frame == "answer_is"
    args = settings("--protocol", "memagent", "--frame", "boxed")
    assert args.frame == "boxed" and args.temperature == 0.7
    args = settings("--closed-book", "out.jsonl")
    assert (args.n, args.temperature, args.top_p, args.samples) == (2, 1.0, 0.7, None)  # the release's filter


def test_protocol_ruler_and_essay_tasks(tmp_path):
    args = settings("--protocol", "ruler")
    assert args.lengths == "8k,16k,32k,64k,128k,256k,512k" and (args.samples, args.frame) == (128, "answer_is")
    (tmp_path / "essay.txt").write_text("One sentence. Another one.")
    cells = ev.plan([f"niah_single_2:{tmp_path / 'essay.txt'}", "niah_multikey_2"], ["1k"])
    assert cells == [("niah_single_2", "niah_single_2", str(tmp_path / "essay.txt"), 1024),
                     ("niah_multikey_2", "niah_multikey_2", None, 1024)]
    for spec, match in (("niah_single_2", "reads its haystack from a text file"),
                        (f"niah_single_2:{tmp_path / 'no.txt'}", "no such file"),
                        (f"niah_single_1:{tmp_path / 'essay.txt'}", "unknown task")):
        with pytest.raises(ValueError, match=match):
            ev.plan([spec], ["1k"])
    assert set(ev.RULER_TASKS) <= set(ev.TASKS) | set(ev.RULER_QA)
    for d in ("a", "b"):  # two files of one name: their cells are named by file, else their rows would merge
        (tmp_path / d).mkdir()
        (tmp_path / d / "dev.jsonl").write_text("")
    cells = ev.plan([f"jsonl:{tmp_path / 'a' / 'dev.jsonl'}", f"jsonl:{tmp_path / 'b' / 'dev.jsonl'}"], ["1"])
    assert [name for name, *_ in cells] == [f"dev:{tmp_path / d / 'dev.jsonl'}" for d in ("a", "b")]
    assert len(ev.plan(["niah_single", "niah_single"], ["1k", "1024"])) == 1  # one cell, run once


def test_ruler_qa_cells_run_and_score(tmp_path):
    from test_tasks import squad_file
    path = squad_file(tmp_path, articles=2, paragraphs=2)
    assert ev.plan([f"qa_1:{path}"], ["300", "1k"]) == [("qa_1", "qa_1", str(path), 300),
                                                        ("qa_1", "qa_1", str(path), 1024)]
    known = {"What colour is item 01?": "Blue"}
    res = ev.evaluate(None, TOK, [f"qa_1:{path}"], ["300"], 4, ORACLE_AGENT, engine=SaysTheAnswerIs(known),
                      frame="answer_is")
    assert [p["score"] for p in res["predictions"]] == [0.0, 1.0, 0.0, 0.0]
    assert res["results"][0]["doc_tokens"] <= 300 and res["results"][0]["task"] == "qa_1"


class SaysTheAnswerIs(Oracle):
    """Answers as the release's evaluation asks: "Therefore, the answer is ..." when the prompt asks for it."""

    def reply(self, rid, prompt, params):
        text = TOK.decode(prompt)
        if "<section>" in text or "the answer is" not in text:
            return super().reply(rid, prompt, params)
        problem = re.search(r"<problem>\n(.*?)\n</problem>", text, re.S).group(1)
        ids = TOK.encode(f"Therefore, the answer is {self.known.get(problem, 'unknown')}.") + [1]
        return Completion(ids, [0.0] * len(ids), "stop", None, rid)


@pytest.mark.parametrize("mode", ["agent", "direct"])
def test_answer_is_frame_asks_and_scores_as_the_release(tmp_path, mode):
    _, known = qa_file(tmp_path / "qa.jsonl", 3, known=("q1",))
    task = [f"jsonl:{tmp_path / 'qa.jsonl'}"]
    engine = SaysTheAnswerIs(known)
    res = ev.evaluate(None, TOK, task, ["1"], 3, ORACLE_AGENT, mode=mode, engine=engine, frame="answer_is")
    assert [(p["answer"], p["score"]) for p in res["predictions"]] == [("unknown", 0.0), ("room 1", 1.0),
                                                                      ("unknown", 0.0)]
    assert res["config"]["frame"] == "answer_is"
    assert all("\\boxed" not in p for p in engine.prompts if "<section>" not in p)
    # the same model asked for a box: the boxed frame and its scorer
    res = ev.evaluate(None, TOK, task, ["1"], 3, ORACLE_AGENT, mode=mode, engine=SaysTheAnswerIs(known))
    assert [p["score"] for p in res["predictions"]] == [0.0, 1.0, 0.0] and res["predictions"][1]["answer"] == "room 1"


def test_cli_reads_agent_json_then_reports_from_saved_results(checkpoint, tmp_path, monkeypatch, capsys):
    path, _, _ = checkpoint
    AGENT.save(path)
    out = tmp_path / "run.json"
    cmd = [sys.executable, "eval.py", "--model", str(path), "--tasks", "niah_single", "--lengths", "300",
           "--samples", "2", "--agent.answer_tokens", "3", "--label", "micro", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert "niah_single" in proc.stdout and "tok/s" in proc.stdout
    res = json.loads(out.read_text())
    assert res["config"]["label"] == "micro" and res["config"]["samples"] == 2 and res["complete"]
    assert AgentConfig(**res["config"]["agent"]) == replace(AGENT, answer_tokens=3)  # agent.json, then the flag
    assert len(res["results"]) == 1 and len(res["predictions"]) == 2

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    (tmp_path / "again").mkdir()
    again = tmp_path / "again" / "run.json"
    again.write_text(out.read_text().replace('"accuracy": ', '"accuracy": 0.5, "was": '))  # another run, one label
    ev.main(["--report", f"{out},{again}", "--plot", str(tmp_path / "a.png"), "--markdown"])
    printed = capsys.readouterr().out
    assert "matplotlib is not installed" in printed and not (tmp_path / "a.png").exists()
    assert "| run | 300 |" in printed and f"| micro ({out}) (agent) |" in printed
    assert f"| micro ({again}) (agent) | 50.0 [" in printed  # both rows, each named by its file


def test_cli_closed_book_writes_the_input_layout(checkpoint, tmp_path):
    path, _, _ = checkpoint
    items = [dict(_id=f"h{i}", question=f"Where is lamp {i}?", answer="attic", supporting_facts=[[f"T{i}", 0]],
                  context=[[f"T{i}", [f"Lamp {i} is in the attic."]]], type="bridge") for i in range(3)]
    (tmp_path / "hotpot.json").write_text(json.dumps(items))
    ev.main(["--model", str(path), "--tasks", f"hotpotqa:{tmp_path / 'hotpot.json'}", "--closed-book",
             str(tmp_path / "hard.jsonl"), "--agent.chunk_tokens", "256", "--agent.answer_tokens", "4"])
    # a random model answers nothing: every item is kept, as it was, one per line
    assert [json.loads(l) for l in (tmp_path / "hard.jsonl").read_text().splitlines()] == items


def test_plot_has_a_panel_per_task(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    row = dict(task="vt", length=8192, mode="agent", samples=1, accuracy=0.5, ci_low=0.1, ci_high=0.9,
               tokens_read=8000, doc_tokens=8000, seconds=1.0, tokens_per_s=8000.0, errors=0)
    runs = [("a", dict(results=[row, dict(row, length=32768, doc_tokens=32000), dict(row, task="fwe")])),
            ("b", dict(results=[dict(row, mode="direct")]))]
    figures = []
    real = plt.subplots
    monkey = pytest.MonkeyPatch()
    monkey.setattr(plt, "subplots", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    monkey.setattr(plt, "close", lambda fig: None)
    try:
        assert ev.plot(runs, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 0
    finally:
        monkey.undo()
    (fig, axes), = figures
    assert [ax.get_title() for ax in axes[0]] == ["vt", "fwe"]
    assert [line.get_label() for line in axes[0][0].get_lines()] == ["a (agent)", "b (direct)"]
    assert axes[0][0].get_xscale() == "log" and axes[0][1].get_shared_y_axes().joined(axes[0][0], axes[0][1])


SWEEP_KEYS = [f.name for f in __import__("dataclasses").fields(ev.SweepSettings) if f.name != "agent"] + \
             ["agent.chunk_tokens", "agent.template"]


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(values=st.dictionaries(st.sampled_from(SWEEP_KEYS), st.one_of(
    st.integers(-3, 2**64), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.lists(st.text(max_size=3), max_size=2),
    st.sampled_from(["", "abc", "8k", "memagent", "ruler", "answer_is", "direct", "jsonl:x.jsonl", "cpu", "0.5"])),
    max_size=4))
def test_any_sweep_settings_file_builds_checked_settings_or_is_refused_by_key(values, tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "s.json"
    path.write_text(json.dumps(values))
    try:
        args = ev.SweepSettings.from_argv(["--config", str(path)])
    except ValueError as e:  # a key named, or the rule between keys that it breaks
        assert any(k.split(".")[-1] in str(e) for k in values) or "--model" in str(e), e
        return
    assert bool(args.model) != bool(args.report) and args.n >= 1 and args.frame in ev.FRAMES
    assert not (args.n > 1 and args.temperature == 0) and args.device and args.dtype


def test_what_a_sweep_reads_and_writes_is_checked_first(checkpoint, tmp_path, monkeypatch):
    path, _, _ = checkpoint
    (tmp_path / "s.json").write_text(json.dumps({"model": str(path), "lengths": "300", "samples": 1}))
    (tmp_path / "empty.jsonl").write_text("\n")
    qa_file(tmp_path / "qa.jsonl", 2)
    qa = f"jsonl:{tmp_path / 'qa.jsonl'}"
    for argv, match in ((["--config", str(tmp_path / "s.json"), "--out", str(tmp_path / "s.json")],
                         "would overwrite .*s.json.*which this run reads"),  # the settings file is an input
                        (["--tasks", qa, "--closed-book", str(tmp_path / "c.jsonl"), "--protocol", "memagent"],
                         "no --protocol"),
                        (["--tasks", f"jsonl:{tmp_path / 'empty.jsonl'}"], "empty.jsonl: holds no records"),
                        (["--samples", "none"], "'samples' must be >= 1, got None"),
                        (["--model", str(tmp_path / "none")], "'model': .*none' is neither a checkpoint"),
                        (["--model", "micro"], "give --tokenizer"),
                        (["--device", "meta"], "'device' 'meta': expected cpu or cuda")):
        with pytest.raises(SystemExit, match=match):
            ev.main(["--model", str(path), "--lengths", "300", *argv])
    assert json.loads((tmp_path / "s.json").read_text())["samples"] == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="'device' 'cuda': this torch has no CUDA device"):
        ev.main(["--model", str(path), "--device", "cuda"])


def test_reports_refuse_rows_they_cannot_draw_and_mark_unfinished_runs(tmp_path, capsys):
    row = dict(task="vt", length=8192, mode="agent", samples=1, accuracy=0.5, ci_low=0.1, ci_high=0.9,
               tokens_read=8000, doc_tokens=8000, seconds=1.0, tokens_per_s=8000.0, errors=0)
    for bad in (dict(accuracy="0.5"), dict(accuracy=None), dict(length="1k"), dict(task=3)):
        (tmp_path / "r.json").write_text(json.dumps(dict(config={}, results=[row | bad])))
        with pytest.raises(SystemExit, match="r.json: not eval.py results"):
            ev.main(["--report", str(tmp_path / "r.json"), "--markdown"])
    (tmp_path / "r.json").write_text(json.dumps(dict(config={"label": "half"}, complete=False, results=[row])))
    ev.main(["--report", str(tmp_path / "r.json"), "--markdown"])
    assert "| half (incomplete) (agent) | 50.0 [10.0, 90.0] |" in capsys.readouterr().out
