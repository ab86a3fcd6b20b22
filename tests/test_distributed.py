"""Data parallelism as a multi-GPU run relies on it, on CPU with gloo:
- one optimizer step on 2 ranks (DDP, and FSDP2) gives the weights of 1 process on the union of the
  same rows: the property the exact global token-mean promises;
- two torchrun launchers as 2 nodes x 1 process (c10d rendezvous on 127.0.0.1) run the same training
  as 1 node x 2 processes: the README's multi-node command, tested."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")

ONE_STEP = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
import dapo, train

out, args = sys.argv[1], sys.argv[2:]
cfg = train.Config.from_argv(args)
rank, world, device = train.setup_distributed()
learner = train.Learner(cfg, world, device, vocab_size=0)
g = torch.Generator().manual_seed(0)
rows = []
for i in range(12):  # ragged RL rows: prompts and responses of different lengths, mixed-sign advantages
    P, R = int(torch.randint(3, 40, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
    ids = torch.randint(0, 512, (P + R,), generator=g).tolist()
    adv = float(torch.randn(1, generator=g))
    rows.append(dapo.Row(ids[:P], ids[P:], adv, [-2.0] * R))
grads, step = {}, learner.opt.step
def record_then_step():  # the reduced gradients the optimizer is about to apply, gathered whole
    for name, p in learner.model.named_parameters():
        grads[name] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
    step()
learner.opt.step = record_then_step
metrics = learner.update(learner.micro_batches(rows[rank::world]))
state = get_model_state_dict(learner.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save({"state": state, "grads": grads, "metrics": metrics}, out)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""

ARGS = ["--model=micro", "--steps=1", "--optim.lr=1e-3", "--optim.warmup_steps=1", "--rl.dynamic_sampling=false",
        "--optim.micro_batch_tokens=96", "--rl.clip_high=0.2"]


def one_step(tmp_path, name, launcher, *extra):
    out = str(tmp_path / f"{name}.pt")
    res = subprocess.run([*launcher, sys.executable, "-c", ONE_STEP, out, *ARGS, *extra], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_two_ranks_take_the_same_step_as_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python"]
    single = one_step(tmp_path, "single", [])
    assert single["metrics"]["grad_norm"] > 0
    for parallel in ("ddp", "fsdp"):
        split = one_step(tmp_path, parallel, torchrun, f"--parallel={parallel}")
        assert split["metrics"]["loss"] == pytest.approx(single["metrics"]["loss"], rel=1e-5, abs=1e-7)
        assert split["metrics"]["grad_norm"] == pytest.approx(single["metrics"]["grad_norm"], rel=1e-5)
        for k, g in single["grads"].items():
            assert torch.allclose(split["grads"][k], g, rtol=1e-4, atol=1e-8), (parallel, k)
        # Adam's first step is about lr * sign(g): a gradient within rounding of 0 may flip its sign,
        # so the weights agree to 2 lr at worst, and to rounding almost everywhere
        for k, w in single["state"].items():
            diff = (split["state"][k] - w).abs()
            assert diff.max() <= 2e-3 + 1e-6 and (diff > 1e-6).float().mean() < 0.01, (parallel, k)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = ["--model=micro", "--data.tasks=niah_single", "--data.lengths=300", "--data.questions_per_step=2",
        "--agent.chunk_tokens=128", "--agent.memory_tokens=16", "--agent.answer_tokens=8",
        "--agent.question_tokens=32", "--rl.n=2", "--rl.reward=sample", "--optim.lr=1e-3",
        "--optim.warmup_steps=1", "--engine.num_blocks=512", "--progress=false", "--steps=2",
        "--parallel=ddp", "--rl.dynamic_sampling=false", "--checkpoint_every=100"]


def metrics(path):
    drop = lambda m: {k: v for k, v in m.items() if not (k.endswith("_s") or k.startswith("peak"))}  # timings
    return [drop(json.loads(x)) for x in open(path / "metrics.jsonl")]


@pytest.mark.slow
def test_two_nodes_train_as_one_node_of_two(tmp_path, tokenizer_path):
    run = [sys.executable, "-m", "torch.distributed.run"]
    args = ["train.py", *TINY, f"--tokenizer={tokenizer_path}"]
    one = subprocess.run([*run, "--standalone", "--nproc_per_node=2", *args, f"--out_dir={tmp_path / 'one'}"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    nodes = [subprocess.Popen([*run, "--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                               f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=memagent-test", *args,
                               f"--out_dir={tmp_path / 'two'}"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in nodes:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    assert metrics(tmp_path / "two") == metrics(tmp_path / "one")
    assert len(metrics(tmp_path / "one")) == 2
