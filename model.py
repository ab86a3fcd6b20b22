"""The decoder-only transformer behind memagent, and its HF-format checkpoints.

One `Transformer` covers the Llama, Mistral, Qwen2 (biased q/k/v projections) and Qwen3 (q/k
RMSNorm) families: RMSNorm -> attention with RoPE and grouped-query heads -> RMSNorm -> SwiGLU MLP,
repeated, then a final norm and the LM head. Module names follow HF's so that a checkpoint's keys
map one to one (drop the leading "model.").

Three ways in:
  model(input_ids)                         plain causal forward -> logits            (B, T, V)
  model.token_logprobs(ids, targets, pos)  packed conversations -> log p(target)     (B, T)
  model(input_ids, position_ids, attn=kv, logits_rows=rows)   the engine's paged-KV forward (rollout.py)

Attention is one interface with a backend per mode: an object with attend(layer, q, k, v) ->
(B, T, nh, hd). CAUSAL (one sequence per row), PackedRows (several sequences per row, for training)
and rollout.PagedKV (the engine's paged cache) are the three.
"""
import json
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from run_outputs import write_file
from settings import SettingError, read_json


# --------------------------------------------------------------------------------------------
# config

ARCHITECTURES = {  # HF `architectures` value -> family
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# RoPE variants rope_inv_freq computes: rope_type -> (required fields, optional fields), HF's names.
ROPE_TYPES = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                           "mscale", "mscale_all_dim", "truncate")),
}


def check_rope(theta, scaling, where):
    """Validate RoPE settings; return the scaling dict as {"rope_type": ..., fields} (a copy), or
    None for plain RoPE. Errors name `where` (the file and key) and the offending field."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 1 < theta < math.inf:
        raise ValueError(f"{where}: rope_theta={theta!r} must be a number > 1")
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"{where}: the RoPE scaling must be a dict, got {scaling!r}")
    fields = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where}: rope_type '{kind}' is not supported ({', '.join(ROPE_TYPES)})")
    required, optional = ROPE_TYPES[kind]
    missing = [k for k in required if fields.get(k) is None]
    if missing:
        raise ValueError(f"{where}: rope_type '{kind}' needs the field(s) {missing}")
    unknown = sorted(set(fields) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{where}: field(s) {unknown} are not supported for rope_type '{kind}' "
                         f"(supported: {list(required + optional)})")
    for k, v in fields.items():
        if k == "truncate":
            if not isinstance(v, bool):
                raise ValueError(f"{where}: truncate={v!r} must be true or false")
        elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise ValueError(f"{where}: {k}={v!r} must be a positive number")
    if kind == "llama3" and fields["high_freq_factor"] <= fields["low_freq_factor"]:
        raise ValueError(f"{where}: llama3 needs high_freq_factor > low_freq_factor, got "
                         f"{fields['high_freq_factor']} and {fields['low_freq_factor']}")
    return None if kind == "default" else {"rope_type": kind, **fields}


def rope_from_hf(hf, path, max_pos):
    """(rope_theta, rope_scaling) from a config.json dict in either layout: transformers 4's top-level
    rope_theta + rope_scaling, or 5's rope_parameters (theta and type inside). A file holding both
    must say the same thing in each. As HF does, llama3/yarn without original_max_position_embeddings
    take max_position_embeddings."""
    merged, origin = {}, {}
    if hf.get("rope_theta") is not None:
        merged["rope_theta"], origin["rope_theta"] = hf["rope_theta"], "rope_theta"
    for key in ("rope_scaling", "rope_parameters"):
        block = hf.get(key)
        if block is None:
            continue
        if not isinstance(block, dict) or any(isinstance(v, dict) for v in block.values()):
            raise ValueError(f"{path}: {key}={block!r} is not supported (one flat dict of RoPE fields "
                             "for all layers)")
        for k, v in block.items():
            k = "rope_type" if k == "type" else k
            if k in merged and merged[k] != v:
                raise ValueError(f"{path}: {key}.{k}={v!r} contradicts {origin[k]}={merged[k]!r}")
            merged[k], origin[k] = v, f"{key}.{k}"
    blocks = [k for k in ("rope_scaling", "rope_parameters") if hf.get(k)]
    where = f"{path}: {' / '.join(blocks) or 'rope_theta'}"
    theta = merged.pop("rope_theta", 10000.0)
    partial = merged.pop("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={partial!r} is not supported (only 1.0)")
    if merged.get("rope_type") in ("llama3", "yarn") and merged.get("original_max_position_embeddings") is None:
        merged["original_max_position_embeddings"] = max_pos  # HF's default, before any window cap
    return theta, check_rope(theta, merged or None, where)


def _int(lo):
    return lambda v: type(v) is int and v >= lo, f"an integer >= {lo}"


def _pos_number():
    return lambda v: type(v) in (int, float) and 0 < v < math.inf, "a positive number"


def _exactly(*values):
    return lambda v: v in values, " or ".join(map(repr, values)) + " (other values are not implemented)"


# Every key of a HF config.json: (test, what it must be) for those that change the computation, None for
# those that do not (names, ids, dtype, caching, initialisation). RoPE keys are read by rope_from_hf.
HF_KEYS = {
    "vocab_size": _int(1), "hidden_size": _int(1), "num_hidden_layers": _int(1), "num_attention_heads": _int(1),
    "num_key_value_heads": (lambda v: v is None or (type(v) is int and v >= 1), "an integer >= 1"),
    "head_dim": (lambda v: v is None or (type(v) is int and v >= 1), "an integer >= 1"),
    "intermediate_size": _int(1), "max_position_embeddings": _int(2), "rms_norm_eps": _pos_number(),
    "tie_word_embeddings": (lambda v: type(v) is bool, "true or false"),
    "hidden_act": _exactly("silu"), "mlp_bias": _exactly(False), "attention_bias": _exactly(False),
    "attention_dropout": _exactly(0, 0.0), "pretraining_tp": _int(1),  # tensor-parallel slicing: same math
    "sliding_window": (lambda v: v is None or (type(v) is int and v >= 1), "null or an integer >= 1"),
    "use_sliding_window": (lambda v: type(v) is bool, "true or false"), "max_window_layers": _int(0),
    "layer_types": (lambda v: isinstance(v, list) and set(v) <= {"full_attention", "sliding_attention"},
                    "a list of full_attention / sliding_attention"),
    "rope_theta": None, "rope_scaling": None, "rope_parameters": None, "partial_rotary_factor": _exactly(1, 1.0),
    "architectures": None, "model_type": None, "torch_dtype": None, "dtype": None, "transformers_version": None,
    "use_cache": None, "initializer_range": None, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    "_name_or_path": None, "output_attentions": None, "output_hidden_states": None, "return_dict": None,
    "tokenizer_class": None, "id2label": None, "label2id": None, "torchscript": None, "use_return_dict": None,
}


def check_hf_keys(hf, path, family):
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise ValueError(f"{path}: missing key '{key}'")
    for key, value in hf.items():
        if key not in HF_KEYS:
            raise ValueError(f"{path}: key '{key}' is not implemented here; if it does not change the model's "
                             "computation, remove it from the file")
        rule = HF_KEYS[key]
        if key == "attention_bias" and family == "qwen2":
            continue  # Qwen2 always has q/k/v biases and no o_proj bias, whatever the key says
        if rule is not None and not rule[0](value):
            raise ValueError(f"{path}: {key}={value!r} must be {rule[1]}")


# HF config.json keys that are ModelConfig fields as they are (read with their defaults, written back)
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
             "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
             "intermediate_size": "intermediate_size", "rms_norm_eps": "rms_eps",
             "tie_word_embeddings": "tie_word_embeddings", "max_position_embeddings": "max_position_embeddings",
             "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}
# what each family's config.json says of the features it does not use (Qwen2's q/k/v biases are implied)
FAMILY_KEYS = {"llama": dict(attention_bias=False, mlp_bias=False), "mistral": dict(sliding_window=None),
               "qwen2": dict(use_sliding_window=False, sliding_window=None),
               "qwen3": dict(use_sliding_window=False, sliding_window=None, attention_bias=False)}


@dataclass
class ModelConfig:
    family: str = "llama"  # llama | mistral | qwen2 | qwen3
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF dict: {"rope_type": "linear"|"llama3"|"yarn", ...}
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # bias on q/k/v projections (always on for qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (hidden_size / num_attention_heads if absent) must be even "
                             "and >= 2: RoPE rotates pairs")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads="
                             f"{self.num_kv_heads}")
        self.rope_scaling = check_rope(self.rope_theta, self.rope_scaling, "ModelConfig")

    @classmethod
    def from_hf(cls, path):
        """Read a HF config.json (a file, or the directory holding it). Every key is read, checked (type and
        range), or known not to change the computation; any other is refused by name (HF_KEYS)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        hf = read_json(path, "a HF config object")
        archs = hf.get("architectures") or []
        if not isinstance(archs, list):
            raise ValueError(f"{path}: architectures={archs!r} must be a list, e.g. [\"LlamaForCausalLM\"]")
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            raise ValueError(f"{path}: architectures={archs} is not supported; supported: {sorted(ARCHITECTURES)}")
        if hf.get("model_type", family) != family:  # HF's Auto classes build from model_type
            raise ValueError(f"{path}: model_type={hf['model_type']!r} contradicts architectures={archs}")
        check_hf_keys(hf, path, family)
        num_heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        max_pos = hf.get("max_position_embeddings", 4096)
        theta, scaling = rope_from_hf(hf, path, max_pos)
        # Sliding-window attention equals full attention for sequences no longer than the window,
        # so a model with an active window is served exactly up to the window's length.
        window = hf.get("sliding_window")
        sliding = hf.get("use_sliding_window", family == "mistral") or "sliding_attention" in (hf.get("layer_types")
                                                                                              or ())
        if window and sliding:
            max_pos = min(max_pos, window)
        given = {field: hf[key] for key, field in HF_FIELDS.items() if hf.get(key) is not None}
        try:
            return cls(**given | dict(family=family, num_kv_heads=given.get("num_kv_heads", num_heads),
                                      head_dim=given.get("head_dim", hidden // num_heads), rope_scaling=scaling,
                                      tie_word_embeddings=given.get("tie_word_embeddings", False), rope_theta=theta,
                                      max_position_embeddings=max_pos, attention_bias=family == "qwen2",
                                      qk_norm=family == "qwen3"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf(self, dtype=torch.float32):
        """The config.json that HF transformers and vLLM read for this model."""
        return {"architectures": [{v: k for k, v in ARCHITECTURES.items()}[self.family]], "model_type": self.family,
                **{key: getattr(self, field) for key, field in HF_FIELDS.items()}, "hidden_act": "silu",
                # transformers 4 reads rope_theta + rope_scaling, 5 reads rope_parameters (and prefers
                # rope_scaling when it is set): writing both, equal, loads the same RoPE in either.
                "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
                "rope_parameters": {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta},
                "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True, **FAMILY_KEYS[self.family]}


# Named configs for models trained from scratch (the embedded default and test sizes).
TINY_CONFIGS = {
    # "nano" is the embedded memory agent's architecture (checkpoints/tiny): 0.2M parameters,
    # small enough to learn copying (induction heads) in minutes on 2 CPU cores
    "nano": ModelConfig(vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, intermediate_size=128, max_position_embeddings=2048),
    # "mini": 4 layers of width 128 (1.05M parameters), tried for the multi-hop tasks; at the nano
    # recipe's learning rates it had not formed induction heads after 1,500 copy warm-up steps (results/multihop.md)
    "mini": ModelConfig(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                        head_dim=32, intermediate_size=384, max_position_embeddings=2048),
    "tiny": ModelConfig(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                        head_dim=64, intermediate_size=704, max_position_embeddings=2048),
    "micro": ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=128, max_position_embeddings=1024),
}


# --------------------------------------------------------------------------------------------
# rotary embedding

def rope_inv_freq(cfg: ModelConfig):
    """Per-pair inverse frequencies after rope_scaling, and the attention factor yarn scales by."""
    d = cfg.head_dim
    pairs = torch.arange(0, d, 2, dtype=torch.float64, device="cpu")
    inv_freq = 1.0 / cfg.rope_theta ** (pairs / d)  # (D/2,)
    rs = cfg.rope_scaling or {}  # validated and normalised by ModelConfig
    kind = rs.get("rope_type", "default")
    if kind == "default":
        return inv_freq.float(), 1.0
    if kind == "linear":  # positions divided by factor
        return (inv_freq / rs["factor"]).float(), 1.0
    if kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, a smooth blend in between.
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, blended)
        out = torch.where(wavelen < old_len / high, inv_freq, out)
        return out.float(), 1.0
    if kind == "yarn":
        # NTK-by-parts: dimensions that rotate fewer than beta_slow times over the original context
        # are interpolated (/factor), those rotating more than beta_fast times are kept, a linear
        # ramp in between; cos/sin are scaled by mscale(factor) = 0.1*ln(factor)+1 (1 for factor <= 1),
        # or by mscale(factor, mscale) / mscale(factor, mscale_all_dim) where both are given.
        factor = rs["factor"]
        old_len = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def dim_of(rotations):  # the pair index that completes `rotations` turns over old_len
            return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        def mscale(m=1.0):
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        lo, hi = dim_of(beta_fast), dim_of(beta_slow)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        pair = torch.arange(d // 2, dtype=torch.float64, device="cpu")
        ramp = ((pair - lo) / (hi - lo if hi != lo else 1e-3)).clamp(0, 1)  # (D/2,) 0 = keep, 1 = interpolate
        out = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        attn_factor = rs.get("attention_factor")
        if attn_factor is None:
            both = rs.get("mscale") and rs.get("mscale_all_dim")
            attn_factor = mscale(rs["mscale"]) / mscale(rs["mscale_all_dim"]) if both else mscale()
        return out.float(), attn_factor
    raise ValueError(f"rope_scaling type '{kind}' is not supported (default, linear, llama3, yarn)")


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + D/2) of x (B, T, H, D): x * cos + (x2, x1) * sin, with cos = (c, c) and
    sin = (-s, s) of shape (B, T, 1, D) built once per forward (rope_tables), which is
    (x1 c - x2 s, x2 c + x1 s) exactly, in fewer ops."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([x2, x1], dim=-1) * sin).to(x.dtype)


def rope_tables(position_ids, inv_freq, attn_factor):
    """cos (c, c) and sin (-s, s) of every position's angles, (B, T, 1, D), for apply_rope."""
    angles = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    c, s = angles.cos() * attn_factor, angles.sin() * attn_factor
    return torch.cat([c, c], -1)[:, :, None, :], torch.cat([-s, s], -1)[:, :, None, :]


# --------------------------------------------------------------------------------------------
# the network

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalised in fp32, then cast back and scaled
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class CausalAttention:
    """Dense backend: each row of the batch is one sequence, attended causally."""

    def attend(self, layer, q, k, v):  # (B, T, nh|nkv, hd) -> (B, T, nh, hd)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=k.shape[2] != q.shape[2]).transpose(1, 2)


CAUSAL = CausalAttention()


@dataclass
class PackedRows:
    """Backend for packed training rows: several sequences laid end to end in each row, positions
    restarting at 0 at each one. Sequence s goes to row s of a right-padded (num_seqs, max_len)
    layout, each token at its position: plain causal attention there never sees another sequence
    nor the padding, and costs num_seqs x max_len^2 per layer instead of T^2 per packed row."""
    seq: torch.Tensor  # (B*T,) which sequence each token is in
    pos: torch.Tensor  # (B*T,) its position in that sequence
    num_seqs: int
    max_len: int

    @classmethod
    def from_positions(cls, position_ids):
        pos = position_ids.flatten()  # (B*T,)
        assert bool((position_ids[:, 0] == 0).all()), "each packed row must start a sequence at position 0"
        seq = (pos == 0).cumsum(0) - 1
        return cls(seq, pos, int(seq[-1]) + 1, int(pos.max()) + 1)

    def attend(self, layer, q, k, v):  # (B, T, nh|nkv, hd) -> (B, T, nh, hd)
        B, T = q.shape[:2]
        pad = lambda t: t.new_zeros(self.num_seqs, self.max_len, *t.shape[2:]).index_put((self.seq, self.pos),
                                                                                         t.flatten(0, 1))
        return CAUSAL.attend(layer, pad(q), pad(k), pad(v))[self.seq, self.pos].view(B, T, *q.shape[2:])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_eps)

    def forward(self, x, cos, sin, attn):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attn.attend(self.layer_idx, q, k, v)  # (B, T, nh, hd)
        return self.o_proj(y.reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # fp32 RoPE frequencies, kept out of the state dict and of .to(dtype): bf16 angles are wrong.
        self.inv_freq, self.rope_attn_factor = rope_inv_freq(cfg)
        self.gradient_checkpointing = False  # recompute each block in backward (saves activations)

    def init_weights(self, seed=0, std=0.02):
        """Fresh random weights for a from-scratch model (normal(0, std) matrices, unit norms)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def hidden(self, input_ids, position_ids=None, attn=None):
        """Final-normed hidden states (B, T, C). Without position_ids: one sequence per row, causal.
        With position_ids that restart at 0, each restart opens a new sequence that cannot see the
        tokens before it (packed training rows). attn: an explicit backend (the engine's PagedKV)."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            attn = attn or CAUSAL
        attn = attn or PackedRows.from_positions(position_ids)
        if self.inv_freq.device != input_ids.device:
            self.inv_freq = self.inv_freq.to(input_ids.device)
        cos, sin = rope_tables(position_ids, self.inv_freq, self.rope_attn_factor)  # (B, T, 1, hd)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        for block in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, attn, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn)
        return self.norm(x)

    def forward(self, input_ids, position_ids=None, attn=None, logits_rows=None, target_ids=None,
                **logprob_kwargs):
        """Logits (B, T, V), or (B, len(logits_rows), V) for those token rows only (the engine needs
        the last token of each sequence); with target_ids, token_logprobs(...) instead. Everything
        goes through forward so that wrappers that hook it (FSDP's all-gather) see every call."""
        if target_ids is not None:
            return self.token_logprobs(input_ids, target_ids, position_ids, **logprob_kwargs)
        h = self.hidden(input_ids, position_ids, attn)  # (B, T, C)
        return self.lm_head(h if logits_rows is None else h[:, logits_rows])

    def token_logprobs(self, input_ids, target_ids, position_ids, temperature=1.0, chunk_size=1024,
                       return_entropy=False):
        """log p(target_ids[b, t] | tokens <= t of the same sequence), shape (B, T), for packed rows
        (see `hidden`). The LM head runs on `chunk_size` tokens at a time under activation
        checkpointing, so no (B*T, V) fp32 logits tensor ever exists, forward or backward.
        With return_entropy, also the (detached) entropy of each position's distribution."""
        h = self.hidden(input_ids, position_ids).flatten(0, 1)  # (B*T, C)
        targets = target_ids.flatten()  # (B*T,)
        logps, ents = [], []
        for s in range(0, h.shape[0], chunk_size):
            args = (h[s:s + chunk_size], targets[s:s + chunk_size], temperature, return_entropy)
            if torch.is_grad_enabled():
                lp, ent = checkpoint(self._chunk_logprobs, *args, use_reentrant=False)
            else:
                lp, ent = self._chunk_logprobs(*args)
            logps.append(lp)
            ents.append(ent)
        logp = torch.cat(logps).view(target_ids.shape)
        if return_entropy:
            return logp, torch.cat(ents).view(target_ids.shape)
        return logp

    def _chunk_logprobs(self, h, targets, temperature, with_entropy):
        logits = self.lm_head(h).float() / temperature  # (n, V)
        logz = logits.logsumexp(-1)  # (n,)
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
        ent = torch.zeros_like(logz)
        if with_entropy:
            with torch.no_grad():
                p = (logits - logz[:, None]).exp()
                ent = logz - (p * logits).sum(-1)  # H = log Z - E_p[logit]
        return logp, ent

    # ----------------------------------------------------------------------------------------
    # checkpoints in HF format

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu"):
        """Load a HF model directory (config.json + model.safetensors, or shards listed in
        model.safetensors.index.json). Tensors go straight to `dtype` (a torch.dtype or its name,
        "bfloat16") on `device`, one at a time; the model is built on the meta device, so no full
        fp32 copy is ever made. Every tensor is checked finite."""
        dtype = as_dtype(dtype)
        cfg = ModelConfig.from_hf(path)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {hf_name(n): p for n, p in model.named_parameters()}  # tied head appears once
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            weight_map = read_json(index, "a safetensors index").get("weight_map")
            if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
                raise ValueError(f"{index}: not a safetensors index with a weight_map of file names")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        state = {}
        for fname in files:
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                raise FileNotFoundError(f"{fpath}: weight file listed in the index is missing")
            state.update(_load_weights(fpath, expected, cfg, dtype, device))
        missing = sorted(k for k in expected if our_name(k) not in state)
        if missing:
            raise ValueError(f"{path}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30, state_dict=None):
        """Write config.json + safetensors (sharded with an index above max_shard_bytes).
        state_dict: full tensors by our names, when the module holds shards (FSDP export)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        params = state_dict or dict(self.named_parameters())
        if self.config.tie_word_embeddings:  # a tied head is stored once, as the embedding
            params = {n: p for n, p in params.items() if n != "lm_head.weight"}
        tensors = {hf_name(n): p.detach().cpu().contiguous() for n, p in params.items()}
        dtype = next(iter(tensors.values())).dtype
        write_file(os.path.join(path, "config.json"), json.dumps(self.config.to_hf(dtype), indent=2))
        shards, size = [{}], 0
        for k, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = t
            size += nbytes
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_file(os.path.join(path, "model.safetensors.index.json"),
                   json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def _load_weights(fpath, expected, cfg, dtype, device):
    """The tensors of one safetensors file, by our names, checked against the model's expected
    shapes (`expected`: HF key -> meta parameter) and for NaN/inf, as `dtype` on `device`."""
    from safetensors import SafetensorError, safe_open

    state = {}
    try:
        with safe_open(fpath, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # some exports save the RoPE buffer; we recompute it
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # tied: the embedding is the head
                if key not in expected:
                    raise ValueError(f"{fpath}: unexpected weight '{key}' for a {cfg.family} model")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(expected[key].shape):
                    raise ValueError(f"{fpath}: weight '{key}' has shape {tuple(t.shape)}, "
                                     f"config.json implies {tuple(expected[key].shape)}")
                x = t.to(device=device, dtype=dtype)
                if not torch.isfinite(x).all():
                    why = "holds NaN or inf" if not torch.isfinite(t).all() else f"overflows {dtype}"
                    raise ValueError(f"{fpath}: weight '{key}' {why}")
                state[our_name(key)] = x
    except SafetensorError as e:  # truncated or not safetensors at all
        raise ValueError(f"{fpath}: not a readable safetensors file ({e})") from None
    return state


def as_dtype(dtype):
    """A torch floating dtype, given as itself or by name ("bfloat16", "torch.float32")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a torch floating dtype (e.g. torch.bfloat16 or 'bfloat16')")
    return dtype


def hf_name(name):
    """Our parameter name -> the HF checkpoint key."""
    return name if name.startswith("lm_head.") else "model." + name


def our_name(key):
    return key.removeprefix("model.")


def build_model(name_or_path, dtype=torch.float32, device="cpu", seed=0):
    """A checkpoint directory, or the name of a tiny from-scratch config (fresh random weights).
    dtype: a torch.dtype or its name."""
    if name_or_path in TINY_CONFIGS:
        cfg = replace(TINY_CONFIGS[name_or_path])
        return Transformer(cfg).init_weights(seed).to(device=device, dtype=as_dtype(dtype))
    check_model_name(name_or_path)
    return Transformer.from_pretrained(name_or_path, dtype=dtype, device=device)


def check_model_name(name):
    if name not in TINY_CONFIGS and not os.path.isdir(name):
        raise SettingError(f"'model': {name!r} is neither a checkpoint directory nor one of {sorted(TINY_CONFIGS)}")
