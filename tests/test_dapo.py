# dapo.py by example: every expected number below is worked out by hand in the comments.
import math
from dataclasses import dataclass

import pytest
import torch

from dapo import (Row, aggregate, group_advantages, kl_penalty, overlong_penalty,
                  pack, policy_loss, rows_from_trajectories, sample_groups)

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")  # settings.RLConfig.loss_agg

LN2 = math.log(2.0)


@dataclass
class Conv:
    prompt_ids: list
    response_ids: list
    logprobs: list


@dataclass
class Traj:
    conversations: list


def toy_logprobs(W, mb):
    """A bigram 'model': log p(target | input token) = log_softmax(W[input])[target]."""
    return torch.log_softmax(W[mb.input_ids], dim=-1).gather(-1, mb.target_ids[..., None])[..., 0]


# ---------------------------------------------------------------------------------------------
# the clipped surrogate, one token per branch


def test_every_clipping_branch_value_gradient_and_metrics():
    # eps_low 0.2, eps_high 0.28 -> band [0.8, 1.28]; dual clip c = 3. logp_old = 0, so r = exp(logp).
    A = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0]])
    r = torch.tensor([[0.5, 1.0, 2.0, 0.5, 1.0, 2.0, 4.0]])
    # A>0 below band: max(-0.5, -0.8) = -0.5   unclipped, d/dlogp = -A r = -0.5
    # A>0 inside:     max(-1, -1) = -1          unclipped, d/dlogp = -1
    # A>0 above:      max(-2, -1.28) = -1.28    clipped,   d/dlogp = 0   (clipfrac)
    # A<0 below band: max(0.5, 0.8) = 0.8       clipped,   d/dlogp = 0   (clipfrac)
    # A<0 inside:     max(1, 1) = 1             unclipped, d/dlogp = r = 1
    # A<0 above band: min(max(2, 1.28), 3) = 2  unclipped, d/dlogp = 2
    # A<0 above c:    min(max(4, 1.28), 3) = 3  dual clip, d/dlogp = 0   (clipfrac_lower)
    logp = r.log().requires_grad_()
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])
    loss, m = policy_loss(logp, torch.zeros_like(logp), A, torch.ones_like(A), entropy=entropy)
    loss.backward()
    assert loss.item() == pytest.approx((-0.5 - 1 - 1.28 + 0.8 + 1 + 2 + 3) / 7)  # token mean of 7
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -1, 0, 0, 1, 2, 0]]) / 7, atol=1e-6)
    assert m["clipfrac"] == pytest.approx(2 / 7)
    assert m["clipfrac_lower"] == pytest.approx(1 / 7)
    assert m["ppo_kl"] == pytest.approx(-math.log(4) / 7)  # mean(old - logp); ln .5 and ln 2 cancel
    assert m["ratio"] == pytest.approx(11 / 7)  # (0.5 + 1 + 2 + 0.5 + 1 + 2 + 4) / 7
    assert m["entropy"] == pytest.approx(0.4)


def test_symmetric_clip_and_huge_log_ratio_stay_finite():
    # clip_high = clip_low = 0.2 (the released MemAgent setting): A = 1, r = 1.25 is now clipped to 1.2.
    loss, m = policy_loss(torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.tensor([1.0]),
                          torch.ones(1, 1), clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2) and m["clipfrac"] == 1.0
    # logp - old = 100 is clamped to 20 before exp: ratio e^20, dual-clipped loss -A c = 3.
    loss, m = policy_loss(torch.tensor([[50.0]]), torch.tensor([[-50.0]]), torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(3.0) and m["ratio"] == pytest.approx(math.exp(20), rel=1e-5)


@pytest.mark.parametrize("agg", AGGS)
def test_padding_with_junk_contributes_nothing(agg):
    # two rows of 5 slots; row 0 has 3 valid tokens, row 1 has 2; pads hold large finite junk.
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    clean_logp = torch.tensor([[-1.0, -2.0, -0.5, 0, 0], [-0.1, -3.0, 0, 0, 0]])
    old = torch.tensor([[-1.1, -1.5, -0.5, 0, 0], [-0.3, -3.2, 0, 0, 0]])
    adv = torch.tensor([[0.7, 0.7, 0.7, 0, 0], [-1.2, -1.2, 0, 0, 0]])
    junk = 1 - mask
    results = []
    for scale in (0.0, 1e4):
        logp = (clean_logp + scale * junk).requires_grad_()
        loss, _ = policy_loss(logp, old - scale * junk, adv + 100 * scale * junk, mask, agg=agg)
        loss.backward()
        results.append((loss, logp.grad))
    (clean_loss, clean_grad), (junk_loss, junk_grad) = results
    assert torch.isfinite(junk_loss) and junk_loss.item() == pytest.approx(clean_loss.item())
    assert torch.equal(junk_grad, clean_grad) and torch.all(junk_grad[junk.bool()] == 0)


def test_clip_fractions_count_active_clips_only():
    # clip_low = clip_high = 0: the band is [1, 1]; dual clip c = the float32 ratio of the fifth token.
    # A = 0 tokens are never clipped, and a token exactly on a boundary is not (its loss is the same).
    rc = torch.tensor(math.log(3.0)).exp().item()  # ~3, exactly representable as the ratio
    A = torch.tensor([[1.0, -1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 0.0]])
    r = torch.tensor([[1.0, 1.0, 2.0, 0.5, rc, 0.5, 2.0, 4.0]])
    # A=1 r=1: -1 | A=-1 r=1: 1 | A=1 r=2: max(-2, -1) = -1 clipped | A=-1 r=.5: max(.5, 1) = 1 clipped
    # A=-1 r=c: min(max(c, 1), c) = c, on the dual-clip boundary | A=0: 0, whatever r
    loss, m = policy_loss(r.log(), torch.zeros_like(r), A, torch.ones_like(A), clip_low=0.0, clip_high=0.0, clip_c=rc)
    assert loss.item() == pytest.approx((-1 + 1 - 1 + 1 + rc) / 8)
    assert m["clipfrac"] == pytest.approx(2 / 8) and m["clipfrac_lower"] == 0.0


# ---------------------------------------------------------------------------------------------
# aggregation and the exact global mean


def test_aggregation_modes_on_ragged_rows_and_on_a_packed_row():
    # ratio 1 everywhere, so the per-token loss is -A. Row 0: one token, A = 3. Row 1: three tokens, A = 2.
    # token-mean:           (-3 - 2 - 2 - 2) / 4 = -2.25
    # seq-mean-token-mean:  (-3 + -2) / 2       = -2.5
    # seq-mean-token-sum:   (-3 + -6) / 2       = -4.5
    expected = {"token-mean": -2.25, "seq-mean-token-mean": -2.5, "seq-mean-token-sum": -4.5}
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    packed_mask = torch.tensor([[1, 1, 1, 1]])
    packed_adv = torch.tensor([[3.0, 2.0, 2.0, 2.0]])
    segments = torch.tensor([[0, 1, 1, 1]])  # the same two sequences laid end to end in one row
    for agg, want in expected.items():
        loss, _ = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([3.0, 2.0]), mask, agg=agg)
        assert loss.item() == pytest.approx(want)
        loss, _ = policy_loss(torch.zeros(1, 4), torch.zeros(1, 4), packed_adv, packed_mask, agg=agg,
                              segment_ids=segments)
        assert loss.item() == pytest.approx(want)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_global_counts_divide_the_local_sum(dp_size):
    # ratio 1, so the per-token loss is -A. Row 0: tokens A = 1, 2 (a third is padding); row 1: A = 4.
    # This call is one micro-batch of a step with N = 12 tokens in S = 5 sequences, on one of dp_size ranks:
    # token-mean:           dp * -(1 + 2 + 4) / 12
    # seq-mean-token-mean:  dp * -(1.5 + 4) / 5
    # seq-mean-token-sum:   dp * -(3 + 4) / 5
    expected = {"token-mean": -7 / 12, "seq-mean-token-mean": -5.5 / 5, "seq-mean-token-sum": -7 / 5}
    A = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for agg, want in expected.items():
        loss, _ = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), A, mask, agg=agg, num_tokens=12, num_seqs=5,
                              dp_size=dp_size)
        assert loss.item() == pytest.approx(dp_size * want)
    # a step of a single token is its own mean
    assert aggregate(torch.tensor([[2.5]]), torch.ones(1, 1), num_tokens=1).item() == 2.5


def test_sequences_without_valid_tokens_are_not_counted():
    # local counts: segment 1 is absent and row 1 is all padding, so each step has two sequences
    x = torch.tensor([[1.0, 3.0, 5.0]])
    segments = torch.tensor([[0, 0, 2]])
    assert aggregate(x, torch.ones(1, 3), "seq-mean-token-mean", segment_ids=segments).item() == (2 + 5) / 2
    assert aggregate(x, torch.ones(1, 3), "seq-mean-token-sum", segment_ids=segments).item() == (4 + 5) / 2
    rows = torch.tensor([[1.0, 3.0], [7.0, 7.0], [6.0, 0.0]])
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]])
    assert aggregate(rows, mask, "seq-mean-token-mean").item() == (2 + 6) / 2
    assert aggregate(rows, mask, "seq-mean-token-sum").item() == (4 + 6) / 2


def test_aggregate_as_the_sft_loss():
    # SFT: loss = token mean of -logp over response tokens; -(-1 - 3) / 2 = 2
    assert aggregate(-torch.tensor([[-1.0, -3.0, -9.0]]), torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


@pytest.mark.parametrize("agg", AGGS)
def test_one_rank_one_micro_batch_equals_two_ranks_two_uneven_micro_batches(agg):
    torch.manual_seed(0)
    V = 11
    W0 = torch.randn(V, V)
    sizes = [(3, 2), (2, 5), (4, 1), (1, 3), (2, 2), (5, 4)]  # (prompt, response) lengths
    rows = []
    for P, R in sizes:
        row = Row(torch.randint(V, (P,)).tolist(), torch.randint(V, (R,)).tolist(), float(torch.randn(())))
        (mb,) = pack([row], 100)
        old = toy_logprobs(W0, mb)[mb.mask] + 0.3 * torch.randn(R)  # near the policy, so some tokens clip
        rows.append(Row(row.prompt_ids, row.response_ids, row.advantage, old.tolist()))
    N, S = sum(R for _, R in sizes), len(sizes)  # 17 response tokens, 6 sequences in the step

    def rank_grad(rank_rows, budget, dp_size):
        W = W0.clone().requires_grad_()
        for mb in pack(rank_rows, budget):
            loss, _ = policy_loss(toy_logprobs(W, mb), mb.old_logprobs, mb.advantages, mb.mask, agg=agg,
                                  num_tokens=N, num_seqs=S, dp_size=dp_size, segment_ids=mb.segment_ids)
            loss.backward()  # gradient accumulation
        return W.grad

    # rank 0: rows of 5, 7, 5 tokens -> budget 12 packs [7 + 5] and [5]; rank 1: 4, 4, 9 -> [9] and [4 + 4]
    assert [mb.input_ids.shape[1] for mb in pack(rows[:3], 12)] == [12, 5]
    assert [mb.input_ids.shape[1] for mb in pack(rows[3:], 12)] == [9, 8]
    assert sum(mb.num_tokens for mb in pack(rows[:3], 12) + pack(rows[3:], 12)) == N
    one = rank_grad(rows, 10**6, dp_size=1)
    two = (rank_grad(rows[:3], 12, dp_size=2) + rank_grad(rows[3:], 12, dp_size=2)) / 2  # DDP averages
    assert one.abs().sum() > 0 and torch.allclose(one, two, atol=1e-6)

    # the older, inexact recipe: mean over each micro-batch, then average over micro-batches and ranks
    W = W0.clone().requires_grad_()
    for rank_rows in (rows[:3], rows[3:]):
        for mb in pack(rank_rows, 12):
            loss, _ = policy_loss(toy_logprobs(W, mb), mb.old_logprobs, mb.advantages, mb.mask, agg=agg,
                                  segment_ids=mb.segment_ids)
            (loss / 4).backward()
    assert not torch.allclose(one, W.grad, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# KL to a reference policy


def test_kl_estimators_and_kl_term():
    # logp = 0, ref = ln 2, d = ref - logp = ln 2:  k1 = -ln 2,  k2 = (ln 2)^2 / 2,  k3 = e^d - d - 1 = 1 - ln 2
    logp, ref = torch.zeros(1, 2), torch.full((1, 2), LN2)
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.full((1, 2), -LN2))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.full((1, 2), LN2 ** 2 / 2))
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.full((1, 2), 1 - LN2))
    # large log-ratios: k3's value is clamped to 10 (e^5 - 6 = 142.41 would be), k1 and k2 are not
    d = torch.tensor([[5.0, -5.0, 30.0, -30.0]])
    zero = torch.zeros_like(d)
    assert kl_penalty(zero, d, "k3")[0].tolist() == pytest.approx([10.0, math.exp(-5) + 4, 10.0, 10.0])
    assert kl_penalty(zero, d, "k3")[0, 1].item() == pytest.approx(4.006738, abs=1e-6)
    assert kl_penalty(zero, d, "k1")[0].tolist() == [-5.0, 5.0, -30.0, 30.0]
    assert kl_penalty(zero, d, "k2")[0].tolist() == [12.5, 12.5, 450.0, 450.0]
    # a clamped token adds no KL gradient; an unclamped one does, and nothing is NaN
    lp = torch.zeros(1, 4, requires_grad=True)
    kl_penalty(lp, torch.tensor([[5.0, -5.0, 100.0, 0.5]]), "k3").sum().backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 2] == 0
    assert lp.grad[0, 1].item() == pytest.approx(1 - math.exp(-5)) and lp.grad[0, 3] != 0
    # ratio 1, A = 1: surrogate -1 per token; plus 0.5 * (1 - ln 2)
    loss, m = policy_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.5)
    assert loss.item() == pytest.approx(-1 + 0.5 * (1 - LN2)) and m["kl"] == pytest.approx(1 - LN2)


# ---------------------------------------------------------------------------------------------
# rewards, advantages, overlong shaping


@pytest.mark.parametrize("kind", ["list", "tuple", "tensor", "numpy"])
def test_group_advantages_take_any_sequence_of_ids(kind):
    import numpy as np
    ids = [7, 7, 3, 3, 3]
    group_ids = {"list": ids, "tuple": tuple(ids), "tensor": torch.tensor(ids), "numpy": np.array(ids)}[kind]
    got = group_advantages([1.0, 0.0, 1.0, 0.0, 0.0], group_ids, norm_by_std=False)
    assert got.tolist() == pytest.approx([0.5, -0.5, 2 / 3, -1 / 3, -1 / 3])


def test_group_advantages_with_and_without_std_singleton_and_all_equal():
    # group a: rewards 1, 0, 0, 1 -> mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 1/sqrt(3), A = +-0.5 sqrt(3)
    # group b: a single reward 5 -> mean 0, std 1, A = 5 / (1 + 1e-6)
    # group c: rewards 2, 2 -> all equal, A = 0
    rewards = [1.0, 5.0, 0.0, 2.0, 0.0, 2.0, 1.0]
    ids = ["a", "b", "a", "c", "a", "c", "a"]
    h = 0.5 * math.sqrt(3) / (1 + 1e-6 * math.sqrt(3))  # 0.5 / (std + eps)
    got = group_advantages(rewards, ids, norm_by_std=True)
    assert got.tolist() == pytest.approx([h, 5 / (1 + 1e-6), -h, 0, -h, 0, h])
    assert group_advantages(rewards, ids, norm_by_std=False).tolist() == pytest.approx([0.5, 5, -0.5, 0, -0.5, 0, 0.5])
    # equal rewards whose float mean is not exactly the value still give exactly 0
    assert group_advantages([0.1, 0.1, 0.1], [0, 0, 0], norm_by_std=True).tolist() == [0.0, 0.0, 0.0]


def test_group_advantages_with_a_large_eps():
    # rewards 1, 0: mean 0.5, Bessel std 1/sqrt(2); with eps 0.5, A = 0.5 / (1/sqrt(2) + 0.5) = sqrt(2) - 1.
    # A lone reward 3: mean 0, std 1, A = 3 / 1.5 = 2.
    got = group_advantages([1.0, 0.0, 3.0], [0, 0, 1], norm_by_std=True, eps=0.5)
    assert got.tolist() == pytest.approx([math.sqrt(2) - 1, 1 - math.sqrt(2), 2.0])


def test_overlong_penalty_at_the_boundaries():
    # max_len 10, buffer 4: free up to 6, then (6 - L) / 4 down to -1 at 10, and -1 beyond
    assert overlong_penalty([0, 6, 7, 9, 10, 11], max_len=10, buffer=4).tolist() == [0, 0, -0.25, -0.75, -1, -1]
    # the widest buffer penalises from length 0; the narrowest is a step from 0 to -1 at max_len
    assert overlong_penalty([0, 5, 10], max_len=10, buffer=10).tolist() == [0, -0.5, -1]
    assert overlong_penalty([8, 9, 10], max_len=10, buffer=1).tolist() == [0, 0, -1]


# ---------------------------------------------------------------------------------------------
# rows and packing


def test_multi_conv_rows_and_packed_layout():
    # trajectory 0: two conversations (a memory update, then the answer), advantage 0.5
    # trajectory 1: one conversation, advantage -1
    trajs = [Traj([Conv([10, 11], [12, 13], [-1.0, -2.0]), Conv([14, 15, 16], [17], [-0.5])]),
             Traj([Conv([20], [21], [-3.0])])]
    rows = rows_from_trajectories(trajs, torch.tensor([0.5, -1.0]))
    assert [r.advantage for r in rows] == [0.5, 0.5, -1.0]  # every conversation takes its trajectory's
    (mb,) = pack([rows[0], rows[2]], token_budget=100)
    # conversation [10 11 | 12 13] then [20 | 21]; the loss sits where the target is a response token
    assert mb.input_ids.tolist() == [[10, 11, 12, 13, 20, 21]]
    assert mb.target_ids.tolist() == [[11, 12, 13, 0, 21, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]]
    assert mb.mask.tolist() == [[False, True, True, False, True, False]]
    assert mb.old_logprobs.tolist() == [[0, -1, -2, 0, -3, 0]]
    assert mb.advantages.tolist() == [[0, 0.5, 0.5, 0, -1, 0]]
    assert mb.segment_ids.tolist() == [[0, 0, 0, 0, 1, 1]]
    assert (mb.num_tokens, mb.num_seqs) == (3, 2)
    assert torch.equal(mb.to("cpu").old_logprobs, mb.old_logprobs)  # .to(device) moves every tensor


def test_first_fit_decreasing_packing_and_oversized_rows():
    # row lengths 5, 3, 4, 2, 9 with budget 8, longest first: 9 alone (over budget), 5 -> new, 4 -> new,
    # 3 -> joins 5 (= 8), 2 -> joins 4 (= 6)
    rows = [Row([1] * (n - 1), [2]) for n in (5, 3, 4, 2, 9)]
    mbs = pack(rows, token_budget=8)
    assert [mb.input_ids.shape[1] for mb in mbs] == [9, 8, 6]
    assert [mb.num_seqs for mb in mbs] == [1, 2, 2]
    assert sum(mb.num_tokens for mb in mbs) == 5
    # SFT rows: advantage 1 on response tokens, no old log-probs
    assert mbs[0].old_logprobs is None and mbs[0].advantages.tolist() == [[0] * 7 + [1, 0]]
    assert [mb.input_ids.shape[1] for mb in pack(rows, token_budget=1)] == [9, 5, 4, 3, 2]  # each alone


# ---------------------------------------------------------------------------------------------
# dynamic sampling


ROUNDS = [[("q1", [1, 0]), ("q2", [1, 1]), ("q3", [0, 0.5])],
          [("q4", [0, 0]), ("q5", [0, 1]), ("q6", [1, 0])],
          [("q7", [1, 0]), ("q8", [0, 0]), ("q9", [0, 0])]]


def rounds_of(rounds):
    """A generate() that hands out the given rounds in order, and the list of calls made."""
    it, calls = iter(rounds), []

    def generate():
        calls.append(1)
        return list(next(it))
    return generate, calls


def test_dynamic_sampling_stops_as_soon_as_enough():
    generate, calls = rounds_of(ROUNDS)
    kept, seen, rounds = sample_groups(generate, want=3, max_rounds=5)
    # round 1 keeps q1 q3, round 2 adds q5 q6: 4 >= 3, so no third round; the surplus is the caller's
    assert (len(calls), rounds) == (2, 2)
    assert [p for p, _ in kept] == ["q1", "q3", "q5", "q6"]
    assert [p for p, _ in seen] == ["q1", "q2", "q3", "q4", "q5", "q6"]


def test_dynamic_sampling_out_of_rounds_returns_the_shortfall():
    generate, calls = rounds_of(ROUNDS)
    kept, seen, rounds = sample_groups(generate, want=10, max_rounds=3)  # only 5 informative exist
    assert (len(calls), rounds) == (3, 3) and len(seen) == 9
    assert [p for p, _ in kept] == ["q1", "q3", "q5", "q6", "q7"]
    kept, seen, rounds = sample_groups(lambda: [("q", [1, 1])], want=1, max_rounds=2)
    assert (kept, len(seen), rounds) == ([], 2, 2)
    generate, calls = rounds_of(ROUNDS)
    kept, seen, rounds = sample_groups(generate, want=10, max_rounds=1)
    assert (len(calls), rounds, [p for p, _ in kept]) == (1, 1, ["q1", "q3"])


def test_dynamic_sampling_off_keeps_everything_in_one_round():
    generate, calls = rounds_of(ROUNDS)
    kept, seen, rounds = sample_groups(generate, want=100, max_rounds=5, enabled=False)
    assert len(calls) == 1 and rounds == 1 and kept == seen == ROUNDS[0]
    # a group of one is kept without dynamic sampling (the settings refuse rl.n < 2 with it)
    assert sample_groups(lambda: [("q", [1.0])], 1, 3, enabled=False)[0] == [("q", [1.0])]


def test_dynamic_sampling_decides_on_the_given_count():
    # a stand-in for the sum over data-parallel ranks: three other ranks each hold 2 kept groups
    counted = []

    def global_count(kept):
        counted.append(len(kept))
        return len(kept) + 3 * 2

    generate, calls = rounds_of(ROUNDS)
    kept, seen, rounds = sample_groups(generate, want=8, max_rounds=5, count=global_count)
    assert rounds == 1 and counted == [2] and [p for p, _ in kept] == ["q1", "q3"]  # 2 + 6 >= 8
    generate, calls = rounds_of(ROUNDS)
    counted.clear()
    kept, seen, rounds = sample_groups(generate, want=10, max_rounds=5, count=global_count)
    assert rounds == 2 and counted == [2, 4]  # called once per round, every round


# ---------------------------------------------------------------------------------------------
# what reaches this file was checked at the settings boundary: the math states its shapes as asserts,
# and a NaN flows through to the update step, which skips the step (train.Learner.update)


def test_shapes_are_asserted_and_non_finite_values_flow_through():
    z, one = torch.zeros(2, 3), torch.ones(2, 3)
    for call in (lambda: policy_loss(z, torch.zeros(2, 4), one, one),
                 lambda: policy_loss(z, z, torch.ones(3), one),
                 lambda: group_advantages([1.0, 0.0], [0]),
                 lambda: Row([1], [2, 3], 1.0, [-0.1]), lambda: Row([], [2]), lambda: Row([1], []),
                 lambda: pack([Row([1], [2]), Row([1], [2], 1.0, [-0.1])], 10)):
        with pytest.raises(AssertionError):
            call()
    nan = torch.tensor([[0.0, float("nan"), 0], [0, 0, 0]])
    loss, _ = policy_loss(nan, z, one, one)
    assert loss.isnan()
