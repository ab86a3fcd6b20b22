"""model.py against HF transformers (skipped where it is not installed): our exports load in
transformers with the same logits, and the files transformers writes (its own RoPE layout: 4's
rope_scaling, 5's rope_parameters) load in ours with the same logits."""
import json

import pytest
import torch

from model import Transformer
from test_model import random_model, tiny_config

transformers = pytest.importorskip("transformers")
MAJOR = int(transformers.__version__.split(".")[0])

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
     "mscale": 0.707, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "truncate": False},
]


def hf_logits(path, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf, hf(ids).logits


@pytest.mark.parametrize("scaling", SCALINGS)
def test_round_trip_through_transformers(scaling, tmp_path):
    cfg = tiny_config("llama", rope_theta=5000.0, rope_scaling=scaling)
    ours = random_model(cfg)
    ours.save_pretrained(tmp_path / "ours")
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ours(ids)
    hf, logits = hf_logits(tmp_path / "ours", ids)
    assert (logits - want).abs().max() < 1e-4
    hf.save_pretrained(tmp_path / "hf")  # transformers' own layout for the RoPE keys
    written = json.load(open(tmp_path / "hf" / "config.json"))
    assert ("rope_scaling" in written) == (MAJOR < 5)  # 5 writes rope_parameters alone
    back = Transformer.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert (back.config.rope_theta, back.config.rope_scaling) == (5000.0, cfg.rope_scaling)
    with torch.no_grad():
        assert (back(ids) - want).abs().max() < 1e-4


def test_llama3_in_the_transformers5_layout(tmp_path):
    # a Llama-3-style checkpoint as transformers 5 writes it: no top-level rope_theta/rope_scaling
    scaling = SCALINGS[2]
    cfg = tiny_config("llama", rope_theta=500000.0, rope_scaling=scaling)
    random_model(cfg).save_pretrained(tmp_path)
    hf = json.load(open(tmp_path / "config.json"))
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = {**scaling, "rope_theta": 500000.0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    ours = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config == cfg
    if MAJOR < 5:
        pytest.skip("transformers 4 does not read rope_parameters")
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(tmp_path, ids)[1]).abs().max() < 1e-4
