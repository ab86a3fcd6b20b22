"""
Multi-Conv DAPO: the RL objective that trains MemAgent's memory-writing policy.

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
"""
import math
from dataclasses import dataclass, replace

import torch

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _check(name, x, shape):
    """Raise a ValueError naming `name` if tensor x has the wrong shape or holds NaN/inf."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf")


# ----------------------------------------------------------------------------------------------
# rewards -> advantages


def overlong_penalty(lengths, max_len, buffer):
    """DAPO's soft overlong punishment, added to the reward of a response of length L:
         0                          if L <= max_len - buffer
         ((max_len - buffer) - L) / buffer   inside the buffer (falls linearly to -1 at L = max_len)
         -1                         if L > max_len"""
    if not 1 <= buffer <= max_len:
        raise ValueError(f"buffer must be in [1, max_len={max_len}], got {buffer}")
    L = torch.as_tensor(lengths, dtype=torch.float32)
    if L.dim() != 1 or (L < 0).any():
        raise ValueError("lengths must be a 1-D sequence of non-negative lengths")
    return ((max_len - buffer - L) / buffer).clamp(-1.0, 0.0)


def group_advantages(rewards, group_ids, norm_by_std=True, eps=1e-6):
    """(R - mean) / (std + eps) over each group (same question), Bessel-corrected std, or R - mean
    without norm_by_std -> float32 [N]. A group of one uses mean 0 and std 1; equal rewards get 0.
    group_ids: any 1-D sequence; ids compare as Python values (tensor(3) and 3 are one group)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(r.shape)}")
    _check("rewards", r, r.shape)
    if getattr(group_ids, "ndim", 1) != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
    ids = [g.item() if hasattr(g, "item") else g for g in group_ids]  # tensors hash by identity
    if len(ids) != len(r):
        raise ValueError(f"group_ids has {len(ids)} entries for {len(r)} rewards")
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


def check_dynamic_sampling(n, enabled):
    """Config-time: a group of n = 1 never has two rewards to differ, so every round would be dropped."""
    if enabled and n < 2:
        raise ValueError(f"dynamic sampling needs n >= 2 rollouts per question, got n={n}: a group of one "
                         "reward is never informative (its advantage is 0); raise n or turn it off")


def sample_groups(generate, want, max_rounds, enabled=True, count=len):
    """generate() -> a round: a list of (payload, rewards) groups. With enabled, keep the groups whose
    rewards differ (the others' advantages are all 0) and generate again until count(kept) >= want or
    max_rounds have run; without, one round, all kept. `count` maps the local kept list to the deciding
    number (train.py sums over data-parallel ranks); it runs once every round, so a collective in it
    stays in step. -> (kept, in order, untrimmed; every group seen, for honest accuracy; rounds run).
    Running out of rounds is not an error: the caller trains on what it has and logs the shortfall."""
    if want < 1 or max_rounds < 1:
        raise ValueError(f"want and max_rounds must be >= 1, got want={want}, max_rounds={max_rounds}")
    kept, seen = [], []
    for rounds in range(1, max_rounds + 1):
        new = generate()
        for i, group in enumerate(new):
            _check_group(group, f"round {rounds}, group {i}", enabled)
        seen += new
        kept += [g for g in new if not enabled or min(g[1]) != max(g[1])]
        if not enabled or count(kept) >= want:
            break
    return kept, seen, rounds


def _check_group(group, where, enabled):
    if not (isinstance(group, (tuple, list)) and len(group) == 2):
        raise ValueError(f"generate() {where}: a group must be a (payload, rewards) pair, got {type(group).__name__}")
    rewards = group[1]
    try:
        finite = len(rewards) > 0 and all(math.isfinite(x) for x in rewards)
    except TypeError:
        finite = False
    if not finite:
        raise ValueError(f"generate() {where}: rewards must be a non-empty list of finite numbers, got {rewards!r}")
    if enabled and len(rewards) < 2:
        raise ValueError(f"generate() {where}: a group of one reward is never informative; dynamic sampling "
                         "needs n >= 2 rollouts per question (see check_dynamic_sampling)")


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

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("prompt_ids is empty (the first response token needs a position to predict it)")
        if not self.response_ids:
            raise ValueError("response_ids is empty: nothing to train on")
        if self.old_logprobs is not None and len(self.old_logprobs) != len(self.response_ids):
            raise ValueError(f"old_logprobs has {len(self.old_logprobs)} entries for "
                             f"{len(self.response_ids)} response tokens")
        if not math.isfinite(self.advantage):
            raise ValueError(f"advantage is {self.advantage}")

    def __len__(self):
        return len(self.prompt_ids) + len(self.response_ids)


def rows_from_trajectories(trajectories, advantages):
    """Multi-Conv: one row per conversation, each carrying its trajectory's advantage."""
    if len(advantages) != len(trajectories):
        raise ValueError(f"advantages has {len(advantages)} entries for {len(trajectories)} trajectories")
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
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if len({r.old_logprobs is None for r in rows}) > 1:
        raise ValueError("rows mix RL rows (with old_logprobs) and SFT rows (without)")
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
    if estimator == "k3":
        d = d.clamp(-20.0, 20.0)
        return (d.exp() - d - 1).clamp(-10.0, 10.0)
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


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
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    count = num_tokens if agg == "token-mean" else num_seqs
    if count is None and dp_size != 1:
        raise ValueError(f"dp_size={dp_size} needs the global {'num_tokens' if agg == 'token-mean' else 'num_seqs'}")
    if count is not None and count < 1:
        raise ValueError(f"num_tokens / num_seqs must be >= 1, got {count}")
    mask = mask != 0
    if not mask.any():
        raise ValueError("mask is empty: no response token to train on")
    x = torch.where(mask, x, 0.0)
    if agg == "token-mean":
        return x.sum() * dp_size / (mask.sum() if count is None else count)
    if segment_ids is None:
        segment_ids = torch.arange(x.shape[0], device=x.device)[:, None].expand(x.shape)
    _check("segment_ids", segment_ids, x.shape)
    if (segment_ids < 0).any():
        raise ValueError("segment_ids must be >= 0")
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
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [rows, tokens], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, x in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("mask", mask), ("entropy", entropy)):
        if x is not None:
            _check(name, x, shape)
    _check("advantages", advantages, shape[:1] if advantages.dim() == 1 else shape)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    if not (0 <= clip_low < 1 and clip_high >= 0 and clip_c > 1):
        raise ValueError(f"need 0 <= clip_low < 1, clip_high >= 0, clip_c > 1; got {clip_low}, {clip_high}, {clip_c}")
    mask = mask != 0

    # padding holds junk: zero the log-ratio there so the ratio is 1, never inf
    ratio = torch.where(mask, logprobs - old_logprobs, 0.0).clamp(-20.0, 20.0).exp()
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))
    loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * clip_c), loss)  # pragma: no mutate  tie at A=0
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs is required when kl_coef != 0")
        _check("ref_logprobs", ref_logprobs, shape)
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
