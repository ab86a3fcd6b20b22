# The Triton kernels compiled for real GPUs (sm_90 and sm_80) with no GPU here: Triton lowers them to
# PTX and runs the ptxas shipped in its wheel, which rejects what the interpreter lets through (tl.dot
# tiles under 16, unsupported dtypes, too much shared memory). The launches compiled are the ones the
# wrappers build, at Qwen2.5-7B's head shape in bf16. conftest.py turned the interpreter on in this
# process, and an interpreted kernel cannot be compiled (it has no cache_key), so the compile runs in
# a child process without TRITON_INTERPRET. Then the GPU benchmarks' CPU paths: bench/attention.py at
# tiny shapes, and bench/gpu_check.py's exit without CUDA and its failing sections.
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90_and_sm80(tmp_path):
    triton = pytest.importorskip("triton")
    if not os.path.exists(triton.knobs.nvidia.ptxas.path):
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from an earlier run's cache
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_kernels.py"), "--ci", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert out.exists(), proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["arch"], r["kernel"]) for r in rows} == {
        (a, k) for a in ("sm_90", "sm_80") for k in ("store_kv", "prefill", "decode_split", "decode_merge")}
    for r in rows:
        where = f'{r["kernel"]} for {r["arch"]} ({r["shape"]}, {r["dtype"]}, block {r["block_size"]})'
        assert "error" not in r, f'{where}: {r.get("error")}'
        assert r["spill_bytes"] == 0, f'{where} spills {r["spill_bytes"]} bytes of registers'
        assert 0 < r["regs"] <= 255, f'{where}: {r["regs"]} registers'
        assert r["shared"] <= 163 * 1024, f'{where}: {r["shared"]} bytes of shared memory, over sm_80\'s 163 KB'
    # the wrappers' GPU tiles (the CPU ones are smaller): a 64-row query tile, BLOCK_N = block size
    prefill = next(r for r in rows if r["kernel"] == "prefill")
    assert prefill["constexprs"]["BLOCK_M"] == 64 and prefill["constexprs"]["BLOCK_N"] == 16
    assert proc.returncode == 0, proc.stderr[-3000:]


def load(name, path):
    """A bench script as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_attention_on_cpu(tmp_path):
    # TRITON_INTERPRET is on (conftest.py): both backends run, and the bench compares their outputs
    bench = load("bench_attention", "bench/attention.py")
    out = tmp_path / "k.json"
    rows = bench.main(["--backends", "torch,triton", "--heads", "4,2,16", "--dtype", "fp16", "--batches", "2",
                       "--contexts", "40", "--prefill", "1x24", "--json", str(out)])
    assert [(r["op"], r["backend"]) for r in rows] == [("decode", "torch"), ("decode", "triton"),
                                                       ("prefill", "torch"), ("prefill", "triton")]
    for r in rows:
        assert r["ms"] > 0 and 0 < r["peak_fraction"] and r["max_diff"] < 2e-3, r
    assert json.loads(out.read_text())["rows"] == rows
    with pytest.raises(SystemExit, match="--heads"):
        bench.main(["--heads", "4,3,16"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_gpu_check_without_cuda_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--out",
                           str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "report").exists()


def test_gpu_check_section_failures_are_recorded(tmp_path):
    check = load("gpu_check", "bench/gpu_check.py")
    py = sys.executable
    failed = check.section("fails", [py, "-c", "print('boom'); raise SystemExit(3)"], str(tmp_path), timeout=60)
    assert failed["status"] == "failed" and failed["error"] == "exit code 3" and "boom" in failed["tail"]
    hung = check.section("hangs", [py, "-c", "import threading; threading.Event().wait()"], str(tmp_path),
                         timeout=0.5)
    assert hung["status"] == "timeout" and "killed after" in hung["error"]

    def unreadable(rec):
        raise KeyError("reward")
    bad = check.section("bad_results", [py, "-c", "pass"], str(tmp_path), unreadable, timeout=60)
    assert bad["status"] == "failed" and "KeyError" in bad["error"]
    check.write_report(str(tmp_path), dict(gpu="none"), [failed, hung, bad])
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| fails | failed |" in report and "| hangs | timeout |" in report and "boom" in report
    assert [s["status"] for s in json.loads((tmp_path / "gpu_check.json").read_text())["sections"]] == [
        "failed", "timeout", "failed"]
