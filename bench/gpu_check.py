"""Everything the project can check on one CUDA GPU, in one command and at most 8 minutes.

    pip install -r requirements.txt -r requirements-test.txt
    python bench/gpu_check.py [--out DIR]          # DIR: runs/gpu_check

Writes DIR/gpu_check.md and DIR/gpu_check.json (rewritten after every section, so a killed run
leaves what it got), each section's full output in DIR/<section>.log, and exits 0 when every
section passed, 1 otherwise. Sections run one after another as subprocesses, each under its own
time limit; a failing or timed-out section is recorded with its error and the next one runs:
  gpu_tests    python -m pytest -m gpu (pass / fail counts, failures)
  kernels      bench/attention.py: paged prefill and decode, Triton against the reference, at Qwen2.5-7B's
               head shape; KV-read bandwidth as a fraction of the card's peak
  engine       bench/engine.py --device cuda --json FILE
  train_fsdp   3 RL steps of configs/tiny.json under FSDP2 (bf16 compute), torchrun on one GPU
  train_ddp    the same under DDP
  train_resume the FSDP run resumed from its step-3 checkpoint, to step 5
Without CUDA it stops at once with exit code 2.
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the limits add up to 450 s, so the whole check fits in 8 minutes whatever hangs
LIMITS = dict(gpu_tests=60, kernels=60, engine=100, train_fsdp=90, train_ddp=80, train_resume=60)
METRIC_KEYS = ("step", "reward", "accuracy", "loss", "grad_norm", "step_s", "rollout_s", "update_s", "peak_mem_gb")


def run(name, cmd, out, timeout):
    """Run cmd from the repository root in its own process group, its output into out/name.log."""
    log_path = os.path.join(out, f"{name}.log")
    rec = dict(name=name, command=" ".join(cmd), limit_s=timeout, log=log_path)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return dict(rec, status="error", error=f"could not start: {e}", seconds=0.0)
        try:
            rec["returncode"] = proc.wait(timeout=timeout)
            rec["status"] = "passed" if rec["returncode"] == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
            proc.wait()
            rec.update(status="timeout", error=f"killed after {timeout} s")
    rec["seconds"] = round(time.perf_counter() - t, 1)
    with open(log_path, errors="replace") as f:
        rec["tail"] = f.read()[-3000:]
    if rec["status"] == "failed":
        rec["error"] = f"exit code {rec['returncode']}"
    return rec


def section(name, cmd, out, summarize=None, timeout=None):
    """run() and then summarize(rec) -> (dict of results, markdown); a summary that fails fails the section."""
    rec = run(name, cmd, out, timeout or LIMITS[name])
    rec["markdown"] = ""
    if summarize and rec["status"] in ("passed", "failed"):  # a failed run may still say what failed
        try:
            rec["results"], rec["markdown"] = summarize(rec)
        except Exception as e:  # noqa: BLE001 - recorded, the next section runs
            why = f"reading its results: {type(e).__name__}: {e}"
            rec.update(status="failed", error=f"{rec['error']}; {why}" if rec.get("error") else why)
    return rec


def junit_summary(path):
    def summarize(rec):
        suite = ET.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = []
        for case in suite.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                failed.append(dict(test=f"{case.get('classname')}::{case.get('name')}",
                                   message=(bad.get("message") or "").strip()[:500]))
        md = [f"{counts['tests']} tests: {counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']}"
              f" passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"]
        md += [f"- FAILED `{f['test']}`: {f['message'].splitlines()[0] if f['message'] else ''}" for f in failed]
        return dict(counts, failed=failed), "\n".join(md)
    return summarize


def table_lines(rec):
    """The markdown table lines a bench script printed."""
    return "\n".join(line for line in rec["tail"].splitlines() if line.startswith("|"))


def json_summary(path):
    def summarize(rec):
        with open(path) as f:
            return json.load(f), table_lines(rec)
    return summarize


def metrics_summary(run_dir, steps, resumed=False):
    def summarize(rec):
        with open(rec["log"], errors="replace") as f:
            if resumed and "resumed from" not in f.read():
                raise ValueError("train.py did not say it resumed from a checkpoint")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        got = [r["step"] for r in rows]
        if got != list(range(1, steps + 1)):
            raise ValueError(f"metrics.jsonl holds steps {got}, expected 1..{steps}")
        keys = [k for k in METRIC_KEYS if any(k in r for r in rows)]
        keys += sorted({k for r in rows for k in r if "tok" in k and k not in keys})
        md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        md += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
        return rows, "\n".join(md)
    return summarize


def _cell(v):
    return (f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}") if isinstance(v, float) else str(v)


def train_cmd(out_dir, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
            "--config", "configs/tiny.json", f"--out_dir={out_dir}", "--progress=false", *extra]


def header():
    def quiet(cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    import triton
    commit = quiet(["git", "rev-parse", "HEAD"]) or "unknown"
    if quiet(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " (with uncommitted changes)"
    return dict(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                driver=quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0]
                or "unknown", cuda=torch.version.cuda, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), commit=commit, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def write_report(out, head, recs):
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(dict(header=head, sections=recs), f, indent=1)
    md = ["# GPU check", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in head.items()]
    md += ["", "| section | status | seconds | limit s |", "|---|---|---|---|"]
    md += [f"| {r['name']} | {r['status']} | {r['seconds']} | {r['limit_s']} |" for r in recs]
    for r in recs:
        md += ["", f"## {r['name']}: {r['status']}", "", f"`{r['command']}` ({r['seconds']} s, log: {r['log']})"]
        if r.get("error"):
            md += ["", f"error: {r['error']}", "", "```", r["tail"][-2000:], "```"]
        if r.get("markdown"):
            md += ["", r["markdown"]]
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"), help="report directory (new or empty)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_check.py: torch sees no CUDA device, so there is nothing to check here "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a GPU machine.",
              file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out):
        print(f"bench/gpu_check.py: --out {out} is not empty (training runs there would refuse to start); "
              "pass a new directory", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    py, head, recs = sys.executable, header(), []
    fsdp_dir = os.path.join(out, "fsdp")
    plan = [
        ("gpu_tests", [py, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider",
                       f"--junitxml={out}/gpu_tests.xml"], junit_summary(os.path.join(out, "gpu_tests.xml"))),
        ("kernels", [py, "bench/attention.py", "--device", "cuda", "--json", f"{out}/kernels.json"],
         json_summary(os.path.join(out, "kernels.json"))),
        ("engine", [py, "bench/engine.py", "--device", "cuda", "--json", f"{out}/engine.json"],
         json_summary(os.path.join(out, "engine.json"))),
        ("train_fsdp", train_cmd(fsdp_dir, "--steps=3", "--parallel=fsdp"), metrics_summary(fsdp_dir, 3)),
        ("train_ddp", train_cmd(os.path.join(out, "ddp"), "--steps=3", "--parallel=ddp"),
         metrics_summary(os.path.join(out, "ddp"), 3)),
        ("train_resume", train_cmd(fsdp_dir, "--steps=5", "--parallel=fsdp", "--resume"),
         metrics_summary(fsdp_dir, 5, resumed=True)),
    ]
    for name, cmd, summarize in plan:
        print(f"gpu_check: {name} (limit {LIMITS[name]} s) ...", flush=True)
        recs.append(section(name, cmd, out, summarize))
        print(f"gpu_check: {name} {recs[-1]['status']} in {recs[-1]['seconds']} s", flush=True)
        write_report(out, head, recs)
    print(f"report: {out}/gpu_check.md")
    return 0 if all(r["status"] == "passed" for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
