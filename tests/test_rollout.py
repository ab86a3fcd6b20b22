"""rollout.py: the engine against a naive full-recompute loop, prefix caching, preemption, sampling."""
import pytest
import torch

from model import ModelConfig, Transformer
from rollout import BlockManager, Engine, SamplingParams, Sequence, sample

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
    temps, seeds, pos = torch.ones(3), torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    tok, lp = sample(logits, temps, torch.tensor([1.0, 0.75, 1.0]), torch.tensor([0, 0, 1]), seeds, pos)
    assert tok[2] == 0 and lp[2] == 0.0  # top-1: certainty
    assert tok[1] in (0, 1)  # top-p 0.75 keeps {0.5, 0.3}
    assert abs(lp[1].exp() - (0.5 if tok[1] == 0 else 0.3) / 0.8) < 1e-6
    assert abs(lp[0].exp() - [0.5, 0.3, 0.15, 0.05][tok[0]]) < 1e-6
    # frequencies follow the distribution (counter-based noise over many positions)
    many = sample(logits[:1].expand(4000, 4), torch.ones(4000), torch.ones(4000), torch.zeros(4000, dtype=torch.long),
                  torch.full((4000,), 7), torch.arange(4000))[0]
    freq = torch.bincount(many, minlength=4).float() / 4000
    assert (freq - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03


def test_prefix_cache_skips_shared_prompt(model):
    shared = prompts([64], seed=5)[0]
    engine = Engine(model, num_blocks=64, block_size=16)
    out = engine.generate([shared + [i] for i in range(8)], SamplingParams(temperature=0, max_new_tokens=2))
    assert sum(c.num_cached_tokens for c in out) == 7 * 64  # all but the first rollout hit 4 blocks
    # freed blocks keep their contents: a later request still hits
    again = engine.generate([shared + [99]], SamplingParams(temperature=0, max_new_tokens=2))[0]
    assert again.num_cached_tokens == 64 and again.token_ids == naive_greedy(model, shared + [99], 2)


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
    bad = [[], list(range(300)), good, good, good, good, prompts([200])[0]]
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=-1), SamplingParams(top_p=0),
              SamplingParams(top_p=1.5), SamplingParams(temperature=0, max_new_tokens=3), SamplingParams()]
    out = engine.generate(bad, params)
    errors = [c.error for c in out]
    assert "empty prompt" in errors[0] and "256 positions" in errors[1] and "temperature" in errors[2]
    assert "top_p" in errors[3] and "top_p" in errors[4] and "KV cache" in errors[6]
    assert out[5].finish_reason == "length" and out[5].token_ids == naive_greedy(model, good, 3)


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
