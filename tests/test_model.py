"""model.py: logits against an independent reference, HF checkpoints, packed log-probs, bad input."""
import json
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model import ModelConfig, Transformer, build_model, rope_inv_freq

FAMILIES = {
    "llama": dict(family="llama", tie_word_embeddings=False),
    "mistral": dict(family="mistral", tie_word_embeddings=False),
    "qwen2": dict(family="qwen2", attention_bias=True, tie_word_embeddings=True),
    "qwen3": dict(family="qwen3", qk_norm=True, tie_word_embeddings=True, head_dim=24),
}


def tiny_config(family, **kw):
    base = dict(vocab_size=97, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12,
                intermediate_size=80, rope_theta=500.0, rms_eps=1e-5, max_position_embeddings=128)
    base.update(FAMILIES[family])
    base.update(kw)
    return ModelConfig(**base)


TINY_HF = tiny_config("llama").to_hf()


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms and biases so that every parameter matters
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


# -- an independent reference: plain loops over heads and positions on the HF-named weights --------

def reference_logits(sd, cfg, ids):
    """Straightforward re-implementation on the HF key names (ids: list[int], one sequence)."""
    W = lambda k: sd[k].double()
    T, nh, nkv, hd = len(ids), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_eps) * w

    inv, scale_attn = rope_inv_freq(cfg)

    def rope(vec, pos):  # vec (hd,): pair i is (vec[i], vec[i + hd/2])
        out = vec.clone()
        for i in range(hd // 2):
            a = pos * inv[i].double()
            c, s = math.cos(a) * scale_attn, math.sin(a) * scale_attn
            out[i] = vec[i] * c - vec[i + hd // 2] * s
            out[i + hd // 2] = vec[i + hd // 2] * c + vec[i] * s
        return out

    x = W("model.embed_tokens.weight")[ids]  # (T, C)
    for l in range(cfg.num_layers):
        p = f"model.layers.{l}."
        h = rms(x, W(p + "input_layernorm.weight"))

        def proj(name):
            y = h @ W(p + f"self_attn.{name}.weight").T
            if cfg.attention_bias:
                y = y + W(p + f"self_attn.{name}.bias")
            return y

        q = proj("q_proj").view(T, nh, hd)
        k = proj("k_proj").view(T, nkv, hd)
        v = proj("v_proj").view(T, nkv, hd)
        if cfg.qk_norm:
            q = rms(q, W(p + "self_attn.q_norm.weight"))
            k = rms(k, W(p + "self_attn.k_norm.weight"))
        out = torch.zeros(T, nh, hd, dtype=torch.float64)
        for head in range(nh):
            kvh = head // (nh // nkv)
            for t in range(T):
                qt = rope(q[t, head], t)
                scores = torch.stack([rope(k[s, kvh], s) @ qt for s in range(t + 1)]) / math.sqrt(hd)
                w = torch.softmax(scores, 0)
                out[t, head] = (w[:, None] * v[: t + 1, kvh]).sum(0)
        x = x + out.view(T, nh * hd) @ W(p + "self_attn.o_proj.weight").T
        h = rms(x, W(p + "post_attention_layernorm.weight"))
        gate = h @ W(p + "mlp.gate_proj.weight").T
        x = x + (gate * torch.sigmoid(gate) * (h @ W(p + "mlp.up_proj.weight").T)) @ W(p + "mlp.down_proj.weight").T
    x = rms(x, W("model.norm.weight"))
    head = sd["model.embed_tokens.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    return x @ head.double().T


def hf_state_dict(model):
    from model import hf_name
    return {hf_name(n): p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_independent_reference(family):
    cfg = tiny_config(family)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids)
    for b in range(2):
        ref = reference_logits(hf_state_dict(model), cfg, ids[b].tolist())
        assert (logits[b].double() - ref).abs().max() < 1e-4


ROPE_SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_rope_scaling_matches_reference(scaling):
    cfg = tiny_config("llama", rope_scaling=scaling)
    model = random_model(cfg)
    ids = torch.arange(11)[None] % cfg.vocab_size
    with torch.no_grad():
        logits = model(ids)
    ref = reference_logits(hf_state_dict(model), cfg, ids[0].tolist())
    assert (logits[0].double() - ref).abs().max() < 1e-4
    # and the scaling really changed the frequencies
    assert not torch.allclose(rope_inv_freq(cfg)[0], rope_inv_freq(tiny_config("llama"))[0])


@pytest.mark.parametrize("family, scaling", [(f, None) for f in FAMILIES] + [("llama", s) for s in ROPE_SCALINGS])
def test_matches_hf_transformers_when_installed(family, scaling, tmp_path):
    # transformers is optional: this is an extra, independent check where it is installed
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(family, rope_scaling=scaling)
    model = random_model(cfg)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_load_round_trip_is_bit_exact(family, tmp_path):
    model = random_model(tiny_config(family)).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert os.listdir(tmp_path) and json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
    loaded = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.config == model.config
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_sharded_checkpoint_loads_in_target_dtype(tmp_path):
    model = random_model(tiny_config("llama"))
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / s).exists() for s in shards)
    loaded = Transformer.from_pretrained(tmp_path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v.half(), loaded.state_dict()[k])


def test_packed_logprobs_equal_each_sequence_alone():
    cfg = tiny_config("qwen3")
    model = random_model(cfg)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (5, 1, 8)]
    ids = torch.cat(seqs)[None]  # (1, 14): three conversations in one row
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    targets = torch.randint(0, cfg.vocab_size, ids.shape, generator=g)
    packed, ent = model.token_logprobs(ids, targets, pos, temperature=0.7, chunk_size=4, return_entropy=True)
    start = 0
    with torch.no_grad():
        for s in seqs:
            logits = model(s[None])[0].double() / 0.7
            lp = torch.log_softmax(logits, -1)
            tgt = targets[0, start:start + len(s)]
            want = lp.gather(-1, tgt[:, None]).squeeze(-1)
            assert (packed[0, start:start + len(s)].double() - want).abs().max() < 1e-5
            want_ent = -(lp.exp() * lp).sum(-1)
            assert (ent[0, start:start + len(s)].double() - want_ent).abs().max() < 1e-5
            start += len(s)


def test_logprob_gradients_flow_with_chunking_and_checkpointing():
    cfg = tiny_config("llama")
    ids = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    grads = []
    for chunk, ckpt in ((1024, False), (3, True)):
        model = random_model(cfg)
        model.gradient_checkpointing = ckpt
        model.token_logprobs(ids, ids.roll(-1, 1), pos, chunk_size=chunk).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_build_model_tiny_and_unknown():
    model = build_model("micro")
    assert model.num_params() > 0 and model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 512)
    with pytest.raises(ValueError, match="'model': 'nope' is neither a checkpoint directory"):
        build_model("nope")


# -- bad input: errors name the file and the key ------------------------------------------------

def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match="config.json: no such file"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value", [("hidden_act", "gelu"), ("vocab_size", "2048"), ("hidden_size", -64),
                                        ("rms_norm_eps", "1e-6"), ("mlp_bias", True), ("attention_dropout", 0.1),
                                        ("quantization_config", {"bits": 4}), ("num_key_value_heads", 3)])
def test_config_keys_that_change_the_math_are_implemented_or_refused(tmp_path, key, value):
    random_model(tiny_config("llama")).save_pretrained(tmp_path)
    hf = json.load(open(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps(dict(hf, **{key: value})))
    with pytest.raises(ValueError, match=key.replace("num_key_value_heads", "num_key_value_heads=3")):
        ModelConfig.from_hf(tmp_path)


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "intermediate_size", "rms_norm_eps", "max_position_embeddings", "head_dim",
                            "tie_word_embeddings", "hidden_act", "sliding_window", "made_up_key"]),
       value=st.one_of(st.integers(-5, 300), st.floats(allow_nan=True), st.text(max_size=4), st.booleans(),
                       st.none(), st.lists(st.integers(), max_size=2)))
def test_any_config_value_loads_a_working_model_or_is_refused_by_name(tmp_path_factory, key, value):
    path = tmp_path_factory.mktemp("cfg")
    (path / "config.json").write_text(json.dumps(dict(TINY_HF, **{key: value})))
    try:
        cfg = ModelConfig.from_hf(path)
    except ValueError as e:
        assert key in str(e) or "num_attention_heads" in str(e), e  # named, never a crash from inside
        return
    model = Transformer(cfg)
    assert torch.isfinite(model(torch.zeros(1, 2, dtype=torch.long))).all()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        Transformer.from_pretrained(tmp_path)


def test_missing_config_key(tmp_path):
    random_model(tiny_config("llama")).save_pretrained(tmp_path)
    hf = json.load(open(tmp_path / "config.json"))
    del hf["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="intermediate_size"):
        Transformer.from_pretrained(tmp_path)


def test_missing_weight_file(tmp_path):
    random_model(tiny_config("llama")).save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_missing_and_misshapen_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    random_model(tiny_config("llama")).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    save_file(bad, path)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        Transformer.from_pretrained(tmp_path)
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(7)
    save_file(bad, path)
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(7,\)"):
        Transformer.from_pretrained(tmp_path)


# -- config.json: both RoPE layouts, validation at config time ---------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def write_config(tmp_path, cfg, **rope_keys):
    """cfg's config.json with its RoPE keys replaced by rope_keys (None deletes one)."""
    hf = cfg.to_hf()
    for k in ("rope_theta", "rope_scaling", "rope_parameters"):
        hf.pop(k)
    hf.update({k: v for k, v in rope_keys.items() if v is not None})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path / "config.json"


def test_from_hf_reads_transformers5_rope_parameters(tmp_path):
    # transformers 5 writes theta and type inside rope_parameters, nothing at the top level
    want = tiny_config("llama", rope_theta=500000.0, rope_scaling=dict(LLAMA3))
    path = write_config(tmp_path, want, rope_parameters={**LLAMA3, "rope_theta": 500000.0})
    assert ModelConfig.from_hf(path) == want
    path = write_config(tmp_path, want, rope_theta=500000.0, rope_scaling={**LLAMA3})  # transformers 4
    assert ModelConfig.from_hf(path) == want
    plain = tiny_config("qwen2", rope_theta=1e6)
    path = write_config(tmp_path, plain, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert ModelConfig.from_hf(path) == plain and plain.rope_scaling is None
    # the file we write carries both layouts, and they agree
    hf = want.to_hf()
    assert hf["rope_theta"] == 500000.0 and hf["rope_scaling"] == LLAMA3
    assert hf["rope_parameters"] == {**LLAMA3, "rope_theta": 500000.0}
    assert plain.to_hf()["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}


def test_from_hf_old_type_key_and_default_original_length(tmp_path):
    cfg = tiny_config("llama")
    path = write_config(tmp_path, cfg, rope_scaling={"type": "yarn", "factor": 4.0})
    got = ModelConfig.from_hf(path)  # as HF does: the original length defaults to max_position_embeddings
    assert got.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert got.rope_theta == 10000.0


@pytest.mark.parametrize("keys, match", [
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), r"rope_parameters.*'linear'.*\['factor'\]"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"rope_scaling.*low_freq_factor"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), r"rope_parameters.*'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "beta_fast": 3}), r"\['beta_fast'\].*'linear'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": "2"}), r"factor='2' must be a positive number"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "truncate": None}), r"truncate=None"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     r"partial_rotary_factor=0.5"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}), r"flat dict"),
    (dict(rope_theta=1e4, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
     r"rope_parameters.rope_theta=500000.0 contradicts rope_theta=10000.0"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_parameters={"rope_type": "default"}),
     r"rope_parameters.rope_type='default' contradicts rope_scaling.rope_type='linear'"),
    (dict(rope_theta=-1.0), r"rope_theta=-1.0"),
])
def test_bad_rope_settings_name_the_file_and_key(tmp_path, keys, match):
    path = write_config(tmp_path, tiny_config("llama"), **keys)
    with pytest.raises(ValueError, match=match) as e:
        ModelConfig.from_hf(path)
    assert str(path) in str(e.value)


def test_rope_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match=r"ModelConfig.*'linear' needs the field\(s\) \['factor'\]"):
        tiny_config("llama", rope_scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="high_freq_factor > low_freq_factor"):
        tiny_config("llama", rope_scaling={**LLAMA3, "high_freq_factor": 1.0})
    # the old "type" key is accepted and normalised, so the config writes a clean rope_parameters
    cfg = tiny_config("llama", rope_scaling={"type": "linear", "factor": 2.0})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.to_hf()["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}


def test_yarn_attention_factor_variants():
    base = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert rope_inv_freq(tiny_config("llama", rope_scaling=base))[1] == pytest.approx(0.1 * math.log(4) + 1)
    both = {**base, "mscale": 0.707, "mscale_all_dim": 1.0}
    want = (0.1 * 0.707 * math.log(4) + 1) / (0.1 * math.log(4) + 1)
    assert rope_inv_freq(tiny_config("llama", rope_scaling=both))[1] == pytest.approx(want)
    assert rope_inv_freq(tiny_config("llama", rope_scaling={**base, "factor": 1.0}))[1] == 1.0
    given = {**base, "attention_factor": 1.5}
    assert rope_inv_freq(tiny_config("llama", rope_scaling=given))[1] == 1.5
    # without truncation the ramp's ends are fractional, so some frequency changes
    a = rope_inv_freq(tiny_config("llama", rope_scaling=base))[0]
    b = rope_inv_freq(tiny_config("llama", rope_scaling={**base, "truncate": False}))[0]
    assert not torch.equal(a, b)


# -- checkpoints: corrupt files, non-finite weights, dtype names --------------------------------

def test_corrupt_safetensors_names_the_file(tmp_path):
    random_model(tiny_config("llama")).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, as by an interrupted copy
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        Transformer.from_pretrained(tmp_path)
    path.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        Transformer.from_pretrained(tmp_path)


def test_corrupt_index_names_the_file(tmp_path):
    random_model(tiny_config("llama")).save_pretrained(tmp_path, max_shard_bytes=20_000)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        Transformer.from_pretrained(tmp_path)


def test_non_finite_weights_name_the_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    random_model(tiny_config("llama")).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    bad = dict(sd)
    bad["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"].clone()
    bad["model.layers.0.mlp.down_proj.weight"][3, 4] = float("nan")
    save_file(bad, path)
    with pytest.raises(ValueError, match=r"model.safetensors: weight 'model.layers.0.mlp.down_proj.weight' holds NaN"):
        Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    bad = dict(sd)
    bad["model.norm.weight"] = sd["model.norm.weight"] * 1e6  # finite in fp32, inf in fp16
    save_file(bad, path)
    assert torch.isfinite(Transformer.from_pretrained(tmp_path, dtype=torch.float32).norm.weight).all()
    with pytest.raises(ValueError, match=r"weight 'model.norm.weight' overflows torch.float16"):
        Transformer.from_pretrained(tmp_path, dtype=torch.float16)


def test_dtype_by_name(tmp_path):
    random_model(tiny_config("qwen2")).save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert all(p.dtype == torch.bfloat16 for p in build_model(str(tmp_path), dtype="torch.bfloat16").parameters())
    assert all(p.dtype == torch.float16 for p in build_model("micro", dtype="float16").parameters())
    for bad in ("bf16x", "int8", 3):
        with pytest.raises(ValueError, match=rf"dtype={bad!r}|dtype=torch.int8"):
            build_model("micro", dtype=bad)


@pytest.mark.parametrize("family, extra, window_applies", [
    ("MistralForCausalLM", {"sliding_window": 512}, True),                              # mistral: on unless turned off
    ("MistralForCausalLM", {"sliding_window": 512, "use_sliding_window": False}, False),
    ("Qwen2ForCausalLM", {"sliding_window": 512}, False),                               # qwen2: off unless turned on
    ("Qwen2ForCausalLM", {"sliding_window": 512, "use_sliding_window": True}, True),
    ("LlamaForCausalLM", {"sliding_window": None}, False),
])
def test_sliding_window_clamps_the_served_length(tmp_path, family, extra, window_applies):
    # sliding-window attention equals full attention up to the window, so an active window is
    # served exactly by capping the length at it
    hf = dict(architectures=[family], vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=4096, **extra)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert ModelConfig.from_hf(tmp_path).max_position_embeddings == (512 if window_applies else 4096)
