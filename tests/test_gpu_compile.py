# The Triton kernels compiled for real GPUs (sm_90 and sm_80) with no GPU here: Triton lowers them to
# PTX and runs the ptxas shipped in its wheel, which rejects what the interpreter lets through (tl.dot
# tiles under 16, unsupported dtypes, too much shared memory). The launches compiled are the ones the
# wrappers build, at Qwen2.5-7B's head shape in bf16. conftest.py turned the interpreter on in this
# process, and an interpreted kernel cannot be compiled (it has no cache_key), so the compile runs in
# a child process without TRITON_INTERPRET.
import json
import os
import subprocess
import sys

import pytest

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
