# bench/mutate.py on a tiny module: the mutation check finds the operators a test does not pin down.
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import mutate  # noqa: E402

MODULE = '''"""A docstring with + and < in it is not mutated."""


def clamp_add(a, b, hi):
    # a comment with - and == is not mutated either
    return min(a + b, hi)


def is_small(x):
    return x < 10


def at_least_one(x):
    return max(x, 1)  # pragma: no mutate  an example of a marked line
'''

TESTS = '''from tiny import clamp_add, is_small


def test_clamp_add():
    assert clamp_add(2, 3, 100) == 5 and clamp_add(2, 3, 4) == 4


def test_is_small():
    assert is_small(3) and not is_small(20)  # 10 itself is never tried: `<=` survives
'''


def test_enumerates_flips_outside_docstrings_comments_and_marked_lines():
    got = [(line, mutate.apply(MODULE, m).splitlines()[line - 1].strip())
           for m in mutate.mutants(MODULE) for line in [m[0]]]
    assert got == [(6, "return max(a + b, hi)"), (6, "return min(a - b, hi)"), (10, "return x <= 10")]
    source = "x = f(0, 1, 2, True, 1.0)\n"
    assert [mutate.apply(source, m) for m in mutate.mutants(source, constants=True)] == [
        "x = f(1, 1, 2, True, 1.0)\n", "x = f(0, 0, 2, True, 1.0)\n", "x = f(0, 1, 2, False, 1.0)\n"]


def test_kills_a_pinned_mutant_and_reports_a_survivor(tmp_path, capsys):
    (tmp_path / "tiny.py").write_text(MODULE)
    (tmp_path / "test_tiny.py").write_text(TESTS)
    counts = mutate.main(["tiny.py", "test_tiny.py", "--root", str(tmp_path), "--timeout", "60"])
    assert counts == {"failed": 2, "passed": 1, "timeout": 0}
    out = capsys.readouterr().out
    assert "survived  tiny.py:10: return x <= 10" in out and "killed 2 of 3 (66.7%)" in out
    assert (tmp_path / "tiny.py").read_text() == MODULE  # the real file is never touched
