"""The shipped memory agents (checkpoints/tiny-sft, tiny, multihop-sft, multihop): they load and they read.

A broken checkpoint or tokenizer must never land; it would score 0 here. These are held-out needle
documents at the training length (seed 1; training drew its questions with seed 0), read greedily,
so the scores are deterministic: the eval in results/tiny.md got all 12 right, for both checkpoints, on
exactly these samples. The bar of 10/12 leaves room for float differences between machines.
"""
import os

import pytest

from memory_agent import AgentConfig, MemoryAgent
from model import build_model
from rollout import Engine, SamplingParams
from tasks import make_samples, score
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the settings both were trained with (configs/tiny-sft.json, configs/tiny.json)
AGENT = AgentConfig(chunk_tokens=128, memory_tokens=96, answer_tokens=48, question_tokens=32, template="compact")


@pytest.mark.parametrize("name", ["tiny-sft", "tiny"])
def test_shipped_agent_finds_the_needle(name):
    path = os.path.join(ROOT, "checkpoints", name)
    tok = load_tokenizer(path)
    assert AgentConfig.load(path) == AGENT  # agent.json carries them
    agent = MemoryAgent(Engine(build_model(path), num_blocks=1024), tok, AgentConfig.load(path))
    samples = make_samples("niah_single", 512, tok, num=12, seed=1)  # 4 chunks each
    trajectories = agent.run(samples, params=SamplingParams(temperature=0.0))
    assert [t.error for t in trajectories] == [None] * 12
    right = [score(s, t.answer_text) == 1.0 for s, t in zip(samples, trajectories)]
    assert sum(right) >= 10, [t.answer_text for t in trajectories]


# The multi-hop agents (checkpoints/multihop-sft, checkpoints/multihop) on the first 24 held-out
# questions (seed 1) of each of their tasks at the training length, greedy: summed scores measured
# 9.4 (SFT) and 15.4 (SFT + RL) of 72; the bars sit below them, and a broken checkpoint scores ~0.
@pytest.mark.parametrize("name, bar", [("multihop-sft", 6), ("multihop", 11)])
def test_shipped_multihop_agent_scores_above_its_bar(name, bar):
    path = os.path.join(ROOT, "checkpoints", name)
    tok = load_tokenizer(path)
    assert AgentConfig.load(path) == AGENT
    agent = MemoryAgent(Engine(build_model(path), num_blocks=1024), tok, AgentConfig.load(path))
    total = 0.0
    for task in ("niah_multikey", "vt", "two_hop"):
        samples = make_samples(task, 512, tok, num=24, seed=1)
        trajectories = agent.run(samples, params=SamplingParams(temperature=0.0))
        assert [t.error for t in trajectories] == [None] * 24
        total += sum(score(s, t.answer_text) for s, t in zip(samples, trajectories))
    assert total >= bar, total
