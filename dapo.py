"""Multi-Conv DAPO: the RL objective that trains MemAgent's memory-writing policy.

Each question is rolled out n times (a group). A rollout (trajectory) is a list of conversations:
one per document chunk, in which the model rewrites its memory, and a final one, in which it
answers from the memory alone. Only the final answer is rewarded. Then:

  1. advantage of trajectory i in group g:   A_i = (R_i - mean_g R) / (std_g R + eps)   or   R_i - mean_g R
  2. Multi-Conv: every conversation of trajectory i is its own training row, and every response
     token of every one of those rows gets the same scalar A_i.
  3. per-token clipped surrogate (PPO with DAPO's clip-higher, plus dual clip), r = pi / pi_old:
         l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)),   and if A < 0:  l = min(l, -A c)
  4. token-mean over all response tokens of the optimizer step:   L = sum_t l_t / N.

Around that: overlong reward shaping, dynamic sampling (groups whose rewards are all equal have
zero advantage everywhere; they are dropped and more groups are generated), an optional KL term
to a reference policy (coefficient 0 in DAPO; the release used 0.001 of k3 = exp(d) - d - 1 with
d = log pi_ref - log pi, clamped to [-10, 10]), and packing of rows into token-budget micro-batches
whose losses add up, over micro-batches and data-parallel ranks, to exactly the global mean.

Settings arrive checked (settings.py); a NaN step is skipped by train.Learner.update. Asserts state shapes.
"""
from dataclasses import dataclass, replace

import torch


# ----------------------------------------------------------------------------------------------
# rewards -> advantages

def overlong_penalty(lengths, max_len, buffer):
    """DAPO's soft overlong punishment, added to the reward of a response of length L:
         0                          if L <= max_len - buffer
         ((max_len - buffer) - L) / buffer   inside the buffer (falls linearly to -1 at L = max_len)
         -1                         if L > max_len"""
    assert 1 <= buffer <= max_len, (buffer, max_len)
    L = torch.as_tensor(lengths, dtype=torch.float32)  # (N,)
    return ((max_len - buffer - L) / buffer).clamp(-1.0, 0.0)


def group_advantages(rewards, group_ids, norm_by_std=False, eps=1e-6):
    """(R - mean) / (std + eps) over each group (same question), Bessel-corrected std, or R - mean
    without norm_by_std -> float32 [N]. A group of one uses mean 0 and std 1; equal rewards get 0.
    group_ids: any 1-D sequence; ids compare as Python values (tensor(3) and 3 are one group)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)  # (N,)
    ids = [g.item() if hasattr(g, "item") else g for g in group_ids]  # tensors hash by identity
    assert r.dim() == 1 and len(ids) == len(r), (tuple(r.shape), len(ids))
    members = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)
    adv = torch.zeros_like(r)
    for idx in members.values():
        x = r[idx]
        if len(idx) == 1:
            mean, std = 0.0, 1.0
        elif x.min() == x.max():
            continue  # all equal: advantage 0, exactly
        else:
            mean, std = x.mean(), x.std()  # torch's std is Bessel-corrected (divides by n - 1)
        adv[idx] = (x - mean) / (std + eps) if norm_by_std else x - mean
    return adv.float()


# ----------------------------------------------------------------------------------------------
# dynamic sampling; a group is a pair (payload, rewards) for one question's n rollouts

def sample_groups(generate, want, max_rounds, enabled=True, count=len):
    """generate() -> a round: a list of (payload, rewards) groups. With enabled, keep the groups whose
    rewards differ (the others' advantages are all 0) and generate again until count(kept) >= want or
    max_rounds have run; without, one round, all kept. `count` maps the local kept list to the deciding
    number (train.py sums over data-parallel ranks); it runs once every round, so a collective in it
    stays in step. -> (kept, in order, untrimmed; every group seen, for honest accuracy; rounds run).
    Running out of rounds is not an error: the caller trains on what it has and logs the shortfall."""
    kept, seen = [], []
    for rounds in range(1, max_rounds + 1):
        new = generate()
        seen += new
        kept += [g for g in new if not enabled or min(g[1]) != max(g[1])]
        if not enabled or count(kept) >= want:
            break
    return kept, seen, rounds


# ----------------------------------------------------------------------------------------------
# training rows and token-budget packing

@dataclass
class Row:
    """One conversation as a training row; the loss covers its response tokens only.
    RL: old_logprobs = behaviour log-probs of the response tokens, advantage = its trajectory's.
    SFT: Row(prompt_ids, response_ids), i.e. advantage 1 and no old log-probs."""
    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float = 1.0
    old_logprobs: list[float] | None = None

    def __post_init__(self):  # the first response token needs a prompt position to predict it
        assert self.prompt_ids and self.response_ids, "a row needs a prompt and a response"
        assert self.old_logprobs is None or len(self.old_logprobs) == len(self.response_ids)

    def __len__(self):
        return len(self.prompt_ids) + len(self.response_ids)


def rows_from_trajectories(trajectories, advantages):
    """Multi-Conv: one row per conversation, each carrying its trajectory's advantage."""
    assert len(advantages) == len(trajectories), (len(advantages), len(trajectories))
    return [Row(c.prompt_ids, c.response_ids, float(a), c.logprobs)
            for t, a in zip(trajectories, advantages) for c in t.conversations]


@dataclass
class MicroBatch:
    """Rows laid end to end in one packed row of T tokens, without padding. Positions restart at 0
    at each conversation; that is how the model keeps conversations apart. A conversation with
    prompt length P and response length R predicts its response at positions P-1 .. P+R-2."""
    input_ids: torch.Tensor      # [1, T] int64, prompt + response of each conversation
    target_ids: torch.Tensor     # [1, T] int64, next token of the same conversation (0 after its end)
    position_ids: torch.Tensor   # [1, T] int64
    mask: torch.Tensor           # [1, T] bool, True where the target is a response token
    advantages: torch.Tensor     # [1, T] float32, the row's advantage where mask, else 0
    old_logprobs: torch.Tensor | None  # [1, T] float32, behaviour log-probs where mask, else 0; None for SFT
    segment_ids: torch.Tensor    # [1, T] int64, which conversation of this micro-batch a token is in
    num_tokens: int              # valid (masked) tokens
    num_seqs: int                # conversations

    def to(self, device):
        return replace(self, **{k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)})


def pack(rows, token_budget):
    """First-fit decreasing (ties in input order) into micro-batches of T <= token_budget tokens; a
    longer row gets one of its own (size the budget for the longest conversation to bound memory).
    Conversations are never split, so the sum of num_tokens is exact."""
    assert token_budget >= 1 and len({r.old_logprobs is None for r in rows}) <= 1, "RL and SFT rows mixed"
    bins = []  # [tokens used, row indices]
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i])):
        for b in bins:
            if b[0] + len(rows[i]) <= token_budget:
                b[0] += len(rows[i])
                b[1].append(i)
                break
        else:
            bins.append([len(rows[i]), [i]])
    return [_collate([rows[i] for i in idx]) for _, idx in bins]


def _collate(rows):  # see MicroBatch for the layout
    ids, tgt, pos, mask, adv, old, seg = [], [], [], [], [], [], []
    for s, r in enumerate(rows):
        P, R = len(r.prompt_ids), len(r.response_ids)
        seq = list(r.prompt_ids) + list(r.response_ids)
        ids += seq
        tgt += seq[1:] + [0]
        pos += range(P + R)
        mask += [False] * (P - 1) + [True] * R + [False]
        adv += [0.0] * (P - 1) + [r.advantage] * R + [0.0]
        if r.old_logprobs is not None:
            old += [0.0] * (P - 1) + list(r.old_logprobs) + [0.0]
        seg += [s] * (P + R)
    i64, f32 = torch.int64, torch.float32
    return MicroBatch(torch.tensor([ids], dtype=i64), torch.tensor([tgt], dtype=i64),
                      torch.tensor([pos], dtype=i64), torch.tensor([mask]), torch.tensor([adv], dtype=f32),
                      torch.tensor([old], dtype=f32) if old else None, torch.tensor([seg], dtype=i64),
                      num_tokens=sum(mask), num_seqs=len(rows))


# ----------------------------------------------------------------------------------------------
# the loss

def kl_penalty(logprobs, ref_logprobs, estimator="k3"):
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi, with d = log pi_ref - log pi
    (Schulman, "Approximating KL divergence"):
         k1 = -d                                 unbiased, noisy, can be negative
         k2 = d^2 / 2                            biased, >= 0, low variance
         k3 = clamp(exp(d') - d' - 1, -10, 10)   d' = clamp(d, -20, 20); unbiased before the clamps, >= 0,
                                                 low variance: the release's 'low_var_kl'
    The value clamp on k3 is the release's: a token far from the reference (d = 5: e^5 - 6 = 142.4)
    adds at most 10, and its KL gradient is 0. The clamp on d only keeps exp finite; k1 and k2 are
    not clamped, as there."""
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return d.square() / 2
    d = d.clamp(-20.0, 20.0)  # k3 (settings.RLConfig.kl_estimator is one of the three)
    return (d.exp() - d - 1).clamp(-10.0, 10.0)


def aggregate(x, mask, agg="token-mean", *, num_tokens=None, num_seqs=None, dp_size=1, segment_ids=None):
    """Reduce per-token values x [rows, tokens] over the valid tokens (mask) to this call's share of
    the step loss. Over a step of N valid tokens in S sequences:
         token-mean:            L = (1/N) sum_t x_t
         seq-mean-token-mean:   L = (1/S) sum_s (1/n_s) sum_{t in s} x_t     (n_s valid tokens of s)
         seq-mean-token-sum:    L = (1/S) sum_s sum_{t in s} x_t
    A sequence is a row, or with segment_ids [rows, tokens] (e.g. MicroBatch.segment_ids) a distinct id.
    Exact under gradient accumulation and data parallelism: pass the step's global N (num_tokens) or
    S (num_seqs) summed over all micro-batches and all ranks, and the number of ranks dp_size; each
    call returns dp_size * (its part of the sum) / N. Summing over a rank's micro-batches, then
    averaging over ranks (as DDP/FSDP do with gradients), gives (1/dp_size) * dp_size * sum / N = L.
    Without num_tokens / num_seqs, this call is the whole step (dp_size must be 1)."""
    count = num_tokens if agg == "token-mean" else num_seqs
    assert count is not None or dp_size == 1, "several ranks need the step's global count"
    mask = mask != 0
    x = torch.where(mask, x, 0.0)
    if agg == "token-mean":
        return x.sum() * dp_size / (mask.sum() if count is None else count)
    if segment_ids is None:
        segment_ids = torch.arange(x.shape[0], device=x.device)[:, None].expand(x.shape)
    assert segment_ids.shape == x.shape, (tuple(segment_ids.shape), tuple(x.shape))
    n_seg = int(segment_ids.max()) + 1
    sums = x.new_zeros(n_seg).index_add(0, segment_ids.flatten(), x.flatten())
    n_tok = torch.zeros(n_seg, device=x.device).index_add(0, segment_ids.flatten(), mask.flatten().float())
    per_seq = sums / n_tok.clamp(min=1) if agg == "seq-mean-token-mean" else sums
    return per_seq.sum() * dp_size / ((n_tok > 0).sum() if count is None else count)


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=0.28, clip_c=3.0,
                agg="token-mean", num_tokens=None, num_seqs=None, dp_size=1, segment_ids=None,
                ref_logprobs=None, kl_coef=0.0, kl_estimator="k3", entropy=None):
    """DAPO's clipped surrogate on [rows, tokens] tensors (a packed MicroBatch is rows = 1).
    advantages: [rows, tokens] or [rows]. Per valid token, with r = exp(clamp(logp - logp_old, -20, 20)):
         l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))    clip-higher: eps_low < eps_high
         l = min(l, -A clip_c)   if A < 0                          dual clip: bounds the loss as r -> inf
         l += kl_coef * kl       if kl_coef != 0                   needs ref_logprobs
    reduced by aggregate() (see there for num_tokens, num_seqs, dp_size, segment_ids).
    Returns (loss, metrics): means over this call's valid tokens of clipfrac (tokens where the clip
    is active: A > 0 and r > 1 + clip_high, or A < 0 and r < 1 - clip_low), clipfrac_lower (A < 0 and
    r > clip_c), ppo_kl = logp_old - logp, ratio, and entropy / kl when given / used."""
    shape, others = logprobs.shape, (old_logprobs, mask, entropy, ref_logprobs)  # shape (rows, T)
    assert logprobs.dim() == 2 and all(x is None or x.shape == shape for x in others)
    assert advantages.shape in (shape, shape[:1]), (tuple(advantages.shape), tuple(shape))
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (rows, 1)
    mask = mask != 0

    # padding holds junk: zero the log-ratio there so the ratio is 1, never inf
    ratio = torch.where(mask, logprobs - old_logprobs, 0.0).clamp(-20.0, 20.0).exp()
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))
    loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * clip_c), loss)  # pragma: no mutate  tie at A=0
    if kl_coef:
        assert ref_logprobs is not None, "kl_coef != 0 needs ref_logprobs"
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        loss = loss + kl_coef * kl
    loss = aggregate(loss, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, dp_size=dp_size,
                     segment_ids=segment_ids)

    with torch.no_grad():
        def mean(v):
            return torch.where(mask, v.float(), 0.0).sum() / mask.sum()

        clipped = ((advantages > 0) & (ratio > 1 + clip_high)) | ((advantages < 0) & (ratio < 1 - clip_low))
        metrics = dict(clipfrac=mean(clipped), clipfrac_lower=mean((advantages < 0) & (ratio > clip_c)),
                       ppo_kl=mean(old_logprobs - logprobs), ratio=mean(ratio))
        if entropy is not None:
            metrics["entropy"] = mean(entropy)
        if kl_coef:
            metrics["kl"] = mean(kl)
        values = torch.stack(list(metrics.values())).tolist()  # one device sync for all metrics
    return loss, dict(zip(metrics, values))
