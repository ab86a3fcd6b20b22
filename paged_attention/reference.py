"""Pure-PyTorch twins of the Triton paged-KV kernels, with the same signatures and results.

They are the CPU production path of the engine and the ground truth of the kernel tests. Pages are
gathered per call and the attention math runs in fp32. Cache layout: [num_blocks, block_size, Hkv, D];
a slot is block_id * block_size + offset.
"""

import torch
import torch.nn.functional as F


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [N, Hkv, D] into the cache slots slot_mapping [N]; slot -1 skips a token."""
    if bool((slot_mapping < 0).any()):  # only graph padding carries -1  # pragma: no mutate  else a no-op
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    # index_copy_ on the flat (slots, Hkv, D) view: one contiguous copy per token, no index math
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping.long(), k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping.long(), v.to(v_cache.dtype))


def _prefill_plan(cu_seqlens_q, context_lens, block_tables, block_size, device):
    """Per sequence: (query rows, page ids, context length, bottom-right causal mask or None)."""
    plan = []
    cu, ctx = cu_seqlens_q.tolist(), context_lens.tolist()
    for b, n in enumerate(ctx):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        pages = block_tables[b, : (n + block_size - 1) // block_size].long()
        # query i sits at position n - qlen + i and sees keys 0..that position: bottom-right causal
        # (with no cached prefix that is plain causal, which SDPA does fastest)
        qlen = end - start
        causal = None if qlen == n else torch.ones(qlen, n, dtype=torch.bool, device=device).tril(n - qlen)
        plan.append((start, end, pages, n, causal))
    return plan


def prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, scale,
                      plans=None):
    """Causal attention of packed new tokens q [N, Hq, D] over each sequence's cached keys.

    The new tokens of sequence b are the last qlen_b of its context_lens[b] cached positions, so a
    cached prefix (prefix-cache hit, earlier prefill chunk) is attended to in full. max_seqlen_q only
    sizes the Triton grid. `plans`: a dict shared by the layers of one step, to build the per-sequence
    page lists and masks once.
    """
    plans = {} if plans is None else plans
    if "prefill" not in plans:
        plans["prefill"] = _prefill_plan(cu_seqlens_q, context_lens, block_tables, k_cache.shape[1], q.device)
    out = torch.empty_like(q)
    for start, end, pages, n, causal in plans["prefill"]:
        # 4-D (batch of one) inputs take SDPA's fused CPU kernel; 3-D ones fall back to plain math
        qb = q[start:end].float().transpose(0, 1)[None]                                 # (1, Hq, qlen, D)
        kb = k_cache.index_select(0, pages).flatten(0, 1)[:n].float().transpose(0, 1)[None]  # (1, Hkv, n, D)
        vb = v_cache.index_select(0, pages).flatten(0, 1)[:n].float().transpose(0, 1)[None]  # (1, Hkv, n, D)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=causal, is_causal=causal is None, scale=scale,
                                            enable_gqa=True)
        out[start:end] = ob[0].transpose(0, 1).to(q.dtype)
    return out


# decode sorts the batch by length and cuts it into buckets of at most this many padded keys (a longer
# sequence gets a bucket of its own): each pads only to its own longest, and its gathered K/V are still
# in cache when attention reads them. Smaller buckets pay more per-op overhead; 2-4K was best on CPU.
DECODE_BUCKET_TOKENS = 2048


def _decode_plan(context_lens, block_tables, block_size, device):
    """-> (order, buckets): rows sorted by length (those with keys), cut into buckets of
    (rows a:z, page ids (b * pages,), key mask (b, 1, 1, N) or None when the bucket is one sequence
    whose keys are read exactly)."""
    lens, order = context_lens.long().sort()
    n = lens.tolist()
    first = n.count(0)  # rows without keys (graph padding) get zeros
    lens, order, n = lens[first:], order[first:], n[first:]
    if not n:
        return order, []
    cuts = [0]  # bucket i is sorted rows cuts[i]:cuts[i+1]; its last row is its longest
    for i in range(1, len(n)):
        if (i + 1 - cuts[-1]) * n[i] > DECODE_BUCKET_TOKENS:
            cuts.append(i)
    cuts.append(len(n))
    # Table entries past a sequence's last page are arbitrary (maybe -1), so those pages read block 0
    # instead; they are padding, masked like the rest.
    max_pages = -(-n[-1] // block_size)
    owned = torch.arange(max_pages, device=device) * block_size < lens[:, None]   # (S, max_pages)
    tables = torch.where(owned, block_tables[order, :max_pages], 0)               # (S, max_pages)
    valid = torch.arange(max_pages * block_size, device=device) < lens[:, None]   # (S, max_pages * bs)
    buckets = []
    for a, z in zip(cuts[:-1], cuts[1:]):
        pages = -(-n[z - 1] // block_size)
        mask = None if z - a == 1 else valid[a:z, None, None, :pages * block_size]
        buckets.append((a, z, tables[a:z, :pages].flatten(), pages * block_size, n[z - 1], mask))
    return order, buckets


def decode_attention(q, k_cache, v_cache, context_lens, block_tables, scale, num_splits=None, plans=None):
    """One query per sequence, q [B, Hq, D], at position context_lens[b] - 1 over keys 0..that position.

    num_splits only matters to the split-KV Triton kernel; here the softmax is exact in one pass.
    A sequence with context_lens[b] == 0 (batch padding) gets zeros. `plans`: as in prefill_attention.
    Unwritten cache slots must hold finite values (the engine zeroes its cache): a masked key still
    enters the matmul, and NaN times a zero weight is NaN.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    plans = {} if plans is None else plans
    if "decode" not in plans:
        plans["decode"] = _decode_plan(context_lens, block_tables, k_cache.shape[1], q.device)
    order, buckets = plans["decode"]
    out = torch.zeros_like(q)
    if not buckets:
        return out
    # the G query heads that share a kv head are its G "queries": SDPA needs no GQA repeat of K/V
    qs = q[order].float().view(-1, Hkv, Hq // Hkv, D)                                  # (S, Hkv, G, D)
    outs = []
    for a, z, idx, N, longest, mask in buckets:
        b = z - a
        k = k_cache.index_select(0, idx).view(b, N, Hkv, D).float()                    # (b, N, Hkv, D)
        v = v_cache.index_select(0, idx).view(b, N, Hkv, D).float()
        if mask is None:  # one sequence: read exactly its keys, no mask
            k, v = k[:, :longest], v[:, :longest]
        # SDPA reads K/V in place through (b, Hkv, N, D) views
        outs.append(F.scaled_dot_product_attention(qs[a:z], k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=mask, scale=scale))
    out[order] = torch.cat(outs).reshape(-1, Hq, D).to(q.dtype)                       # (S, Hq, D)
    return out
