"""The shipped tiny memory agents (checkpoints/tiny-sft, checkpoints/tiny): they load and they read.

A broken checkpoint or tokenizer must never land; it would score 0 here. These are held-out needle
documents at the training length (seed 1; training drew its questions with seed 0), read greedily,
so the scores are deterministic: the eval in the README got all 12 right, for both checkpoints, on
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
    right = [score(s, t.answer) == 1.0 for s, t in zip(samples, trajectories)]
    assert sum(right) >= 10, [t.answer_text for t in trajectories]
