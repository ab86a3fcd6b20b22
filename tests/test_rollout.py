"""rollout.py: the engine against a naive full-recompute loop, prefix caching, preemption, sampling."""
import math
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from model import ModelConfig, Transformer
from rollout import BlockManager, Engine, PagedKV, SamplingParams, Scheduler, Sequence, gpu_kv_budget, sample
from settings import SettingError

CFG = ModelConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=96, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(CFG).init_weights(seed=1, std=0.3)
    return m.eval()


def naive_greedy(model, prompt, n):
    """Re-run the full forward for every new token and take the argmax."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_greedy_equals_naive_loop_with_preemption_and_prefix_hits(model):
    shared = prompts([40], seed=9)[0]
    ps = prompts([3, 17, 33, 1, 50]) + [shared + [5], shared + [7, 8]]
    # 10 blocks of 16 tokens cannot hold all seven sequences: forces preemption and recompute;
    # a 24-token prefill budget forces chunked prefill of the long prompts.
    engine = Engine(model, num_blocks=10, block_size=16, max_num_batched_tokens=24)
    out = engine.generate(ps, SamplingParams(temperature=0, max_new_tokens=20))
    assert engine.scheduler.num_preemptions > 0
    for p, c in zip(ps, out):
        assert c.finish_reason == "length" and c.token_ids == naive_greedy(model, p, 20)
    assert engine.blocks.cache_hits >= 32  # the 40-token shared prefix: two full blocks reused
    assert engine.blocks.num_free == engine.num_blocks  # everything released


def test_logprobs_equal_full_forward(model):
    ps = prompts([9, 21])
    engine = Engine(model, num_blocks=32)
    out = engine.generate(ps, SamplingParams(temperature=0.7, max_new_tokens=6, seed=3))
    with torch.no_grad():
        for p, c in zip(ps, out):
            ids = torch.tensor([p + c.token_ids])
            logp = torch.log_softmax(model(ids)[0].double() / 0.7, -1)
            want = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
            assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.double), torch.tensor(want, dtype=torch.double), atol=1e-5)


def test_seeded_sampling_ignores_batch_composition(model):
    p = prompts([12])[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=10, seed=42)
    alone = Engine(model, num_blocks=32).generate([p], params)[0]
    crowd = Engine(model, num_blocks=32).generate(prompts([5, 30, 2]) + [p], params)[-1]
    assert alone.token_ids == crowd.token_ids  # log-probs agree up to batch-size-dependent rounding
    assert torch.allclose(torch.tensor(alone.logprobs), torch.tensor(crowd.logprobs), atol=1e-5)
    other = Engine(model, num_blocks=32).generate([p], SamplingParams(max_new_tokens=10, seed=43))[0]
    assert other.token_ids != alone.token_ids


def test_stop_tokens(model):
    p = prompts([8])[0]
    first = naive_greedy(model, p, 3)
    c = Engine(model, num_blocks=16).generate([p], SamplingParams(temperature=0, stop_token_ids=(first[2],)))[0]
    assert c.finish_reason == "stop" and c.token_ids == first[: first.index(first[2]) + 1]


def test_top_k_top_p_renormalise():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    temps, seeds, pos = [1.0] * 3, [1, 2, 3], [0] * 3
    tok, lp = sample(logits, temps, [1.0, 0.75, 1.0], [0, 0, 1], seeds, pos)
    assert tok[2] == 0 and lp[2] == 0.0  # top-1: certainty
    assert tok[1] in (0, 1)  # top-p 0.75 keeps {0.5, 0.3}
    assert abs(lp[1].exp() - (0.5 if tok[1] == 0 else 0.3) / 0.8) < 1e-6
    assert abs(lp[0].exp() - [0.5, 0.3, 0.15, 0.05][tok[0]]) < 1e-6
    # frequencies follow the distribution (counter-based noise over many positions)
    many = sample(logits[:1].expand(4000, 4), [1.0] * 4000, [1.0] * 4000, [0] * 4000, [7] * 4000, range(4000))[0]
    freq = torch.bincount(many, minlength=4).float() / 4000
    assert (freq - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03


def test_each_row_of_a_mixed_batch_samples_as_if_alone():
    # the sampler skips the ops no row of a batch needs: a greedy row beside a top-k row, or a
    # temperature-1 row beside a temperature-0.7 row, must still get exactly its own token and log-prob
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    temps, top_p, top_k = [0.0, 1.0, 0.7, 1.0], [1.0, 1.0, 1.0, 0.9], [0, 0, 0, 5]
    seeds, positions = [11, 12, 13, 14], [3, 4, 5, 6]
    tok, lp = sample(logits, temps, top_p, top_k, seeds, positions)
    for b in range(4):
        one = sample(logits[b:b + 1], temps[b:b + 1], top_p[b:b + 1], top_k[b:b + 1], seeds[b:b + 1],
                     positions[b:b + 1])
        assert (tok[b], lp[b]) == (one[0][0], one[1][0])
    logp = logits.log_softmax(-1)
    assert tok[0] == logp[0].argmax() and lp[0] == logp[0].max()  # greedy
    assert lp[1] == logp[1, tok[1]]  # temperature 1: the model's own log-probs
    assert lp[2] == (logits[2] / 0.7).log_softmax(-1)[tok[2]]
    assert tok[3] in logits[3].topk(5).indices


def test_prefix_cache_skips_shared_prompt(model):
    shared = prompts([64], seed=5)[0]
    engine = Engine(model, num_blocks=64, block_size=16)
    out = engine.generate([shared + [i] for i in range(8)], SamplingParams(temperature=0, max_new_tokens=2))
    assert sum(c.num_prefix_hits for c in out) == 7 * 64  # all but the first rollout hit 4 blocks
    # freed blocks keep their contents: a later request still hits
    again = engine.generate([shared + [99]], SamplingParams(temperature=0, max_new_tokens=2))[0]
    assert again.num_prefix_hits == 64 and again.token_ids == naive_greedy(model, shared + [99], 2)


def test_incremental_interface(model):
    engine = Engine(model, num_blocks=32)
    a = engine.add_request(prompts([5])[0], SamplingParams(temperature=0, max_new_tokens=20))
    done = []
    for _ in range(3):
        done += engine.step()
    b = engine.add_request(prompts([6])[0], SamplingParams(temperature=0, max_new_tokens=2))
    while engine.has_unfinished():
        done += engine.step()
    assert [c.request_id for c in done] == [b, a]  # the late short request finishes first


def test_bad_requests_fail_alone(model):
    engine = Engine(model, num_blocks=8, block_size=16)
    good = prompts([4])[0]
    greedy = SamplingParams(temperature=0, max_new_tokens=3)
    out = engine.generate([[], [1] * 300, good, prompts([200])[0], torch.tensor(7), 5, {1: 2}, np.array(good)],
                          [SamplingParams()] * 2 + [greedy] + [SamplingParams()] * 4 + [greedy])
    errors = [c.error for c in out]
    assert "non-empty list of token ids" in errors[0] and "256 positions" in errors[1] and "KV cache" in errors[3]
    assert all("non-empty list of token ids" in e for e in errors[4:7])  # a number, a dict: each fails alone
    assert out[2].finish_reason == "length" and out[2].token_ids == naive_greedy(model, good, 3)
    assert out[7].token_ids == out[2].token_ids  # a numpy prompt is a prompt
    engine.add_request(good, greedy)  # generate owns the engine: another caller's request would end up in it
    with pytest.raises(RuntimeError, match="requests added outside this call"):
        engine.generate([good], greedy)


def test_non_finite_logits_fail_their_request_and_the_prefix_cache_follows_the_weights(model):
    import copy
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    (c,) = Engine(broken, num_blocks=16).generate([prompts([40])[0]], SamplingParams(max_new_tokens=3))
    assert c.finish_reason == "error" and "not finite" in c.error
    live, prompt = copy.deepcopy(model), prompts([40])[0]  # 40 tokens: two full blocks to share
    engine, greedy = Engine(live, num_blocks=16), SamplingParams(temperature=0, max_new_tokens=4)
    engine.generate([prompt], greedy)
    with torch.no_grad():
        for p in live.parameters():
            p.mul_(1.5)  # an update in place, as an optimizer step makes
    (again,) = engine.generate([prompt], greedy)
    (fresh,) = Engine(live, num_blocks=16).generate([prompt], greedy)
    assert again.num_prefix_hits == 0 and (again.token_ids, again.logprobs) == (fresh.token_ids, fresh.logprobs)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=2**63),
                                 dict(max_new_tokens=0), dict(seed="x"), dict(temperature=float("nan"))])
def test_sampling_values_are_checked_when_built(bad):
    with pytest.raises(SettingError, match=next(iter(bad))):
        SamplingParams(**bad)


@settings(max_examples=25, deadline=None)
@given(values=st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(st.floats(-1, 3), st.integers(-2, 2)), "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 2**64), "max_new_tokens": st.integers(-1, 5), "seed": st.integers(-2**70, 2**70),
    "stop_token_ids": st.lists(st.integers(0, 200), max_size=3)}))
def test_any_sampling_values_run_beside_a_good_request_or_are_refused_by_name(model, values):
    try:
        params = SamplingParams(**values)
    except SettingError as e:
        assert any(k in str(e) for k in values), e
        return
    engine = Engine(model, num_blocks=16)
    good = prompts([5])[0]
    out = engine.generate([good, good], [params, SamplingParams(temperature=0, max_new_tokens=2)])
    if any(t >= CFG.vocab_size for t in params.stop_token_ids):  # fails alone, named
        assert "stop_token_ids" in out[0].error
    else:
        assert out[0].error is None and 1 <= len(out[0].token_ids) <= params.max_new_tokens
    assert out[1].token_ids == naive_greedy(model, good, 2)


def test_one_engine_serves_one_thread_at_a_time(model):
    engine = Engine(model, num_blocks=16)
    engine.add_request(prompts([5])[0], SamplingParams(max_new_tokens=2))  # in flight, owned by this thread
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, engine.step)))
    worker.start()
    worker.join()
    assert "another thread" in str(errors[0].value)
    while engine.has_unfinished():  # the owner goes on undisturbed
        engine.step()
    done = []  # once idle, another thread may take the engine over
    one = SamplingParams(max_new_tokens=1)
    worker = threading.Thread(target=lambda: done.append(engine.generate(prompts([3]), one)))
    worker.start()
    worker.join()
    assert len(done[0][0].token_ids) == 1


def test_block_manager_ref_counts():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = Sequence(0, list(range(40)), SamplingParams(), 0)
    assert bm.allocate(a) and len(a.block_table) == 3 and bm.num_free == 1
    bm.register_full_blocks(a, 40)
    b = Sequence(1, list(range(33)), SamplingParams(), 0)
    assert bm.allocate(b) and b.block_table[:2] == a.block_table[:2] and b.num_computed == 32
    assert bm.ref[a.block_table[0]] == 2
    c = Sequence(2, list(range(100, 140)), SamplingParams(), 0)
    assert not bm.allocate(c) and c.block_table == []  # nothing taken on failure
    bm.release(a)
    bm.release(b)
    assert bm.num_free == 4 and sorted(bm.ref) == [0, 0, 0, 0]


def test_engine_on_triton_kernels(model):
    # On CPU the Triton kernels run in the interpreter: slow, so a small batch proves the wiring.
    ps = prompts([20, 7], seed=4) + [prompts([20], seed=4)[0] + [1]]
    engine = Engine(model, num_blocks=16, block_size=16, backend="triton")
    out = engine.generate(ps, SamplingParams(temperature=0, max_new_tokens=5))
    assert [c.token_ids for c in out] == [naive_greedy(model, p, 5) for p in ps]
    assert engine.blocks.cache_hits == 16


def test_mixed_steps_serve_decode_and_prefill_together(model):
    # a long prompt admitted while short ones decode: with a 16-token budget its prefill is spread
    # over steps that also decode the others, and every token still equals the recompute loop
    ps = prompts([5, 6, 70])
    engine = Engine(model, num_blocks=32, block_size=16, max_num_batched_tokens=16)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_new_tokens=12)) for p in ps[:2]]
    done = engine.step()  # both short prompts prefill in one step
    ids.append(engine.add_request(ps[2], SamplingParams(temperature=0, max_new_tokens=12)))
    run, shapes = engine.runner.run, []
    engine.runner.run = lambda batch: shapes.append((batch.num_decode, len(batch.seqs))) or run(batch)
    while engine.has_unfinished():
        done += engine.step()
    mixed = sum(0 < d < n for d, n in shapes)
    assert mixed >= 3  # the 70-token prompt took several 14-token chunks beside two decodes
    by_id = {c.request_id: c for c in done}
    assert [by_id[i].token_ids for i in ids] == [naive_greedy(model, p, 12) for p in ps]


def test_bad_token_ids_and_types_fail_alone_and_the_engine_goes_on(model):
    engine = Engine(model, num_blocks=32)
    good = prompts([6, 9])
    greedy = SamplingParams(temperature=0, max_new_tokens=4)
    out = engine.generate([good[0], [1, CFG.vocab_size], [-1, 2], good[1], [1.5], torch.tensor([3, 4])],
                          [greedy, greedy, greedy, greedy, greedy, dict(temperature=1.0)])
    assert [c.finish_reason for c in out] == ["length", "error", "error", "length", "error", "error"]
    assert "token id 101" in out[1].error and "token id -1" in out[2].error and "SamplingParams" in out[5].error
    assert [out[0].token_ids, out[3].token_ids] == [naive_greedy(model, p, 4) for p in good]
    again = engine.generate(good, greedy)  # still usable, and nothing was left behind
    assert [c.token_ids for c in again] == [out[0].token_ids, out[3].token_ids]
    assert engine.blocks.num_free == engine.num_blocks and not engine.requests


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(block_size=24), "block_size"), (dict(num_blocks=1), "KV cache too small")])
def test_engine_arguments_are_checked(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(model, **dict(dict(num_blocks=32), **kwargs))


def test_the_smallest_cache_and_the_last_stop_id_are_accepted(model):
    engine = Engine(model, num_blocks=2)  # two blocks: the least a prompt and its first token need
    last, outside = SamplingParams(max_new_tokens=1, stop_token_ids=[CFG.vocab_size - 1]), \
        SamplingParams(max_new_tokens=1, stop_token_ids=[CFG.vocab_size])
    ok, bad = engine.generate(prompts([3, 3]), [last, outside])
    assert ok.error is None and "stop_token_ids [101]" in bad.error


def test_params_must_match_prompts(model):
    with pytest.raises(ValueError, match="1 SamplingParams for 2 prompts"):
        Engine(model, num_blocks=32).generate(prompts([3, 4]), [SamplingParams()])


def test_abort_frees_everything(model):
    engine = Engine(model, num_blocks=32)
    a = engine.add_request(prompts([40])[0], SamplingParams(max_new_tokens=50, seed=1))
    b = engine.add_request(prompts([5])[0], SamplingParams(max_new_tokens=50, seed=1))
    engine.step()
    engine.abort(a)
    engine.abort(b)
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.num_blocks


def test_a_sequence_that_outgrows_the_whole_cache_stops_at_length(model):
    engine = Engine(model, num_blocks=3, block_size=16)  # 48 slots
    c = engine.generate(prompts([20]), SamplingParams(temperature=0, max_new_tokens=200))[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 48 - 20 + 1
    assert c.token_ids == naive_greedy(model, prompts([20])[0], len(c.token_ids))


def test_cuda_graph_batch_padding():
    from rollout import MAX_GRAPH_BATCH, fill_graph_inputs, graph_batch_size
    assert [graph_batch_size(b) for b in (1, 2, 3, 5, 8, 9, MAX_GRAPH_BATCH)] == [1, 2, 4, 8, 8, 16, MAX_GRAPH_BATCH]
    assert graph_batch_size(MAX_GRAPH_BATCH + 1) is None
    io = dict(ids=torch.full((1, 4), 7), pos=torch.full((1, 4), 7), slots=torch.full((4,), 7),
              ctx=torch.full((4,), 7, dtype=torch.int32), tables=torch.full((4, 5), 7, dtype=torch.int32))
    fill_graph_inputs(io, torch.tensor([[3, 4, 5]]), torch.tensor([[10, 11, 12]]), torch.tensor([40, 41, 42]),
                      torch.tensor([11, 12, 13], dtype=torch.int32), torch.tensor([[2], [3], [4]], dtype=torch.int32))
    assert io["ids"].tolist() == [[3, 4, 5, 0]] and io["slots"].tolist() == [40, 41, 42, -1]
    assert io["ctx"].tolist() == [11, 12, 13, 1] and io["tables"][:, 0].tolist() == [2, 3, 4, 0]
    assert io["tables"][:, 1:].abs().sum() == 0  # stale table entries of an earlier, wider batch cleared


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager():
    torch.manual_seed(0)
    # fp32: a 16-bit GEMM may round differently for the graph's padded batch and flip a near-tie
    m = Transformer(CFG).init_weights(seed=1, std=0.3).to("cuda").eval()
    ps = prompts([5, 17, 33, 2, 40])
    params = SamplingParams(temperature=0, max_new_tokens=24)
    graph = Engine(m, num_blocks=64, cuda_graphs=True).generate(ps, params)
    eager = Engine(m, num_blocks=64, cuda_graphs=False).generate(ps, params)
    assert [c.token_ids for c in graph] == [c.token_ids for c in eager]


def test_a_step_that_fails_mid_forward_leaves_no_false_prefix_hit(model):
    shared = prompts([64], seed=11)[0]
    engine = Engine(model, num_blocks=32, block_size=16)
    run = engine.runner.run

    def fail(batch):
        raise KeyboardInterrupt
    engine.runner.run = fail
    with pytest.raises(KeyboardInterrupt):
        engine.generate([shared], SamplingParams(temperature=0, max_new_tokens=2))
    engine.runner.run = run  # the blocks scheduled in that step were registered but never written
    c = engine.generate([shared + [1]], SamplingParams(temperature=0, max_new_tokens=4))[0]
    assert c.num_prefix_hits == 0 and c.token_ids == naive_greedy(model, shared + [1], 4)


def test_top_p_keeps_the_smallest_prefix_that_reaches_p_and_top_k_works_alone():
    # probabilities exactly 1/2, 1/4, 1/8, 1/8: the first two reach top_p = 0.75, so the rest are dropped;
    # top_k = 2 keeps the same two. The greedy token 0 then has probability 0.5 / 0.75 = 2/3.
    logits = torch.log(torch.tensor([[4.0, 2.0, 1.0, 1.0]]))
    for top_p, top_k in ((0.75, 0), (1.0, 2)):
        tok, lp = sample(logits, torch.zeros(1), torch.tensor([top_p]), torch.tensor([top_k]), torch.tensor([1]),
                         torch.zeros(1, dtype=torch.long))
        assert tok.item() == 0 and lp.item() == pytest.approx(math.log(2 / 3))


def test_full_blocks_are_hashed_once_full_and_only_then():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = Sequence(0, list(range(33)), SamplingParams(), 0)
    assert bm.allocate(a)
    for scheduled, hashed in ((15, 0), (16, 1), (31, 1), (32, 2), (33, 2)):
        bm.register_full_blocks(a, scheduled)
        assert a.num_hashed == hashed
    # a 32-token prompt hits only its first block: its last token must be computed to get logits
    b = Sequence(1, list(range(32)), SamplingParams(), 0)
    assert bm.allocate(b) and b.num_computed == 16 and b.block_table[0] == a.block_table[0]


def test_a_block_exactly_full_needs_no_new_block_for_its_last_token():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = Sequence(0, list(range(32)), SamplingParams(), 0)
    assert bm.allocate(a) and bm.append_slot(a) and len(a.block_table) == 2
    a.output.append(7)  # the 33rd token opens a third block
    assert bm.append_slot(a) and len(a.block_table) == 3


def test_reviving_cached_free_blocks_counts_against_the_free_pool():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = Sequence(0, list(range(40)), SamplingParams(), 0)
    assert bm.allocate(a)
    bm.register_full_blocks(a, 40)
    bm.release(a)  # 4 free, two of them hold a's cached prefix
    assert bm.allocate(Sequence(1, [99] * 5, SamplingParams(), 0)) and bm.num_free == 3
    # 49 tokens: 2 cached blocks + 2 new ones = all of the 3 free and one more
    assert not bm.allocate(Sequence(2, list(range(32)) + [5] * 17, SamplingParams(), 0)) and bm.num_free == 3
    b = Sequence(3, list(range(32)) + [5], SamplingParams(), 0)  # 2 cached + 1 new = 3
    assert bm.allocate(b) and b.num_computed == 32 and bm.num_free == 0


def test_an_evicted_prefix_is_cached_again_when_recomputed():
    bm = BlockManager(num_blocks=2, block_size=16)
    prefix = list(range(16))

    def run(seq):
        assert bm.allocate(seq)
        bm.register_full_blocks(seq, len(seq))
        bm.release(seq)
        return seq.num_prefix_hits

    assert run(Sequence(0, prefix + [1], SamplingParams(), 0)) == 0
    assert run(Sequence(1, [50] * 17, SamplingParams(), 0)) == 0  # takes both blocks: the prefix is gone
    assert run(Sequence(2, prefix + [2], SamplingParams(), 0)) == 0  # recomputed, and registered again
    assert run(Sequence(3, prefix + [3], SamplingParams(), 0)) == 16


def test_the_first_of_two_identical_blocks_stays_the_cached_one():
    # two sequences compute the same prefix in one step (neither was registered when both were admitted)
    bm = BlockManager(num_blocks=4, block_size=16)
    a, b = (Sequence(i, list(range(17)), SamplingParams(), 0) for i in range(2))
    assert bm.allocate(a) and bm.allocate(b) and b.num_computed == 0
    bm.register_full_blocks(a, 17)
    bm.register_full_blocks(b, 17)
    first = a.block_table[0]
    assert list(bm.by_hash.values()) == [first] and bm.hash[b.block_table[0]] is None
    bm.release(a)
    bm.release(b)
    c = Sequence(2, list(range(17)), SamplingParams(), 0)
    assert bm.allocate(c) and c.block_table[0] == first and c.num_computed == 16


def test_at_most_max_num_seqs_run_at_once(model):
    ps = prompts([3, 4, 5])
    engine = Engine(model, num_blocks=32, max_num_seqs=2)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_new_tokens=4)) for p in ps]
    done = engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 1
    while engine.has_unfinished():
        done += engine.step()
    by_id = {c.request_id: c for c in done}
    assert [by_id[i].token_ids for i in ids] == [naive_greedy(model, p, 4) for p in ps]


def test_generation_stops_at_the_models_last_position(model):
    engine = Engine(model, num_blocks=32)
    p = prompts([250], seed=3)[0]
    c = engine.generate([p], SamplingParams(temperature=0, max_new_tokens=100))[0]
    assert c.finish_reason == "length" and len(p) + len(c.token_ids) == CFG.max_position_embeddings
    assert c.token_ids == naive_greedy(model, p, len(c.token_ids))
    # a prompt of 255 tokens still gets one token; 256 leave no position for it
    full, over = engine.generate([[1] * 255, [1] * 256], SamplingParams(temperature=0))
    assert len(full.token_ids) == 1 and over.finish_reason == "error" and "256 positions" in over.error


def test_a_prompt_fits_the_kv_cache_with_its_first_token(model):
    engine = Engine(model, num_blocks=3, block_size=16)  # 48 slots
    fits, over = engine.generate([[1] * 47, [1] * 48], SamplingParams(temperature=0))
    assert fits.finish_reason == "length" and len(fits.token_ids) == 2  # 47 + 1 fill the cache, and 1 more
    assert over.finish_reason == "error" and "KV cache" in over.error


def test_stats_count_every_token_once(model):
    engine = Engine(model, num_blocks=32)
    t0 = time.perf_counter()
    engine.generate(prompts([5, 7]), SamplingParams(temperature=0, max_new_tokens=3))
    elapsed = time.perf_counter() - t0
    s = engine.stats
    # step 1 prefills both prompts (12 tokens) and samples their first tokens; steps 2 and 3 decode two each
    assert (s["prefill_tokens"], s["decode_tokens"], s["steps"]) == (12, 4, 3)
    assert 0 < s["forward_s"] <= elapsed
    assert engine.tokens_per_s() == pytest.approx(16 / s["forward_s"])


def test_kv_cache_size_from_memory_numbers(model):
    # on a GPU with 30 of 100 bytes free, whose allocator holds 12 of which tensors use 2, at utilization
    # 0.9: 30 + (12 - 2) - (1 - 0.9) * 100 = 30 bytes for the cache
    assert gpu_kv_budget(free=30, total=100, reserved=12, allocated=2, gpu_memory_utilization=0.9) == \
        pytest.approx(30)
    # a block holds K and V x 2 layers x 16 tokens x 2 KV heads x 16 dims x 4 bytes (fp32) = 8192 bytes
    assert Engine(model, kv_cache_bytes=5 * 8192 + 8191).num_blocks == 5
    # the graph's block tables cover the longest sequence, max_position_embeddings (+ 1) tokens
    assert Engine(model, num_blocks=32).runner.max_table_width == -(-(256 + 1) // 16) == 17


def test_no_step_computes_more_than_max_num_batched_tokens(model):
    # three sequences decoding under a budget of 2 tokens a step: they take turns, and nothing changes
    ps = prompts([1, 2, 2], seed=6)
    engine = Engine(model, num_blocks=32, max_num_batched_tokens=2)
    run, sizes = engine.runner.run, []
    engine.runner.run = lambda batch: sizes.append(sum(batch.num_tokens)) or run(batch)
    out = engine.generate(ps, SamplingParams(temperature=0, max_new_tokens=4))
    assert max(sizes) == 2 and sum(sizes) == 5 + 3 * 3  # every prompt token once, then 3 decodes each
    assert [c.token_ids for c in out] == [naive_greedy(model, p, 4) for p in ps]


def test_only_pure_decode_steps_replay_a_graph(model):
    # CUDA graphs exist only on a GPU; here an eager forward stands in for the replay, to check which
    # steps take that path: the pure decode steps, never the prefill or a mixed step
    engine = Engine(model, num_blocks=32, max_num_batched_tokens=8)
    runner, replayed = engine.runner, []

    def eager_replay(ids, pos, slots, ctx, tables):
        replayed.append(ctx.shape[0])
        return runner.model(ids, pos, attn=PagedKV(runner.k_cache, runner.v_cache, slots, ctx, tables,
                                                   ctx.shape[0], None, 0))[0]
    runner.use_graphs, runner._decode_graph = True, eager_replay
    ps = prompts([3, 9], seed=7)
    out = engine.generate(ps, SamplingParams(temperature=0, max_new_tokens=4))
    # step 1 prefills 3 + 5 tokens, step 2 decodes the short one beside the long one's last 4 (mixed),
    # steps 3 and 4 decode both, and step 5 decodes the long one's 4th token alone
    assert replayed == [2, 2, 1]
    assert [c.token_ids for c in out] == [naive_greedy(model, p, 4) for p in ps]


def test_unseeded_requests_draw_the_engines_seed_sequence(model):
    # requests without a seed take seed * 1_000_003 + 1, + 2, ... in turn: an engine seed reproduces
    # every unseeded rollout, the numbers of past runs included
    p = prompts([6], seed=8)[0]
    first, second = Engine(model, num_blocks=32, seed=3).generate([p, p], SamplingParams(max_new_tokens=6))
    seeded = Engine(model, num_blocks=32).generate([p, p], [SamplingParams(max_new_tokens=6, seed=s)
                                                            for s in (3_000_010, 3_000_011)])
    assert [first.token_ids, second.token_ids] == [c.token_ids for c in seeded]
    assert first.token_ids != second.token_ids


def test_top_k_up_to_int32_and_the_gumbel_noise_formula():
    assert SamplingParams(top_k=2**31 - 1).top_k == 2**31 - 1
    with pytest.raises(SettingError, match="top_k"):
        SamplingParams(top_k=2**31)
    # a sampled token is argmax(logp - log(-log u)), u = (23 hashed bits + 0.5) / 2^23, by (seed, position, id)
    from rollout import _mix32
    logits = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))
    tokens, logps = sample(logits, [1.0, 1.0], [1.0, 1.0], [0, 0], [11, 12], [5, 6])
    for b, (seed, pos) in enumerate(((11, 5), (12, 6))):
        bits = _mix32(_mix32(_mix32(_mix32(torch.tensor(seed)) ^ pos) ^ torch.arange(7))) >> 9
        u = (bits.float() + 0.5) / 2.0**23
        logp = logits[b].log_softmax(-1)
        assert tokens[b] == (logp - torch.log(-torch.log(u))).argmax() and logps[b] == logp[tokens[b]]


def test_token_slices_across_the_prompt_end():
    seq = Sequence(0, [1, 2, 3], SamplingParams(), 0)
    seq.output = [7, 8]
    for start, end in ((0, 3), (1, 3), (1, 4), (2, 5), (3, 5), (4, 5)):
        assert seq.token_slice(start, end) == seq.tokens[start:end]


def test_a_started_prompt_spends_the_step_budget_before_new_ones_are_admitted():
    # budget 16: step 1 admits a (10 tokens) and starts b (6 of 40); step 2 decodes a (1) and continues
    # b (15), which spends the budget: c waits, and no step computes more than 16 tokens
    sched = Scheduler(BlockManager(num_blocks=32, block_size=16), max_num_seqs=3, max_num_batched_tokens=16)
    a, b, c = (Sequence(i, list(range(100 * i, 100 * i + n)), SamplingParams(), 0)
               for i, n in enumerate((10, 40, 40)))
    for s in (a, b, c):
        sched.add(s)
    batch, _ = sched.schedule()
    assert [(s.id, n) for s, n in zip(batch.seqs, batch.num_tokens)] == [(0, 10), (1, 6)]
    for s, n in zip(batch.seqs, batch.num_tokens):
        s.num_computed += n
    a.output.append(5)  # a's first token: now it decodes
    batch, _ = sched.schedule()
    assert [(s.id, n) for s, n in zip(batch.seqs, batch.num_tokens)] == [(0, 1), (1, 15)]
    assert list(sched.waiting) == [c]
