"""Paged KV-cache kernels: write K/V into pages, paged prefill (extend) attention, paged decode attention.

Each call runs either the Triton kernels (triton_paged.py) or their PyTorch twins (reference.py).
backend=None picks $MEMAGENT_KERNELS if set, else "triton" for CUDA tensors and "torch" otherwise.
"""

import os

from . import reference


def _impl(backend, x):
    backend = backend or os.environ.get("MEMAGENT_KERNELS") or ("triton" if x.is_cuda else "torch")
    if backend == "torch":
        return reference
    if backend == "triton":
        from . import triton_paged  # lazily: CPU-only use needs no working triton
        return triton_paged
    raise ValueError(f"unknown kernels backend {backend!r}: expected 'triton' or 'torch'")


def store_kv(k, v, k_cache, v_cache, slot_mapping, backend=None):
    """k, v [N, Hkv, D] -> cache slots slot_mapping [N] (slot -1: skip), in place."""
    _impl(backend, k).store_kv(k, v, k_cache, v_cache, slot_mapping)


def prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, scale,
                      backend=None, plans=None):
    """Causal attention of packed new tokens q [N, Hq, D] over their sequences' cached K/V -> [N, Hq, D].
    plans: a dict shared by the layers of one step, where the reference backend keeps the page lists
    and masks it builds once (the Triton kernels need none)."""
    impl = _impl(backend, q)
    extra = {"plans": plans} if impl is reference else {}
    return impl.prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q,
                                  scale, **extra)


def decode_attention(q, k_cache, v_cache, context_lens, block_tables, scale, num_splits=None, backend=None,
                     plans=None):
    """One query per sequence q [B, Hq, D] over its cached K/V -> [B, Hq, D]. plans: as above."""
    impl = _impl(backend, q)
    extra = {"plans": plans} if impl is reference else {}
    return impl.decode_attention(q, k_cache, v_cache, context_lens, block_tables, scale, num_splits, **extra)
