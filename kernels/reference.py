"""Pure-PyTorch twins of the Triton paged-KV kernels, with the same signatures and results.

They are the CPU production path of the engine and the ground truth of the kernel tests. Pages are
gathered per call and the attention math runs in fp32. Cache layout: [num_blocks, block_size, Hkv, D];
a slot is block_id * block_size + offset.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [N, Hkv, D] into the cache slots slot_mapping [N]; slot -1 skips a token."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def _gather(cache, block_table, n):
    """Positions 0..n-1 of one sequence as a contiguous (n, Hkv, D) tensor."""
    block_size = cache.shape[1]
    pages = block_table[: (n + block_size - 1) // block_size].long()
    return cache.index_select(0, pages).flatten(0, 1)[:n]


def prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, scale):
    """Causal attention of packed new tokens q [N, Hq, D] over each sequence's cached keys.

    The new tokens of sequence b are the last qlen_b of its context_lens[b] cached positions, so a
    cached prefix (prefix-cache hit, earlier prefill chunk) is attended to in full. max_seqlen_q only
    sizes the Triton grid.
    """
    out = torch.empty_like(q)
    cu, ctx = cu_seqlens_q.tolist(), context_lens.tolist()
    for b, n in enumerate(ctx):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        # 4-D (batch of one) inputs take SDPA's fused CPU kernel; 3-D ones fall back to plain math
        qb = q[start:end].float().transpose(0, 1)[None]                        # (1, Hq, qlen, D)
        kb = _gather(k_cache, block_tables[b], n).float().transpose(0, 1)[None]  # (1, Hkv, n, D)
        vb = _gather(v_cache, block_tables[b], n).float().transpose(0, 1)[None]  # (1, Hkv, n, D)
        # query i sits at position n - qlen + i and sees keys 0..that position: bottom-right causal
        causal = causal_lower_right(end - start, n)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=causal, scale=scale, enable_gqa=True)
        out[start:end] = ob[0].transpose(0, 1).to(q.dtype)
    return out


def decode_attention(q, k_cache, v_cache, context_lens, block_tables, scale, num_splits=None):
    """One query per sequence, q [B, Hq, D], at position context_lens[b] - 1 over keys 0..that position.

    num_splits only matters to the split-KV Triton kernel; here the softmax is exact in one pass.
    A sequence with context_lens[b] == 0 (batch padding) gets zeros.
    """
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    L = int(context_lens.max()) if B else 0
    pos = torch.arange(L, device=q.device)
    valid = pos < context_lens[:, None]                                              # (B, L)
    # a padding position re-reads the sequence's first slot, which is written (so finite, where a
    # stale slot could hold NaN) and masked out; only a row with no keys reads a -1 table entry
    pos = torch.where(valid, pos, 0)
    slots = block_tables.long().gather(1, pos // block_size) * block_size + pos % block_size
    slots = slots.clamp(min=0).flatten()
    k = k_cache.view(-1, *k_cache.shape[2:]).index_select(0, slots).view(B, L, Hkv, D).float()  # (B, L, Hkv, D)
    v = v_cache.view(-1, *v_cache.shape[2:]).index_select(0, slots).view(B, L, Hkv, D).float()  # (B, L, Hkv, D)
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=valid[:, None, None], scale=scale, enable_gqa=True)
    return out[:, :, 0].nan_to_num(0.0).to(q.dtype)  # a row with no keys comes out NaN -> 0
