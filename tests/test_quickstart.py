"""The README's quickstart, run as a new user runs it: its one command, with the shipped agent and the
shipped example document, prints the right answer."""
import os
import re
import shlex

import memory_agent
from tasks import document_text, make_samples
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_command():
    """The README's one line that runs memory_agent.py, split as a shell would."""
    lines = [l.strip() for l in open(os.path.join(ROOT, "README.md")) if l.strip().startswith("python memory_agent.py")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def example_sample():
    """examples/haystack.txt is niah_single sample 1 of seed 2026 at 1K tokens of the tiny agents'
    tokenizer: the kind of document they were trained to read."""
    tok = load_tokenizer(os.path.join(ROOT, "checkpoints/tiny"))
    return make_samples("niah_single", "1k", tok, 2, seed=2026)[1]


def test_example_document_is_a_synthetic_haystack_sample():
    sample = example_sample()
    with open(os.path.join(ROOT, "examples/haystack.txt")) as f:
        assert f.read().rstrip("\n") == document_text(sample)
    args = readme_command()
    assert args[args.index("--question") + 1] == sample.question


def test_readme_quickstart_answers_its_question(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository root
    args = readme_command()
    assert args[:2] == ["python", "memory_agent.py"]
    memory_agent.main(args[2:])
    out = capsys.readouterr().out
    assert out.count("--- memory after chunk") == 8  # 1,020 tokens in chunks of 128
    assert re.search(r"^boxed: (.*)$", out, re.M)[1] == example_sample().answers[0], out
