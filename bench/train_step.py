"""Where one RL step's time goes, and how much of the machine it uses.

    python bench/train_step.py [--config configs/tiny.json] [--steps 3] [--threads 1]

Runs a few Multi-Conv DAPO steps of a config in this process and prints, per step, the split
rollout / old-log-prob / update seconds, generated and trained tokens per second, and model FLOPs
utilisation against the matmul peak of this machine, measured in the same run (an fp32 GEMM on
CPU, a bf16 GEMM on CUDA). Model FLOPs count the weight matmuls only (2 x params per token for a
forward, 6 x for forward + backward); attention is left out, so MFU is a lower bound.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import Config, Trainer  # noqa: E402


def matmul_peak(device, dtype, n=1024, reps=20):
    """Best FLOP/s of an n x n x n GEMM, the yardstick for MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny.json")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    args, extra = p.parse_known_args()  # the rest: --key=value config overrides, as for train.py
    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="train_step_")
    cfg = Config.from_argv(["--config", args.config, f"--steps={args.steps}", f"--out_dir={out}",
                        "--rl.dynamic_sampling=false", "--checkpoint_every=1000000", "--progress=false", *extra])
    trainer = Trainer(cfg)
    params = sum(p.numel() for p in trainer.model.parameters())
    device = trainer.device
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"model {cfg.model}: {params / 1e6:.2f}M parameters on {device}, {args.threads} thread(s); "
          f"measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("dynamic sampling off, so every step trains on its full batch\n")
    head = (f"{'step':>4} {'rollout s':>9} {'logprob s':>9} {'update s':>9} {'gen tok/s':>9} "
            f"{'train tok/s':>11} {'MFU roll':>8} {'MFU upd':>8}")
    print(head)
    for m in trainer.train():
        gen_flops = 2 * params * (m["prefill_tokens"] + m["gen_tokens"]) / max(m["rollout_s"], 1e-9)
        upd_flops = 6 * params * m["train_tokens"] / max(m["update_s"], 1e-9)
        print(f"{m['step']:>4} {m['rollout_s']:>9.2f} {m['logprob_s']:>9.2f} {m['update_s']:>9.2f} "
              f"{m['gen_tokens_per_s']:>9.0f} {m['train_tokens_per_s']:>11.0f} {gen_flops / peak:>8.1%} "
              f"{upd_flops / peak:>8.1%}")


if __name__ == "__main__":
    main()
