"""Triton kernels for the paged KV cache and their launch wrappers.

store_kv writes new K/V into their slots; prefill_attention is causal attention of packed new tokens
over cached prefix + themselves (serves prefix-cache hits and chunked prefill); decode_attention is
split-KV flash-decoding: one program per (sequence, kv head, split) computes a partial softmax for the
whole GQA group, and a merge kernel combines the splits. Nothing here reads tensor values on the host,
so decode can be captured in a CUDA graph. On CPU the kernels run under TRITON_INTERPRET=1.
Each wrapper runs the Launches (grid, arguments, constexprs, num_warps, num_stages) that its
*_launches function builds; bench/compile_kernels.py compiles those same launches for GPU targets.

Cache layout: [num_blocks, block_size, Hkv, D], a slot is block_id * block_size + offset. K/V are
walked one tile of BLOCK_N = min(block_size, 64) positions at a time, a tile never crossing a page.
"""

from typing import NamedTuple

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
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {D}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size (k_cache.shape[1]) must be a power of two >= 16, got {block_size}")
    if q.shape[1] % Hkv:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {Hkv}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must share shape and strides, got {tuple(k_cache.shape)} "
                         f"{k_cache.stride()} and {tuple(v_cache.shape)} {v_cache.stride()}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("the head dim of q and of the caches must be contiguous")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")


class Launch(NamedTuple):
    """One kernel launch, kernel[grid](*args, **meta); meta holds the constexprs, num_warps and
    num_stages. The *_launches functions below build them; the wrappers run them, and
    bench/compile_kernels.py compiles the very same ones for a GPU target."""
    kernel: triton.JITFunction
    grid: tuple
    args: tuple
    meta: dict

    def run(self):
        self.kernel[self.grid](*self.args, **self.meta)


def store_kv_launches(k, v, k_cache, v_cache, slot_mapping):
    N, H, D = k.shape
    meta = dict(H=H, BLOCK_H=triton.next_power_of_2(H), D=D, BLOCK_SIZE=k_cache.shape[1], num_warps=4, num_stages=1)
    args = (k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    return [Launch(_store_kv_kernel, (N,), args, meta)]


def prefill_launches(q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, scale,
                     interpret):
    """interpret: the kernels run under TRITON_INTERPRET (CPU tensors)."""
    Hq, B, block_size = q.shape[1], context_lens.shape[0], k_cache.shape[1]
    block_m = 16 if interpret else 64  # small tiles keep the interpreter's masked work small
    D = q.shape[2]
    # ptxas at D = 128 with 64-key tiles on sm_80: 4 warps take all 255 registers and still spill, 8 warps
    # spill at 2 or 3 stages (128 registers) and not at 1 (158); sm_90 spills in none of these. So large
    # heads get 8 warps and 1 stage (bench/compile_kernels.py prints registers and spills per target)
    big = D >= 128
    meta = dict(G=Hq // k_cache.shape[2], D=D, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=min(block_size, 64),
                UPCAST=interpret and q.dtype == torch.bfloat16, num_warps=8 if big else 4, num_stages=1 if big else 2)
    args = (q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables, scale, q.stride(0), q.stride(1),
            out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0))
    return [Launch(_prefill_kernel, (triton.cdiv(max_seqlen_q, block_m), Hq, B), args, meta)]


def decode_launches(q, k_cache, v_cache, m, l, acc, out, context_lens, block_tables, scale, interpret):
    """m, l [B, Hq, splits] and acc [B, Hq, splits, D] (fp32) hold the split kernel's partials for the merge."""
    B, Hq, D = q.shape
    Hkv, splits = k_cache.shape[2], m.shape[2]
    G = Hq // Hkv
    split_meta = dict(G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, BLOCK_SIZE=k_cache.shape[1],
                      BLOCK_N=min(k_cache.shape[1], 64), NUM_SPLITS=splits,
                      UPCAST=interpret and q.dtype == torch.bfloat16, num_warps=4, num_stages=2)
    split_args = (q, k_cache, v_cache, m, l, acc, context_lens, block_tables, scale, Hq, q.stride(0), q.stride(1),
                  k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))
    merge_meta = dict(D=D, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), num_warps=4, num_stages=1)
    return [Launch(_decode_split_kernel, (B, Hkv, splits), split_args, split_meta),
            Launch(_decode_merge_kernel, (B * Hq,), (m, l, acc, out), merge_meta)]


def _interpreted(x):
    return x.device.type == "cpu"  # CPU tensors can only run under the interpreter


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    _check(k, k_cache, v_cache)
    if v.stride(-1) != 1:
        raise ValueError("the head dim of v must be contiguous")
    for launch in store_kv_launches(k, v, k_cache, v_cache, slot_mapping):
        launch.run()


def prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, scale):
    _check(q, k_cache, v_cache)
    out = torch.empty_like(q)
    for launch in prefill_launches(q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables,
                                   max_seqlen_q, scale, _interpreted(q)):
        launch.run()
    return out


def sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_num_splits(batch, num_kv_heads, max_blocks, sms):
    """A static split count (shapes only, never data): about two waves of programs over the GPU's sms
    SMs, at most one split per 4 pages of the longest possible sequence, and at most 32."""
    want = triton.cdiv(2 * sms, max(batch * num_kv_heads, 1))
    return max(1, min(want, triton.cdiv(max_blocks, 4), 32))


def decode_partials(q, splits):
    """Empty m, l [B, Hq, splits] and acc [B, Hq, splits, D] (fp32) for the split kernel's partials."""
    B, Hq, D = q.shape
    m = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    return m, torch.empty_like(m), torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)


def decode_attention(q, k_cache, v_cache, context_lens, block_tables, scale, num_splits=None):
    _check(q, k_cache, v_cache)
    splits = num_splits or default_num_splits(q.shape[0], k_cache.shape[2], block_tables.shape[1], sm_count(q.device))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous: the merge writes rows of D
    for launch in decode_launches(q, k_cache, v_cache, *decode_partials(q, splits), out, context_lens, block_tables,
                                  scale, _interpreted(q)):
        launch.run()
    return out
