"""Triton kernels for the paged KV cache and their launch wrappers.

store_kv writes new K/V into their slots; prefill_attention is causal attention of packed new tokens
over cached prefix + themselves (serves prefix-cache hits and chunked prefill); decode_attention is
split-KV flash-decoding: one program per (sequence, kv head, split) computes a partial softmax for the
whole GQA group, and a merge kernel combines the splits. Nothing here reads tensor values on the host,
so decode can be captured in a CUDA graph. On CPU the kernels run under TRITON_INTERPRET=1.

Cache layout: [num_blocks, block_size, Hkv, D], a slot is block_id * block_size + offset. K/V are
walked one tile of BLOCK_N = min(block_size, 64) positions at a time, a tile never crossing a page.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, s_kn, s_kh, s_vn, s_vh, s_cb, s_cs, s_ch,
                     H: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i).to(tl.int64)  # int64: offsets into a large cache overflow int32
    if slot < 0:
        return  # padding token
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = h < H
    dst = (slot // BLOCK_SIZE) * s_cb + (slot % BLOCK_SIZE) * s_cs + h * s_ch + d  # (BLOCK_H, D)
    tl.store(kc_ptr + dst, tl.load(k_ptr + i * s_kn + h * s_kh + d, mask=mask), mask=mask)
    tl.store(vc_ptr + dst, tl.load(v_ptr + i * s_vn + h * s_vh + d, mask=mask), mask=mask)


@triton.jit
def _online_softmax_step(q, kt, v, keep, m_i, l_i, acc, scale):
    """Fold one K/V tile into running softmax state: m (row max), l (row sum of exp), acc (sum of
    exp-weighted values), each rescaled when the max grows. keep masks the visible keys."""
    # "ieee" only changes fp32 operands: exact fp32 instead of tf32; 16-bit dots are unaffected
    s = tl.dot(q, kt, input_precision="ieee") * scale                      # (rows, BLOCK_N)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")   # (rows, D)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, o_ptr, cu_ptr, ctx_ptr, bt_ptr, scale,
                    s_qn, s_qh, s_on, s_oh, s_cb, s_cs, s_ch, s_bt,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    m_block, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return  # the grid is sized for the longest sequence
    ctx = tl.load(ctx_ptr + b)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    pos = ctx - q_len + rows                           # its position in the sequence
    d = tl.arange(0, D)
    q_mask = rows[:, None] < q_len
    q = tl.load(q_ptr + (q_start + rows)[:, None] * s_qn + h * s_qh + d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)  # (BLOCK_M, D)
    kv_head = (h // G) * s_ch
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # causal: this tile's last query sees keys up to its own position; the first tile holds key 0,
    # which every row sees, so m_i is finite after one step
    kv_end = tl.minimum(ctx, ctx - q_len + (m_block + 1) * BLOCK_M)
    for start in range(0, kv_end, BLOCK_N):
        page = tl.load(bt_ptr + b * s_bt + start // BLOCK_SIZE).to(tl.int64)
        cols = start + tl.arange(0, BLOCK_N)                           # key positions
        base = page * s_cb + (cols % BLOCK_SIZE) * s_cs + kv_head      # (BLOCK_N,)
        kv_mask = cols < ctx  # slots past the end may hold anything, NaN included: never load them
        kt = tl.load(kc_ptr + base[None, :] + d[:, None], mask=kv_mask[None, :], other=0.0)  # (D, BLOCK_N)
        v = tl.load(vc_ptr + base[:, None] + d[None, :], mask=kv_mask[:, None], other=0.0)   # (BLOCK_N, D)
        if UPCAST:
            kt, v = kt.to(tl.float32), v.to(tl.float32)
        m_i, l_i, acc = _online_softmax_step(q, kt, v, cols[None, :] <= pos[:, None], m_i, l_i, acc, scale)
    out = acc / l_i[:, None]
    tl.store(o_ptr + (q_start + rows)[:, None] * s_on + h * s_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, m_ptr, l_ptr, acc_ptr, ctx_ptr, bt_ptr, scale, num_heads,
                         s_qb, s_qh, s_cb, s_cs, s_ch, s_bt,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr):
    b, kv_h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    # the sequence's tiles are dealt evenly to the splits; late splits of short sequences stay empty
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), NUM_SPLITS)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, ctx)
    g = tl.arange(0, BLOCK_G)  # the group's query heads, padded to >= 16 rows for tl.dot
    heads = kv_h * G + g
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g[:, None] < G, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)  # (BLOCK_G, D)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        page = tl.load(bt_ptr + b * s_bt + start // BLOCK_SIZE).to(tl.int64)
        cols = start + tl.arange(0, BLOCK_N)
        base = page * s_cb + (cols % BLOCK_SIZE) * s_cs + kv_h * s_ch    # (BLOCK_N,)
        kv_mask = cols < ctx
        kt = tl.load(kc_ptr + base[None, :] + d[:, None], mask=kv_mask[None, :], other=0.0)  # (D, BLOCK_N)
        v = tl.load(vc_ptr + base[:, None] + d[None, :], mask=kv_mask[:, None], other=0.0)   # (BLOCK_N, D)
        if UPCAST:
            kt, v = kt.to(tl.float32), v.to(tl.float32)
        # each tile holds >= 1 valid key, so m stays finite
        m_i, l_i, acc = _online_softmax_step(q, kt, v, kv_mask[None, :], m_i, l_i, acc, scale)
    # partials of an empty split: m = -inf, l = 0, acc = 0, which the merge weighs as nothing
    row = (b * num_heads + heads) * NUM_SPLITS + split  # into [B, Hq, NUM_SPLITS]
    keep = g < G
    tl.store(m_ptr + row, m_i, mask=keep)
    tl.store(l_ptr + row, l_i, mask=keep)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=keep[:, None])


@triton.jit
def _decode_merge_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # b * Hq + h
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    live = sp < NUM_SPLITS
    m = tl.load(m_ptr + row * NUM_SPLITS + sp, mask=live, other=float("-inf"))
    l = tl.load(l_ptr + row * NUM_SPLITS + sp, mask=live, other=0.0)
    acc = tl.load(acc_ptr + (row * NUM_SPLITS + sp)[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no keys at all (context 0): weights all 0
    w = tl.exp(m - m_max)                                  # (BLOCK_S,)
    l_sum = tl.sum(l * w, 0)                               # >= 1 whenever there is a key
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_sum > 0, l_sum, 1.0)  # (D,)
    tl.store(o_ptr + row * D + d, out.to(o_ptr.dtype.element_ty))


def _check(q, k_cache, v_cache):
    D, block_size, Hkv = q.shape[-1], k_cache.shape[1], k_cache.shape[2]
    assert D >= 16 and D & (D - 1) == 0, f"head dim must be a power of two >= 16, got {D}"
    assert block_size >= 16 and block_size & (block_size - 1) == 0, \
        f"block_size must be a power of two >= 16, got {block_size}"
    assert q.shape[1] % Hkv == 0, f"query heads {q.shape[1]} not a multiple of kv heads {Hkv}"
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), \
        "k_cache and v_cache must share shape and strides"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1, "the head dim must be contiguous"
    assert q.dtype == k_cache.dtype == v_cache.dtype, f"dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"


def _upcast(x):
    # CPU tensors can only run under the interpreter, whose bf16 arithmetic is broken: compute in fp32
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    N, H, D = k.shape
    _check(k, k_cache, v_cache)
    assert v.stride(-1) == 1, "the head dim must be contiguous"
    _store_kv_kernel[(N,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                           v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                           H=H, BLOCK_H=triton.next_power_of_2(H), D=D, BLOCK_SIZE=k_cache.shape[1])


def prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, scale):
    _check(q, k_cache, v_cache)
    _, Hq, D = q.shape
    B, block_size = context_lens.shape[0], k_cache.shape[1]
    out = torch.empty_like(q)
    block_m = 16 if q.device.type == "cpu" else 64  # small tiles keep the interpreter's masked work small
    grid = (triton.cdiv(max_seqlen_q, block_m), Hq, B)
    _prefill_kernel[grid](q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables, scale,
                          q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
                          k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
                          G=Hq // k_cache.shape[2], D=D, BLOCK_SIZE=block_size, BLOCK_M=block_m,
                          BLOCK_N=min(block_size, 64), UPCAST=_upcast(q))
    return out


def default_num_splits(batch, num_kv_heads, max_blocks, device):
    """A static split count (shapes only, never data): about two waves of programs over the GPU's SMs,
    at most one split per 4 pages of the longest possible sequence, and at most 32."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = triton.cdiv(2 * sms, max(batch * num_kv_heads, 1))
    return max(1, min(want, triton.cdiv(max_blocks, 4), 32))


def decode_attention(q, k_cache, v_cache, context_lens, block_tables, scale, num_splits=None):
    _check(q, k_cache, v_cache)
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    splits = num_splits or default_num_splits(B, Hkv, block_tables.shape[1], q.device)
    m = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, m, l, acc, context_lens, block_tables, scale, Hq, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, BLOCK_SIZE=block_size,
        BLOCK_N=min(block_size, 64), NUM_SPLITS=splits, UPCAST=_upcast(q))
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(B * Hq,)](m, l, acc, out, D=D, NUM_SPLITS=splits,
                                    BLOCK_S=triton.next_power_of_2(splits))
    return out
