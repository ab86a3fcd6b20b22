"""eval.py: the in-process sweep in agent and direct mode, the JSON schema, the CLI, bad arguments, reports.

A random tiny model answers nothing right, so the tests check structure and counts, not accuracy.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as ev
from model import TINY_CONFIGS, Transformer
from tasks import document_text, make_samples
from tokenizer import train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(chunk_tokens=256, memory_tokens=8, answer_tokens=4, question_tokens=64)
ROW_KEYS = {"task", "length", "mode", "samples", "accuracy", "tokens_read", "doc_tokens", "seconds",
            "tokens_per_s", "errors"}
PRED_KEYS = {"task", "length", "id", "answer", "answers", "score", "error", "answer_text", "tokens_read"}


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


@pytest.mark.parametrize("mode", ["agent", "direct"])
def test_evaluate_in_process(checkpoint, mode):
    _, model, tok = checkpoint
    res = ev.evaluate(model, tok, ["niah_single", "vt"], ["300", "1200"], 2, mode=mode, **KW)
    assert [(r["task"], r["length"]) for r in res["results"]] == [
        ("niah_single", 300), ("niah_single", 1200), ("vt", 300), ("vt", 1200)]
    assert len(res["predictions"]) == 8
    json.loads(json.dumps(res))  # serialisable as is
    for r in res["results"]:
        assert set(r) == ROW_KEYS and r["mode"] == mode and r["samples"] == 2 and r["errors"] == 0
        assert 0 <= r["accuracy"] <= 1 and r["seconds"] > 0
    for p in res["predictions"]:
        assert set(p) == PRED_KEYS and 0 <= p["score"] <= 1 and p["error"] is None
        doc = next(s for s in make_samples(p["task"], p["length"], tok, 2) if s.id == p["id"]).meta["doc_tokens"]
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
                      ["2", "4"], 5, **KW)
    assert [(r["task"], r["length"], r["samples"], r["errors"]) for r in res["results"]] == [
        ("qa", None, 2, 1), ("hotpotqa", 2, 3, 0), ("hotpotqa", 4, 3, 0)]
    bad, ok = res["predictions"][:2]  # the failing sample scores 0, keeps its error, and the run goes on
    assert bad["score"] == 0 and "question_tokens=64" in bad["error"] and ok["error"] is None
    assert all(0 <= p["score"] <= 1 and p["tokens_read"] > 0 for p in res["predictions"][1:])


def test_bad_arguments(checkpoint, capsys):
    path, model, tok = checkpoint
    for tasks, lengths, match in ((["nope"], ["8k"], "unknown task 'nope'"),
                                  (["niah_single"], ["8x"], "bad length '8x'"),
                                  (["hotpotqa:/no/such.json"], ["50"], "no such file")):
        with pytest.raises(ValueError, match=match):
            ev.evaluate(model, tok, tasks, lengths, 1, **KW)
        with pytest.raises(SystemExit) as e:
            ev.main(["--model", str(path), "--tasks", ",".join(tasks), "--lengths", ",".join(lengths)])
        assert e.value.code == 2 and match in capsys.readouterr().err
    assert ev.hotpotqa_docs("50") == 50 and ev.hotpotqa_docs("28k") == 200 and ev.hotpotqa_docs("3.5m") == 25600


def test_cli_then_reports_from_saved_results(checkpoint, tmp_path, monkeypatch, capsys):
    path, _, _ = checkpoint
    out = tmp_path / "run.json"
    cmd = [sys.executable, "eval.py", "--model", str(path), "--tasks", "niah_single", "--lengths", "300",
           "--samples", "2", "--chunk-tokens", "256", "--memory-tokens", "8", "--answer-tokens", "4",
           "--question-tokens", "64", "--label", "micro", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert "niah_single" in proc.stdout and "tok/s" in proc.stdout
    res = json.loads(out.read_text())
    assert res["config"]["label"] == "micro" and res["config"]["samples"] == 2
    assert len(res["results"]) == 1 and len(res["predictions"]) == 2

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    ev.main(["--from", str(out), str(out), "--plot", str(tmp_path / "a.png"), "--markdown"])
    printed = capsys.readouterr().out
    assert "matplotlib is not installed" in printed and not (tmp_path / "a.png").exists()
    assert "| run | 300 |" in printed and "| micro (agent) |" in printed


def test_plot_overlays_runs(tmp_path):
    pytest.importorskip("matplotlib")
    row = dict(task="vt", length=8192, mode="agent", samples=1, accuracy=0.5, tokens_read=8000, doc_tokens=8000,
               seconds=1.0, tokens_per_s=8000.0, errors=0)
    runs = [("a", dict(results=[row, dict(row, length=32768, doc_tokens=32000)])), ("b", dict(results=[row]))]
    assert ev.plot(runs, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 0
