# Paged KV-cache kernels. The PyTorch reference is checked against dense attention over contiguous
# K/V; every Triton kernel is then checked against the reference (on CPU through the interpreter,
# so shapes stay tiny). Cache slots that no sequence owns are NaN for the Triton kernels: reading one
# would show. The reference decode may read them (masked), so it is given finite ones, as the
# engine's zeroed cache has.
import math

import pytest
import torch

import paged_attention
from paged_attention import reference


def make_paged(ctx_lens, Hkv, D, block_size, dtype, device="cpu", seed=0, fill=float("nan")):
    """Dense per-sequence K/V and the same K/V scattered over shuffled cache pages; other slots = fill."""
    gen = torch.Generator().manual_seed(seed)
    pages = [math.ceil(n / block_size) for n in ctx_lens]
    num_blocks = sum(pages) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.full((num_blocks, block_size, Hkv, D), fill, dtype=dtype)
    v_cache = torch.full_like(k_cache, fill)
    block_tables = torch.full((len(ctx_lens), max(pages) + 1), -1, dtype=torch.int32)  # unused entries: -1
    ks, vs = [], []
    for b, n in enumerate(ctx_lens):
        k, v = torch.randn(2, n, Hkv, D, generator=gen).to(dtype)
        block_tables[b, : pages[b]] = torch.tensor([perm.pop() for _ in range(pages[b])], dtype=torch.int32)
        for p in range(n):
            k_cache[block_tables[b, p // block_size], p % block_size] = k[p]
            v_cache[block_tables[b, p // block_size], p % block_size] = v[p]
        ks.append(k.to(device))
        vs.append(v.to(device))
    context_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    return ks, vs, k_cache.to(device), v_cache.to(device), context_lens, block_tables.to(device)


def dense_attention(q, k, v, scale):
    """q [qlen, Hq, D] are the last qlen positions of k, v [n, Hkv, D]; plain causal softmax in fp64."""
    qlen, n, G = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)  # (n, Hq, D)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    future = torch.arange(n)[None, :] > torch.arange(n - qlen, n)[:, None]
    s = s.masked_fill(future.to(s.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def prefill_case(seqs, Hkv, G, D, block_size, dtype, device="cpu", fill=float("nan")):
    """seqs: (qlen, context_len) pairs; context_len > qlen is a prefix hit."""
    ks, vs, k_cache, v_cache, ctx, bt = make_paged([n for _, n in seqs], Hkv, D, block_size, dtype, device, fill=fill)
    q = torch.randn(sum(ql for ql, _ in seqs), Hkv * G, D).to(dtype=dtype, device=device)
    cu = torch.tensor([0] + [ql for ql, _ in seqs], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    return q, k_cache, v_cache, cu, ctx, bt, max(ql for ql, _ in seqs), ks, vs


SEQS = [(1, 1), (1, 37), (20, 20), (17, 50), (33, 40)]  # qlen 1, prefix hits, ragged, multi-tile


def test_reference_matches_dense():
    D, scale = 16, 0.3
    seqs = SEQS + [(16, 32), (5, 47)]  # contexts that end on a page boundary and one short of it
    q, k_cache, v_cache, cu, ctx, bt, max_q, ks, vs = prefill_case(seqs, 2, 3, D, 16, torch.float32, fill=0.0)
    out = reference.prefill_attention(q, k_cache, v_cache, cu, ctx, bt, max_q, scale)
    for b in range(len(seqs)):
        want = dense_attention(q[cu[b]:cu[b + 1]], ks[b], vs[b], scale)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]].double(), want, atol=1e-5, rtol=1e-5)
    qd = torch.randn(len(seqs), 6, D)
    out = reference.decode_attention(qd, k_cache, v_cache, ctx, bt, scale)
    for b in range(len(seqs)):
        torch.testing.assert_close(out[b:b + 1].double(), dense_attention(qd[b:b + 1], ks[b], vs[b], scale),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bucket_tokens", [1, 100, 10_000])
def test_reference_decode_buckets(monkeypatch, bucket_tokens):
    # the reference decode sorts the batch by length into buckets: one per sequence, a few, or one
    monkeypatch.setattr(reference, "DECODE_BUCKET_TOKENS", bucket_tokens)
    lens = [37, 0, 1, 70, 16, 5, 0, 33, 17]
    ks, vs, k_cache, v_cache, ctx, bt = make_paged([max(n, 1) for n in lens], 2, 16, 16, torch.float32, fill=0.0)
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), 4, 16)
    out = reference.decode_attention(q, k_cache, v_cache, ctx, bt, 0.3)
    for b, n in enumerate(lens):
        want = dense_attention(q[b:b + 1], ks[b], vs[b], 0.3) if n else torch.zeros(1, 4, 16, dtype=torch.float64)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bucket_tokens, cuts", [(100, [(0, 4), (4, 6), (6, 7)]),
                                                  (68, [(0, 4), (4, 5), (5, 6), (6, 7)]),
                                                  (67, [(0, 3), (3, 5), (5, 6), (6, 7)])])
def test_reference_decode_bucket_plan(monkeypatch, bucket_tokens, cuts):
    # sorted lengths 1 5 16 17 33 37 70; a bucket takes rows while rows x its longest <= bucket_tokens.
    # 100: 4 x 17 = 68 (a fifth row: 5 x 33 = 165), 2 x 37 = 74 (a third: 3 x 70 = 210), then 70 alone.
    # 68: 4 x 17 = 68 still fits; 67: it does not, and 2 x 33 = 66 then does.
    monkeypatch.setattr(reference, "DECODE_BUCKET_TOKENS", bucket_tokens)
    lens = torch.tensor([37, 0, 1, 70, 16, 5, 0, 33, 17], dtype=torch.int32)
    order, buckets = reference._decode_plan(lens, torch.arange(9 * 5, dtype=torch.int32).view(9, 5), 16, "cpu")
    assert lens[order].tolist() == [1, 5, 16, 17, 33, 37, 70]  # the two empty rows are left out
    assert [(a, z) for a, z, *_ in buckets] == cuts
    for a, z, pages, keys, longest, mask in buckets:
        assert longest == lens[order][z - 1] and keys == 16 * -(-longest // 16) == 16 * len(pages) / (z - a)
        assert (mask is None) == (z - a == 1)  # one sequence reads exactly its keys, unmasked


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv(backend, dtype):
    N, Hkv, D, block_size, num_blocks = 7, 3, 16, 16, 4
    kv = torch.randn(N, 2 * Hkv + 1, D).to(dtype)
    k, v = kv[:, :Hkv], kv[:, Hkv + 1:]  # strided views, as split from a fused projection
    slots = torch.tensor([5, -1, 17, 63, 0, -1, 40], dtype=torch.int64)
    k_cache = torch.full((num_blocks, block_size, Hkv, D), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // block_size, s % block_size] = k[i]
            want_v[s // block_size, s % block_size] = v[i]
    slots = slots.to(torch.int32 if dtype == torch.float32 else torch.int64)  # both are accepted
    paged_attention.store_kv(k, v, k_cache, v_cache, slots, backend=backend)
    assert torch.equal(k_cache.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), want_v.nan_to_num(7.0))


# bf16 runs upcast to fp32 in the interpreter: it checks that path, with bf16 rounding of the output
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype, block_size, G", [
    (torch.float32, 16, 1), (torch.float16, 32, 2), (torch.float32, 16, 4), (torch.float16, 64, 8),
    (torch.bfloat16, 16, 2)])
def test_prefill_triton(dtype, block_size, G):
    q, k_cache, v_cache, cu, ctx, bt, max_q, _, _ = prefill_case(SEQS, 2 if G < 8 else 1, G, 16, block_size, dtype)
    args = (q, k_cache, v_cache, cu, ctx, bt, max_q, 0.25)
    out = paged_attention.prefill_attention(*args, backend="triton")
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, reference.prefill_attention(*args), **TOL[dtype])


@pytest.mark.parametrize("dtype, block_size, G, num_splits, D", [
    (torch.float32, 16, 1, 1, 16), (torch.float16, 16, 2, 3, 32), (torch.float32, 32, 4, 8, 16),
    (torch.float16, 64, 8, None, 16), (torch.bfloat16, 16, 2, 2, 16)])
def test_decode_triton(dtype, block_size, G, num_splits, D):
    # context 0 is batch padding (zeros out); 8 splits exceed the pages of the short sequences
    ks, vs, k_cache, v_cache, ctx, bt = make_paged([1, 16, 37, 70], 2, D, block_size, dtype)
    ctx, bt = torch.cat([ctx, ctx.new_zeros(1)]), torch.cat([bt, torch.full_like(bt[:1], -1)])
    q = torch.randn(5, 2 * G, D).to(dtype)
    out = paged_attention.decode_attention(q, k_cache, v_cache, ctx, bt, 0.25, num_splits=num_splits, backend="triton")
    assert out.dtype == dtype and torch.equal(out[4], torch.zeros_like(out[4]))
    want = reference.decode_attention(q, k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0), ctx, bt, 0.25)
    torch.testing.assert_close(out, want, **TOL[dtype])


def test_backend_choice(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("MEMAGENT_KERNELS", raising=False)
    assert paged_attention._impl(None, x) is reference
    monkeypatch.setenv("MEMAGENT_KERNELS", "triton")
    assert paged_attention._impl(None, x).__name__ == "paged_attention.triton_paged"
    assert paged_attention._impl("torch", x) is reference
    with pytest.raises(ValueError, match="cuda"):
        paged_attention._impl("cuda", x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D, G, block_size", [(64, 4, 16), (128, 7, 256)])
def test_triton_vs_reference_cuda(dtype, D, G, block_size):
    seqs = [(1, 1), (1, 900), (300, 300), (77, 1500), (513, 2000)]
    scale = D ** -0.5
    q, k_cache, v_cache, cu, ctx, bt, max_q, _, _ = prefill_case(seqs, 2, G, D, block_size, dtype, "cuda")
    args = (q, k_cache, v_cache, cu, ctx, bt, max_q, scale)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(paged_attention.prefill_attention(*args, backend="triton"),
                               reference.prefill_attention(*args), **tol)
    qd = torch.randn(len(seqs), 2 * G, D, device="cuda").to(dtype)
    kf, vf = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)  # the reference decode needs finite slots
    want = reference.decode_attention(qd, kf, vf, ctx, bt, scale)
    for splits in (1, 5, None):
        got = paged_attention.decode_attention(qd, k_cache, v_cache, ctx, bt, scale, splits, backend="triton")
        torch.testing.assert_close(got, want, **tol)
    # decode must be capturable in a CUDA graph: no host syncs, fixed shapes
    graph, qs = torch.cuda.CUDAGraph(), qd.clone()
    with torch.cuda.graph(graph):
        got = paged_attention.decode_attention(qs, k_cache, v_cache, ctx, bt, scale, backend="triton")
    qs.copy_(torch.randn_like(qs))
    graph.replay()
    torch.testing.assert_close(got, reference.decode_attention(qs, kf, vf, ctx, bt, scale), **tol)
