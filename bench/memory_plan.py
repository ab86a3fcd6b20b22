"""The per-rank GPU memory plan of a training config, computed from the model's shape and the world size.

    python bench/memory_plan.py --config configs/release-7b.json --world 32 --shape qwen2.5-7b
    python bench/memory_plan.py --config configs/release-7b.json --world 32 --model-config DIR/config.json

Arithmetic, not a measurement: the memory table of docs/reproducing.md is this script's output. What it counts
(FSDP2 as train.py sets it up: fp32 master weights, gradients and AdamW moments sharded over the
ranks, bf16 compute weights gathered per unit):
  rollout  every unit gathered in bf16 for the whole rollout (train.generation_mode), the frozen
           reference (bf16, sharded, only with rl.kl_coef > 0), and the KV pool the engine sizes
           from what is left: free - (1 - gpu_memory_utilization) x card
  update   checkpointed block inputs of one micro-batch, one block recomputed in backward, the LM
           head's chunked fp32 logits, and the gathered bf16 units in flight
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from train import Config  # noqa: E402

SHAPES = {  # from the checkpoints' config.json
    "qwen2.5-7b": ModelConfig(family="qwen2", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                              num_kv_heads=4, head_dim=128, intermediate_size=18944, tie_word_embeddings=False,
                              attention_bias=True, max_position_embeddings=32768, rope_theta=1e6),
    "qwen2.5-14b": ModelConfig(family="qwen2", vocab_size=152064, hidden_size=5120, num_layers=48, num_heads=40,
                               num_kv_heads=8, head_dim=128, intermediate_size=13824, tie_word_embeddings=False,
                               attention_bias=True, max_position_embeddings=32768, rope_theta=1e6),
}
LM_HEAD_CHUNK = 1024  # model.token_logprobs' chunk_size
GB = 1e9


def plan(cfg, mc: ModelConfig, world, card_gb):
    """-> [(phase, what, arithmetic, bytes)]."""
    with torch.device("meta"):
        P = Transformer(mc).num_params()
    C, L, V, I = mc.hidden_size, mc.num_layers, mc.vocab_size, mc.intermediate_size
    T = cfg.optim.micro_batch_tokens
    block = (P - V * C * (1 if mc.tie_word_embeddings else 2)) / L
    kv_token = 2 * L * mc.num_kv_heads * mc.head_dim * 2
    rows = [("state", "fp32 master weights, sharded", f"{P / 1e9:.2f}e9 x 4 B / {world}", P * 4 / world),
            ("state", "fp32 gradients, sharded", "same", P * 4 / world),
            ("state", "AdamW moments, sharded", "2 x same", 2 * P * 4 / world),
            ("rollout", "bf16 weights gathered for the whole rollout", f"{P / 1e9:.2f}e9 x 2 B", P * 2)]
    if cfg.rl.kl_coef:
        rows.append(("rollout+update", "frozen bf16 reference (rl.kl_coef > 0), sharded", f"P x 2 B / {world}",
                     P * 2 / world))
    used = sum(r[3] for r in rows)
    pool = max((card_gb * GB - used) - (1 - cfg.engine.gpu_memory_utilization) * card_gb * GB, 0)
    window = cfg.agent.chunk_tokens + 2 * cfg.agent.memory_tokens + cfg.agent.question_tokens + 256
    rows += [("info", "KV cache per token", f"2 x {L} layers x {mc.num_kv_heads} x {mc.head_dim} x 2 B", kv_token),
             ("rollout", f"KV pool at gpu_memory_utilization {cfg.engine.gpu_memory_utilization}",
              f"({card_gb} GB - {used / GB:.1f} GB) - {1 - cfg.engine.gpu_memory_utilization:.1f} x {card_gb} GB: "
              f"{pool / kv_token / 1e3:.0f}K tokens, {pool / kv_token / window:.0f} conversations of {window}", pool),
             ("update", f"checkpointed block inputs, {T}-token micro-batch", f"{T} x {C} x 2 B x {L}", T * C * 2 * L),
             ("update", f"one block recomputed in backward (MLP {I} wide)", f"~3 x {T} x {I} x 2 B", 3 * T * I * 2),
             ("update", f"LM head over {LM_HEAD_CHUNK}-token chunks, fp32 logits and grad",
              f"2 x {LM_HEAD_CHUNK} x {V} x 4 B", 2 * LM_HEAD_CHUNK * V * 4),
             ("update", "gathered bf16 units: embedding + head, two blocks in flight",
              f"{2 if not mc.tie_word_embeddings else 1} x {V * C * 2 / GB:.2f} GB + 2 x {block * 2 / GB:.2f} GB",
              V * C * 2 * (1 if mc.tie_word_embeddings else 2) + 2 * block * 2)]
    return P, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a train.py config JSON")
    ap.add_argument("--world", type=int, required=True, help="number of ranks (GPUs)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a known model shape")
    ap.add_argument("--model-config", help="a HF config.json (or its directory) instead of --shape")
    ap.add_argument("--card-gb", type=float, default=80.0)
    args = ap.parse_args()
    if bool(args.shape) == bool(args.model_config):
        ap.error("give one of --shape and --model-config")
    mc = SHAPES[args.shape] if args.shape else ModelConfig.from_hf(args.model_config)
    cfg = Config.from_argv(["--config", args.config, "--model=micro"])  # the model key is not needed here
    P, rows = plan(cfg, mc, args.world, args.card_gb)
    print(f"{P / 1e9:.2f}B parameters, {mc.num_layers} layers, hidden {mc.hidden_size}, {mc.num_kv_heads} KV heads "
          f"of {mc.head_dim}; {args.world} ranks, {args.card_gb:.0f} GB cards\n")
    print("| phase | what | arithmetic | per rank |\n| --- | --- | --- | --- |")
    for phase, what, how, b in rows:
        size = f"{b / 1e3:.0f} KB" if b < 1e6 else f"{b / GB:.2f} GB"
        print(f"| {phase if phase != 'info' else ''} | {what} | {how} | {size} |")
    rollout = sum(b for p, _, _, b in rows if p in ("state", "rollout", "rollout+update"))
    update = sum(b for p, _, _, b in rows if p in ("state", "update", "rollout+update"))
    print(f"\nrollout peak: {rollout / GB:.1f} GB (KV pool included); update peak: {update / GB:.1f} GB. The KV pool "
          "is freed before the update, so the two phases share the card.")


if __name__ == "__main__":
    main()
