"""Pure-PyTorch twins of the Triton paged-KV kernels, with the same signatures and results.

They are the CPU production path of the engine and the ground truth of the kernel tests. Pages are
gathered per call and the attention math runs in fp32. Cache layout: [num_blocks, block_size, Hkv, D];
a slot is block_id * block_size + offset.
"""

import torch
import torch.nn.functional as F


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
        # (with no cached prefix that is plain causal, which SDPA does fastest)
        qlen = end - start
        causal = None if qlen == n else torch.ones(qlen, n, dtype=torch.bool, device=q.device).tril(n - qlen)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=causal, is_causal=causal is None, scale=scale,
                                            enable_gqa=True)
        out[start:end] = ob[0].transpose(0, 1).to(q.dtype)
    return out


# decode sorts the batch by length and cuts it into buckets of at most this many padded keys (a longer
# sequence gets a bucket of its own): each pads only to its own longest, and its gathered K/V are still
# in cache when attention reads them. Smaller buckets pay more per-op overhead; 2-4K was best on CPU.
DECODE_BUCKET_TOKENS = 2048


def decode_attention(q, k_cache, v_cache, context_lens, block_tables, scale, num_splits=None):
    """One query per sequence, q [B, Hq, D], at position context_lens[b] - 1 over keys 0..that position.

    num_splits only matters to the split-KV Triton kernel; here the softmax is exact in one pass.
    A sequence with context_lens[b] == 0 (batch padding) gets zeros.
    """
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)  # rows with no keys stay zero
    lens, order = context_lens.long().sort()
    n = lens.tolist()
    first = n.count(0)
    if first == B:
        return out
    lens, order, n = lens[first:], order[first:], n[first:]  # the S rows with keys, shortest first
    cuts = [0]  # bucket i is sorted rows cuts[i]:cuts[i+1]; its last row is its longest
    for i in range(1, len(n)):
        if (i + 1 - cuts[-1]) * n[i] > DECODE_BUCKET_TOKENS:
            cuts.append(i)
    cuts.append(len(n))
    # built once in sorted order, sliced per bucket. Table entries past a sequence's last page are
    # arbitrary (maybe -1), so those pages read block 0 instead; they are padding like the rest.
    max_pages = -(-n[-1] // block_size)
    owned = torch.arange(max_pages, device=q.device) * block_size < lens[:, None]   # (S, max_pages)
    tables = torch.where(owned, block_tables[order, :max_pages], 0)                 # (S, max_pages)
    valid = torch.arange(max_pages * block_size, device=q.device) < lens[:, None]   # (S, max_pages * bs)
    # the G query heads that share a kv head are its G "queries": SDPA needs no GQA repeat of K/V
    qs = q[order].float().view(-1, Hkv, Hq // Hkv, D)                               # (S, Hkv, G, D)
    outs = []
    for a, z in zip(cuts[:-1], cuts[1:]):
        b, pages = z - a, -(-n[z - 1] // block_size)
        N = pages * block_size
        idx = tables[a:z, :pages].flatten()  # whole pages, one index_select each for K and V
        k = k_cache.index_select(0, idx).view(b, N, Hkv, D).float()                 # (b, N, Hkv, D)
        v = v_cache.index_select(0, idx).view(b, N, Hkv, D).float()                 # (b, N, Hkv, D)
        # padding slots may hold NaN (unowned cache slots), which the mask alone would let through:
        # NaN plus a -inf mask is NaN, and a zero softmax weight times NaN is NaN. So zero them.
        pad = valid[a:z, :N].logical_not().flatten().nonzero().squeeze(1)
        k.view(b * N, Hkv * D).index_fill_(0, pad, 0.0)
        v.view(b * N, Hkv * D).index_fill_(0, pad, 0.0)
        # SDPA reads K/V in place through (b, Hkv, N, D) views
        outs.append(F.scaled_dot_product_attention(qs[a:z], k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=valid[a:z, None, None, :N], scale=scale))
    out[order] = torch.cat(outs).reshape(-1, Hq, D).to(q.dtype)                    # (S, Hq, D)
    return out
