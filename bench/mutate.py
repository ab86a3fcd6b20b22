"""
Mutation check: do the tests fail when the math is wrong?

For each mutant of one source file (one operator flipped: + -, * /, < <=, > >=, == !=, and or,
min max; with --constants also 0 1 and True False) run the given test files, with pytest -x, in a
temporary copy of the repository, and count the mutants the tests kill. The real file is never
touched. A mutant on a line that ends in `# pragma: no mutate  <reason>` is skipped: mark only lines
whose mutants cannot change behaviour (a tie that gives the same result either way, a metric's
boundary).

    OMP_NUM_THREADS=1 python bench/mutate.py dapo.py tests/test_dapo.py
    OMP_NUM_THREADS=1 python bench/mutate.py rollout.py tests/test_rollout.py --sample 60 --seed 0

Too slow for CI: each mutant reruns the tests (a timed-out run counts as killed).
"""
import argparse
import ast
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

PRAGMA = "# pragma: no mutate"
# AST operator -> (a regex that finds exactly its token in the source, the flipped token)
FLIPS = {
    ast.Add: (r"\+", "-"), ast.Sub: (r"-", "+"),
    ast.Mult: (r"(?<!\*)\*(?!\*)", "/"), ast.Div: (r"(?<!/)/(?!/)", "*"),
    ast.Lt: (r"<(?![=<])", "<="), ast.LtE: (r"<=", "<"),
    ast.Gt: (r"(?<!-)>(?![=>])", ">="), ast.GtE: (r">=", ">"),
    ast.Eq: (r"==", "!="), ast.NotEq: (r"!=", "=="),
    ast.And: (r"\band\b", "or"), ast.Or: (r"\bor\b", "and"),
}
NAMES = {"min": "max", "max": "min"}
CONSTANTS = {(int, 0): "1", (int, 1): "0", (bool, True): "False", (bool, False): "True"}  # 1 == True as a key


def mutants(source, constants=False):
    """-> [(line, start offset, end offset, replacement)], offsets into source.encode()."""
    data = source.encode()
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def offset(line, col):  # ast columns count UTF-8 bytes
        return starts[line - 1] + col

    def between(left, right, op):  # the operator token in the gap between two operands
        pattern, new = FLIPS[type(op)]
        a, b = offset(left.end_lineno, left.end_col_offset), offset(right.lineno, right.col_offset)
        gap = re.sub(rb"#[^\n]*", lambda m: b" " * len(m.group()), data[a:b])  # ignore comments
        m = re.search(pattern.encode(), gap)
        if m:
            line = left.end_lineno + gap[:m.start()].count(b"\n")
            return line, a + m.start(), a + m.end(), new

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and type(node.op) in FLIPS:
            found.append(between(node.left, node.right, node.op))
        elif isinstance(node, ast.AugAssign) and type(node.op) in FLIPS:
            found.append(between(node.target, node.value, node.op))
        elif isinstance(node, ast.Compare):
            for left, op, right in zip([node.left] + node.comparators, node.ops, node.comparators):
                if type(op) in FLIPS:
                    found.append(between(left, right, op))
        elif isinstance(node, ast.BoolOp):
            for left, right in zip(node.values, node.values[1:]):
                found.append(between(left, right, node.op))
        elif isinstance(node, ast.Name) and node.id in NAMES:
            found.append((node.lineno, offset(node.lineno, node.col_offset),
                          offset(node.lineno, node.end_col_offset), NAMES[node.id]))
        elif constants and isinstance(node, ast.Constant) and (type(node.value), node.value) in CONSTANTS:
            found.append((node.lineno, offset(node.lineno, node.col_offset),
                          offset(node.end_lineno, node.end_col_offset), CONSTANTS[type(node.value), node.value]))
    lines = source.splitlines()
    return sorted(m for m in found if m and PRAGMA not in lines[m[0] - 1])


def apply(source, mutant):
    _, a, b, new = mutant
    data = source.encode()
    return (data[:a] + new.encode() + data[b:]).decode()


def copy_repo(root, dst):
    """Copy the files git knows (tracked and untracked, not ignored), or everything but caches."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(root, f))]
    except (subprocess.CalledProcessError, FileNotFoundError):
        files = []
        for d, dirs, names in os.walk(root):
            dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
            files += [os.path.relpath(os.path.join(d, f), root) for f in names]
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
        shutil.copy(os.path.join(root, f), os.path.join(dst, f))  # fresh mtimes: no stale bytecode


def run_tests(repo, tests, timeout):
    """-> 'passed', 'failed' or 'timeout'."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "passed" if r.returncode == 0 else "failed"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="source file to mutate, relative to --root")
    p.add_argument("tests", nargs="+", help="test files to run, relative to --root")
    p.add_argument("--root", default=".", help="repository root (default: the current directory)")
    p.add_argument("--sample", type=int, default=0, help="test a random sample of this many mutants (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="mutants tested at once, each in its own copy")
    p.add_argument("--timeout", type=float, default=0, help="seconds per mutant (default: 3x the clean run + 10)")
    p.add_argument("--constants", action="store_true", help="also flip 0 <-> 1 and True <-> False")
    args = p.parse_args(argv)

    root = os.path.abspath(args.root)
    with open(os.path.join(root, args.file), encoding="utf-8") as f:
        source = f.read()
    todo = mutants(source, args.constants)
    total = len(todo)
    if args.sample and args.sample < total:
        todo = sorted(random.Random(args.seed).sample(todo, args.sample))
    print(f"{args.file}: {total} mutants, testing {len(todo)} with {' '.join(args.tests)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        copies = queue.Queue()
        for j in range(args.jobs):
            copy_repo(root, os.path.join(tmp, str(j)))
            copies.put(os.path.join(tmp, str(j)))
        t0 = time.time()
        if run_tests(os.path.join(tmp, "0"), args.tests, None) != "passed":
            sys.exit("the tests fail on the unmutated code: fix them first")
        timeout = args.timeout or 3 * (time.time() - t0) + 10

        def check(mutant):
            repo = copies.get()
            path = os.path.join(repo, args.file)
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(apply(source, mutant))
                return run_tests(repo, args.tests, timeout)
            finally:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(source)
                copies.put(repo)

        lines = source.splitlines()
        counts = {"failed": 0, "passed": 0, "timeout": 0}
        with ThreadPoolExecutor(args.jobs) as pool:
            for i, (m, result) in enumerate(zip(todo, pool.map(check, todo))):
                counts[result] += 1
                if result != "failed":
                    mutated = apply(source, m).splitlines()[m[0] - 1].strip()
                    label = "survived" if result == "passed" else "timeout "
                    print(f"{label}  {args.file}:{m[0]}: {mutated}    (was: {lines[m[0] - 1].strip()})", flush=True)
                elif i % 10 == 9:
                    print(f"... {i + 1}/{len(todo)}", flush=True)

    killed = counts["failed"] + counts["timeout"]
    print(f"{args.file}: killed {killed} of {len(todo)} ({100 * killed / max(len(todo), 1):.1f}%), "
          f"survived {counts['passed']}, timed out {counts['timeout']} (counted as killed); "
          f"{sum(PRAGMA in line for line in lines)} lines marked '{PRAGMA}'")
    return counts


if __name__ == "__main__":
    main()
