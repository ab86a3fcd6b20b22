"""Train the memory agent: Multi-Conv DAPO (RL), or supervised warm-start (--algo sft).

    python train.py --config configs/tiny.json                          # one process
    torchrun --standalone --nproc_per_node=2 train.py --config configs/tiny.json
    torchrun --nnodes=4 --nproc_per_node=8 ... train.py --config configs/qwen2.5-7b-instruct.json

One RL step: questions (deterministic, split over ranks) -> n memory-agent rollouts each, with the
live policy -> final-answer rewards (+ overlong shaping) -> dynamic sampling (dapo.sample_groups,
agreed across ranks) -> group advantages, broadcast to every conversation of a trajectory -> old
log-probs -> for each mini-batch: token-budget micro-batches, loss over the step's global token
count, backward, grad clip, AdamW. The loop is `train()` at the bottom; what it calls is above it:
the settings tree, building the policy, data, the update, rollout. The run directory (checkpoints,
metrics, the summary) is run_dir.py; the warm start's data is warm_start.py.
"""
import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

import dapo
import eval as evaluation
import tasks
from memory_agent import AgentConfig, MemoryAgent, agent_json, document_tokens
from model import TINY_CONFIGS, build_model, check_model_name
from rollout import Engine, SamplingParams, derive_seed
from run_dir import Checkpointer, all_max, all_sum, barrier, log_step, setup_distributed, summary, tensorboard
from settings import (INT64, TASK_FILES, DataConfig, EngineConfig, EvalConfig, OptimConfig, RLConfig, SettingError,
                      Settings, at_least, build, flatten, merge, one_of, option, within)
from tokenizer import load_tokenizer, train_sentencepiece
from warm_start import TOKENIZER_TASKS, sft_rows, tiny_corpus


# --------------------------------------------------------------------------------------------
# config: one tree of settings (settings.py), a JSON file, --key=value overrides (dots for nesting)

@dataclass
class Config(Settings):
    model: str = "tiny"  # a HF checkpoint directory, or a tiny config name (fresh weights)
    tokenizer: str = ""  # default: the model directory
    algo: str = option("rl", one_of("rl", "sft"))
    steps: int = option(20, at_least(1))
    out_dir: str = "runs/tiny"
    seed: int = option(0, within(0, INT64))
    parallel: str = option("auto", one_of("auto", "ddp", "fsdp"))  # auto: fsdp on CUDA with several ranks
    dtype: str = option("float32", one_of("float32", "bfloat16", "float16"))  # parameters, without FSDP
    gradient_checkpointing: bool = False
    checkpoint_every: int = option(10, at_least(1))
    keep_checkpoints: int = option(2, at_least(1))
    resume: bool = False
    export: str = ""  # write the (resumed) model to this directory in HF format and exit
    max_bad_steps: int = option(3, at_least(1))  # stop after this many non-finite steps in a row
    progress: bool = True
    data: DataConfig = option(DataConfig)
    agent: AgentConfig = option(AgentConfig)
    rl: RLConfig = option(RLConfig)
    optim: OptimConfig = option(OptimConfig)
    engine: EngineConfig = option(EngineConfig)
    eval: EvalConfig = option(EvalConfig)

    @classmethod
    def below(cls, values):
        return agent_json(values.get("model", cls.model))

    def check_together(self):
        check_model_name(self.model)
        for key, spec, lengths in (("data", self.data.tasks, self.data.lengths),
                                   ("eval", self.eval.tasks, self.eval.lengths or self.data.lengths),
                                   ("data.tokenizer_tasks", self.data.tokenizer_tasks, "1k")):
            check_tasks(key, spec, lengths, files=key != "data.tokenizer_tasks")
        if self.algo == "rl" and self.rl.dynamic_sampling and self.rl.n < 2:
            raise SettingError(f"rl.dynamic_sampling needs rl.n >= 2 rollouts per question, got {self.rl.n}: a "
                               "group of one reward is never informative; raise rl.n or turn it off")
        held_out, trained = (self.eval.tasks or self.data.tasks).partition(":"), self.data.tasks.partition(":")
        if self.eval.every and trained[0] in TASK_FILES and os.path.realpath(held_out[2]) == os.path.realpath(
                trained[2]):
            raise SettingError("eval.tasks must name a held-out file when data.tasks is a file (else validation "
                               "would read the training questions)")
        if self.algo == "sft" and self.data.max_chunks:
            raise SettingError("data.max_chunks cuts RL's documents, as the release trains; SFT's ideal memories "
                               "are read from whole documents: leave it 0 with algo=sft")
        many = [n for n in self.data.tasks.split(",") if n in tasks.TASKS and tasks.TASKS[n].scorer ==
                "string_match_all" and (tasks.TASKS[n].relevant > 1 or not tasks.TASKS[n].answers_in_needles)]
        if self.algo == "rl" and self.rl.reward == "boxed_em" and many:
            raise SettingError(f"rl.reward=boxed_em scores one boxed answer against each gold alone; {many} ask "
                               "for several answers: use rl.reward=sample (the task's own scorer)")
        if self.rl.overlong_buffer > self.agent.answer_tokens:
            raise SettingError(f"rl.overlong_buffer={self.rl.overlong_buffer} exceeds agent.answer_tokens="
                               f"{self.agent.answer_tokens}")
        if self.export:
            check_export_dir(self)
        if self.tokenizer and not os.path.exists(self.tokenizer):
            raise SettingError(f"tokenizer: no such file or directory '{self.tokenizer}'")
        shared = set((self.eval.tasks or self.data.tasks).split(",")) & set(self.data.tasks.split(","))
        if self.eval.every and trained[0] not in TASK_FILES and shared and self.eval.seed == self.seed:
            raise SettingError(f"eval.seed={self.eval.seed} is the run's seed: validation would draw the training "
                               "questions; give it a seed of its own")


def check_export_dir(cfg):
    """An export goes to a new or empty directory, never over the run's inputs, its out_dir or among its
    checkpoints (a folder out_dir/export is fine)."""
    export, out = os.path.realpath(cfg.export), os.path.realpath(cfg.out_dir)
    ckpts = os.path.join(out, "checkpoints")
    tok = cfg.tokenizer and os.path.realpath(cfg.tokenizer if os.path.isdir(cfg.tokenizer) else
                                             os.path.dirname(cfg.tokenizer))
    if export in (os.path.realpath(cfg.model), tok, out, ckpts) or export.startswith(ckpts + os.sep):
        raise SettingError(f"export: '{cfg.export}' is the run's model or tokenizer directory, its out_dir or "
                           "among its checkpoints; export to a new directory")
    if os.path.exists(export) and (not os.path.isdir(export) or os.listdir(export)):
        raise SettingError(f"export: '{cfg.export}' exists and is not an empty directory; export to a new one")


def check_tasks(key, spec, lengths, files=True):
    """Task names (tasks.TASKS, not those that read a file) and their lengths, or (files) one jsonl:FILE /
    hotpotqa:FILE, read when the run starts (task_cells)."""
    names = spec.split(",") if spec else []
    if files and len(names) == 1 and spec.partition(":")[0] in TASK_FILES:
        return
    unknown = [t for t in names if t not in tasks.TASKS or t in tasks.SOURCED]
    if unknown:
        raise SettingError(f"{key}: unknown tasks {unknown}; known: {sorted(set(tasks.TASKS) - tasks.SOURCED)}"
                           + (", or one jsonl:FILE / hotpotqa:FILE" if files else ""))
    try:
        evaluation.plan(names, lengths.split(","))
    except ValueError as e:
        raise SettingError(f"{key}: {e}") from None


def task_cells(spec, lengths, hotpot_docs):
    """eval.py's cells of data.tasks or eval.tasks (a HotpotQA file's questions read hotpot_docs documents)."""
    return evaluation.plan(spec.split(","), [str(hotpot_docs)] if spec.startswith("hotpotqa:") else lengths.split(","))


# what a resumed run may change: how long it runs and how it reports, never what it computes
RESUMABLE = {"steps", "checkpoint_every", "keep_checkpoints", "max_bad_steps", "progress", "resume", "export",
             "eval.every"}


def settings_of_the_run(cfg, checkpoints):
    """A resumed run keeps the settings it was made with, so that its record does not lie; an export
    writes the run as it was trained, and says which settings given now it set aside."""
    meta, where = checkpoints.newest_meta()
    changed = changed_settings(cfg, meta["config"]) if meta else []
    if cfg.export and meta:
        defaults = flatten(asdict(Config()))  # what was not given cannot have been set aside
        aside = [f"{k}={now!r}" for k, _, now in changed if now != defaults.get(k)]
        if aside and checkpoints.rank == 0:
            print(f"--export writes the run as {where} was trained; set aside: {', '.join(aside)}", flush=True)
        keep = dict(export=cfg.export, resume=True, out_dir=cfg.out_dir, progress=cfg.progress)
        return build(Config, merge(meta["config"], keep), where)
    if cfg.resume and changed:
        diff = "; ".join(f"{k}={then!r} there, {now!r} now" for k, then, now in changed[:6])
        raise SettingError(f"--resume: {where} was made with other settings ({diff}). Resume with the same "
                           f"settings (only {', '.join(sorted(RESUMABLE))} may change), or start a new out_dir")
    if cfg.resume and meta and meta["step"] > cfg.steps:
        raise SettingError(f"steps={cfg.steps}: {where} is already at step {meta['step']}")
    return cfg


def changed_settings(cfg, saved):
    """[(key, saved value, value now)] of the settings that change what a run computes (not RESUMABLE)."""
    now, then = flatten(asdict(cfg)), flatten(saved)
    for d in (now, then):  # the same file, however it is spelt
        d.update({k: os.path.realpath(d[k]) for k in ("model", "tokenizer", "out_dir") if os.path.exists(d[k] or "")})
    return [(k, then.get(k), now.get(k)) for k in sorted(set(now) | set(then))
            if k not in RESUMABLE and now.get(k) != then.get(k)]


# --------------------------------------------------------------------------------------------
# the policy under FSDP

def fsdp_units(model):
    return [*model.layers, model]


@contextmanager
def generation_mode(model, fsdp):
    """Under FSDP, gather every unit's full (bf16) weights once for the whole rollout and keep them
    between forwards; afterwards go back to shards. The engine then runs the modules in place."""
    if fsdp:
        for m in fsdp_units(model):
            m.unshard()
            m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        if fsdp:
            for m in fsdp_units(model):
                m.reshard()
                m.set_reshard_after_forward(True)


def sync_gradients(model, world, fsdp):
    """ddp: average gradients over ranks (FSDP reduce-scatters them in backward itself)."""
    if world == 1 or fsdp:
        return
    for p in model.parameters():  # a rank that had nothing to learn this step still takes part
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in model.parameters()]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# --------------------------------------------------------------------------------------------
# building the policy, its reference and its optimizer

def build_policy(cfg, world, device, vocab_size):
    """-> (model, fsdp). FSDP2 shards every block and the root (fp32 masters, bf16 compute); ddp
    keeps full replicas that start from rank 0's weights."""
    fsdp = cfg.parallel == "fsdp" or (cfg.parallel == "auto" and device.type == "cuda" and world > 1)
    dtype = torch.float32 if fsdp else getattr(torch, cfg.dtype)
    model = build_model(cfg.model, dtype=dtype, device="cpu", seed=cfg.seed)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens, the model '{cfg.model}' only "
                         f"{model.config.vocab_size}")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.to(device)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16 compute on GPUs; fp32 on CPU (gloo), where bf16 is slow and a run must match one process
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for m in fsdp_units(model):
            fully_shard(m, mp_policy=mp)
    elif world > 1:
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    return model, fsdp


def build_reference(cfg, device, fsdp):
    """A frozen copy of the initial policy for the KL term, in the dtype the policy computes in;
    under FSDP sharded like the policy (a full bf16 copy per rank would cost 15 GB at 7B)."""
    dtype = torch.bfloat16 if fsdp and device.type == "cuda" else getattr(torch, cfg.dtype)
    ref = build_model(cfg.model, dtype=dtype, device=device, seed=cfg.seed).eval().requires_grad_(False)
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for m in fsdp_units(ref):
            fully_shard(m)
    return ref


def build_optimizer(cfg, model, fsdp):
    """AdamW (no decay on norms and biases unless decay_all) and a warm-up, stable, cool-down LR schedule."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2 or o.decay_all]
    rest = [p for p in model.parameters() if p.dim() < 2 and not o.decay_all]
    first = 0 if o.warmup_from_zero else 1
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), foreach=not fsdp)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + first) / o.warmup_steps if o.warmup_steps else 1.0,
                           (cfg.steps - s) / o.cooldown_steps if o.cooldown_steps else 1.0))
    return opt, sched


def build_tokenizer(cfg, rank):
    path = cfg.tokenizer or (cfg.model if os.path.isdir(cfg.model) else "")
    if path:
        return load_tokenizer(path)
    # A from-scratch tiny model with no tokenizer given: train one on the task text (seconds).
    path = os.path.join(cfg.out_dir, "tokenizer.model")
    if rank == 0 and not (os.path.isfile(path) and (cfg.resume or cfg.export)):  # only a resumed run's is its own
        names = cfg.data.tokenizer_tasks.split(",") if cfg.data.tokenizer_tasks else TOKENIZER_TASKS
        train_sentencepiece(tiny_corpus(names=names), TINY_CONFIGS[cfg.model].vocab_size, path)
    barrier()
    return load_tokenizer(path)


# --------------------------------------------------------------------------------------------
# data: the i-th question of the run is a pure function of (config, i)

def held_out_samples(cfg, tok):
    """The validation questions: eval.samples per task x length, drawn with eval.seed, as eval.py draws them."""
    e, d = cfg.eval, cfg.data
    cells = task_cells(e.tasks or d.tasks, e.lengths or d.lengths, d.hotpot_docs)
    return [s for _, kind, path, n in cells for s in evaluation.load_samples(kind, path, n, tok, e.samples, e.seed)]


class Questions:
    def __init__(self, cfg: Config, tok):
        self.cfg, self.tok = cfg, tok
        self.samples = None
        if cfg.data.tasks.partition(":")[0] in TASK_FILES:  # one file, read whole
            (_, kind, path, n), = task_cells(cfg.data.tasks, cfg.data.lengths, cfg.data.hotpot_docs)
            self.samples = evaluation.load_samples(kind, path, n, tok, None, cfg.seed)[:cfg.data.max_questions or None]
        else:
            self.names = cfg.data.tasks.split(",")
            self.lengths = [tasks.parse_length(x) for x in cfg.data.lengths.split(",")]
            for name, length in ((n, x) for n in self.names for x in self.lengths):  # the run's first questions
                try:
                    tasks.check_length(name, length, tok, num=64, seed=cfg.seed)
                except ValueError as e:
                    raise SettingError(f"data.lengths: {e}") from None

    def get(self, i):
        sample = self._get(i)
        if self.cfg.data.max_chunks:
            return centre_truncated(sample, self.tok, self.cfg.data.max_chunks * self.cfg.agent.chunk_tokens)
        return sample

    def _get(self, i):
        if self.samples is not None:
            epoch, j = divmod(i, len(self.samples))
            if not self.cfg.data.shuffle:
                return self.samples[j]
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.samples))
            return self.samples[order[j]]
        task = self.names[i % len(self.names)]
        length = self.lengths[i // len(self.names) % len(self.lengths)]
        try:
            return tasks.TASKS[task](length, self.tok, seed=self.cfg.seed, index=i)
        except ValueError as e:  # a length at the edge: this question needs more than the first ones did
            raise SettingError(f"data.lengths: question {i} of the run: {e}") from None


def centre_truncated(sample, tok, max_tokens):
    """The release's training contexts: the document as token ids, its first and last max_tokens // 2
    ids kept when it is longer than max_tokens."""
    ids = [i for piece in document_tokens(sample.document, tok) for i in piece]
    if len(ids) <= max_tokens:
        return replace(sample, document=ids)
    ids = ids[:max_tokens // 2] + ids[len(ids) - max_tokens // 2:]  # its needles' offsets no longer hold
    return replace(sample, document=ids, meta={k: v for k, v in sample.meta.items() if k != "needles"} |
                   dict(doc_tokens=len(ids)))


# --------------------------------------------------------------------------------------------
# the update: micro-batches, the loss over the step's global token count, one optimizer step

class Learner:
    """The policy, its optimizer and schedule, and the optional frozen reference for the KL term."""

    def __init__(self, cfg, world, device, vocab_size):
        self.cfg, self.world, self.device = cfg, world, device
        self.model, self.fsdp = build_policy(cfg, world, device, vocab_size)
        self.ref = build_reference(cfg, device, self.fsdp) if cfg.rl.kl_coef and cfg.algo == "rl" else None
        self.opt, self.sched = build_optimizer(cfg, self.model, self.fsdp)
        self.autocast = device.type == "cuda" and not self.fsdp and cfg.dtype == "float32"

    def forward(self, mb, model=None, **kw):
        with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            return (model or self.model)(mb.input_ids, mb.position_ids, target_ids=mb.target_ids, **kw)

    def micro_batches(self, rows):
        """Pack this rank's rows. Under FSDP every rank must run as many forwards as the others
        (each one all-gathers), so short ranks get empty (None) passes to line up."""
        mbs = [mb.to(self.device) for mb in dapo.pack(rows, self.cfg.optim.micro_batch_tokens)]
        target = all_max(len(mbs), self.device) if self.fsdp else len(mbs)
        return mbs + [None] * (target - len(mbs))

    def _empty(self):
        """A 2-token micro-batch with nothing to learn: the pass a rank without data runs."""
        z = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        return dapo.MicroBatch(z, z, torch.arange(2, device=self.device)[None], z.bool(), z.float(), z.float(),
                               z, 0, 0)

    @torch.no_grad()
    def recompute_old_logprobs(self, mbs):
        """pi_old under the weights before this step's first update, in place of the engine's
        behaviour log-probs; -> summed |behaviour - recomputed| and token count (their drift)."""
        diff, count = 0.0, 0
        for mb in mbs:
            lp = self.forward(mb or self._empty(), temperature=self.cfg.rl.temperature).float()
            if mb is not None:
                diff += float((lp - mb.old_logprobs)[mb.mask].abs().sum())
                count += mb.num_tokens
                mb.old_logprobs = torch.where(mb.mask, lp, 0.0)
        return diff, count

    def _loss(self, mb, n_tok, n_seq, sums):
        """This micro-batch's share of the step loss (RL: DAPO + KL; SFT: next-token NLL)."""
        cfg, rl = self.cfg, self.cfg.rl
        sft = cfg.algo == "sft"
        logp, ent = self.forward(mb, temperature=1.0 if sft else rl.temperature, return_entropy=True)
        if sft:
            return dapo.aggregate(-logp, mb.mask, num_tokens=n_tok, dp_size=self.world), \
                {"entropy": float(ent[mb.mask].mean())}
        if rl.mini_batches == 1:  # the current weights are pi_old: ratio 1, gradient exact
            sums["rollout_logp_diff"] += float((logp.detach() - mb.old_logprobs)[mb.mask].abs().sum()) / n_tok
            old = logp.detach()
        else:
            old = mb.old_logprobs
        ref = None
        if self.ref is not None:
            with torch.no_grad():
                ref = self.forward(mb, self.ref, temperature=rl.temperature)
        return dapo.policy_loss(
            logp, old, mb.advantages, mb.mask, clip_low=rl.clip_low, clip_high=rl.clip_high, clip_c=rl.clip_c,
            agg=rl.loss_agg, num_tokens=n_tok, num_seqs=n_seq, dp_size=self.world, segment_ids=mb.segment_ids,
            ref_logprobs=ref, kl_coef=rl.kl_coef, kl_estimator=rl.kl_estimator, entropy=ent)

    def update(self, mbs):
        """One optimizer step over micro-batches. -> metrics, or None if no rank has a token to learn."""
        counts = all_sum({"tokens": sum(mb.num_tokens for mb in mbs if mb),
                          "seqs": sum(mb.num_seqs for mb in mbs if mb)}, self.device)
        n_tok, n_seq = counts["tokens"], counts["seqs"]
        if n_tok == 0:
            return None
        self.model.train()
        sums = {"loss": 0.0, "rollout_logp_diff": 0.0} if self.cfg.algo == "rl" and \
            self.cfg.rl.mini_batches == 1 else {"loss": 0.0}  # token-weighted sums, / global tokens
        for i, mb in enumerate(mbs):
            if self.fsdp:  # reduce-scatter gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(mbs) - 1)
            if mb is None or mb.num_tokens == 0:
                loss, m = self.forward(self._empty())[0].sum() * 0.0, {}
                if self.ref is not None and self.fsdp:  # the sharded reference all-gathers too
                    with torch.no_grad():
                        self.forward(self._empty(), self.ref)
            else:
                loss, m = self._loss(mb, n_tok, n_seq, sums)
            loss.backward()
            sums["loss"] += float(loss.detach()) / self.world  # the ranks' shares average to the step loss
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * mb.num_tokens / n_tok
        sync_gradients(self.model, self.world, self.fsdp)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        metrics = dict(all_sum(sums, self.device), grad_norm=grad_norm)
        if not (math.isfinite(grad_norm) and math.isfinite(metrics["loss"])):
            metrics["skipped"] = 1
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return metrics


# --------------------------------------------------------------------------------------------
# rollouts and their metrics

def make_engine(cfg, model, fsdp, step):
    e = cfg.engine
    return Engine(model, num_blocks=e.num_blocks or None, block_size=e.block_size, max_num_seqs=e.max_num_seqs,
                  max_num_batched_tokens=e.max_num_batched_tokens, gpu_memory_utilization=e.gpu_memory_utilization,
                  cuda_graphs=e.cuda_graphs and not fsdp,  # FSDP's hooks fork streams
                  seed=derive_seed(cfg.seed, step))


def reward(kind, sample, traj):
    """boxed_em: the release's reward (tasks.boxed_em); sample: the sample's own scorer."""
    if kind == "sample":
        return tasks.score(sample, traj.answer_text)
    return tasks.boxed_em(traj.answer_text, sample.answers)


def mini_batch_order(trajs, shuffle, seed):
    """The order of the trajectories' rows (one per conversation, trajectory by trajectory) that the
    mini-batches cut into contiguous slices: seeded at random, or the release's batch order (every
    trajectory's first memory update, then every second one, ..., the final answers last)."""
    turns = [(1, 0) if c.is_final else (0, c.turn) for t in trajs for c in t.conversations]
    if shuffle:
        return np.random.default_rng(seed).permutation(len(turns))
    return np.array(sorted(range(len(turns)), key=turns.__getitem__), dtype=np.int64)


def shaped_rewards(cfg, reward_fn, sample, group):
    """Each trajectory's reward, plus DAPO's overlong penalty on its final answer when enabled."""
    rewards = [float(reward_fn(sample, t)) for t in group]
    if cfg.rl.overlong_buffer:
        lengths = [len(t.conversations[-1].response_ids) if t.answer_text is not None else 0 for t in group]
        pen = dapo.overlong_penalty(lengths, cfg.agent.answer_tokens, cfg.rl.overlong_buffer)
        rewards = [r + p for r, p in zip(rewards, pen.tolist())]
    return rewards


def rollout_metrics(seen, kept=()):
    """Sums over every generated group [(sample, trajectories, rewards)] (what the policy really does, not
    only the groups `kept` for the update), by task too, reduced across ranks by key; a mean's count sits
    beside it as KEY/n, so that means() of the ranks' sums is the mean over all of them."""
    m = Counter()
    for s, g, rs in seen:
        task = s.meta.get("task", "data")
        m[f"groups/{task}"] += 1
        m[f"kept_groups/{task}"] += 0  # a task whose groups are all dropped by dynamic sampling is not trained
        for t, r in zip(g, rs):
            memories = [c for c in t.conversations if not c.is_final]
            answered = t.answer_text is not None and bool(t.conversations)
            right = tasks.score(s, t.answer_text)
            for key, value, n in (("reward", r, 1), (f"reward/{task}", r, 1), ("accuracy", right, 1),
                                  (f"accuracy/{task}", right, 1), ("turns", t.turns, 1),
                                  ("memory_len", sum(len(c.response_ids) for c in memories), len(memories)),
                                  ("memory_capped_frac", sum(c.finish_reason == "length" for c in memories),
                                   len(memories)),
                                  ("answer_len", len(t.conversations[-1].response_ids) if answered else 0, answered),
                                  ("no_boxed_frac", answered and t.answer is None, answered)):
                m[key] += value
                m[key + "/n"] += n
            m["errors"] += t.error is not None
            m["gen_tokens"] += t.tokens_generated
    for s, _, _ in kept:
        m[f"kept_groups/{s.meta.get('task', 'data')}"] += 1
    return m


# --------------------------------------------------------------------------------------------
# the trainer: a step is rollout -> advantages -> rows -> updates; train() is the whole loop

class Trainer:
    def __init__(self, cfg: Config, reward_fn=None):
        self.cfg = cfg  # checked when it was built
        self.rank, self.world, self.device = setup_distributed()
        torch.manual_seed(cfg.seed + self.rank)
        if cfg.data.questions_per_step % self.world:
            raise SettingError(f"data.questions_per_step={cfg.data.questions_per_step} must be divisible by "
                               f"the {self.world} ranks")
        self.checkpoints = Checkpointer(cfg, self.rank, self.world, self.device)
        try:
            self.checkpoints.claim_out_dir()  # before anything is written there (a tokenizer trained for the run)
            self.cfg = self.checkpoints.cfg = cfg = settings_of_the_run(cfg, self.checkpoints)
            self.tok = build_tokenizer(cfg, self.rank)
            self.learner = Learner(cfg, self.world, self.device, self.tok.vocab_size)
            self.questions = None if cfg.export else Questions(cfg, self.tok)  # an export reads no data
            self.held_out = held_out_samples(cfg, self.tok) if cfg.eval.every and not cfg.export else []
        except BaseException:
            self.checkpoints.release_out_dir()
            raise
        self.model, self.opt, self.sched = self.learner.model, self.learner.opt, self.learner.sched
        self.reward_fn = reward_fn or partial(reward, cfg.rl.reward)
        self.step, self.position, self.bad_steps = 0, 0, 0

    def log(self, *args):
        if self.rank == 0:
            print(*args, flush=True)

    def next_questions(self, k):
        """This rank's share of the next k questions of the run, with their indices in the run."""
        idx = range(self.position + self.rank, self.position + k, self.world)
        self.position += k
        return [(i, self.questions.get(i)) for i in idx]

    def rollout(self):
        """Rounds of n rollouts per question until the ranks hold questions_per_step informative groups
        (dapo.sample_groups) -> (this rank's kept [(sample, trajectories, rewards)], all it generated, stats)."""
        cfg, want = self.cfg, self.cfg.data.questions_per_step
        t0 = time.perf_counter()
        with generation_mode(self.model, self.learner.fsdp):
            engine = make_engine(self.cfg, self.model, self.learner.fsdp, self.step)
            agent = MemoryAgent(engine, self.tok, cfg.agent)

            def generate():
                params = SamplingParams(temperature=cfg.rl.temperature, top_p=cfg.rl.top_p,
                                        seed=derive_seed(cfg.seed, self.position, self.rank))
                questions = self.next_questions(want)
                trajs = agent.run([s for _, s in questions], n=cfg.rl.n, params=params)
                groups = [trajs[j * cfg.rl.n:(j + 1) * cfg.rl.n] for j in range(len(questions))]
                out = []  # ((index, sample, trajectories, rewards), what dynamic sampling judges)
                for (i, s), g in zip(questions, groups):
                    rewards = shaped_rewards(cfg, self.reward_fn, s, g)
                    judged = rewards if cfg.rl.filter_by == "reward" else [float(self.reward_fn(s, t)) for t in g]
                    out.append(((i, s, g, rewards), judged))
                return out

            count = lambda kept: all_sum({"kept": len(kept)}, self.device)["kept"]
            kept, seen, rounds = dapo.sample_groups(generate, want, cfg.rl.max_rounds, cfg.rl.dynamic_sampling,
                                                    count=count)
            stats = dict(prefill_tokens=engine.stats["prefill_tokens"], prefix_cache_tokens=engine.blocks.cache_hits)
        chosen, total = earliest_groups([i for (i, _, _, _), _ in kept], want, self.world)
        kept = [grp for grp in kept if grp[0][0] in chosen]
        if cfg.rl.dynamic_sampling and cfg.rl.out_of_rounds == "error" and total < want:  # every rank alike
            raise RuntimeError(f"{rounds} generation rounds (rl.max_rounds) gave {total} informative groups of "
                               f"the {want} a step needs; stopping, as rl.out_of_rounds=error asks")
        stats.update(kept_groups=len(chosen), rounds=rounds, rollout_s=time.perf_counter() - t0,
                     dropped_groups=all_sum({"d": len(seen) - len(kept)}, self.device)["d"] - (total - len(chosen)))
        as_triples = lambda groups: [(s, g, r) for (_, s, g, r), _ in groups]
        return as_triples(kept), as_triples(seen), stats

    def rl_step(self):
        cfg = self.cfg
        self.model.eval()
        kept, seen, st = self.rollout()
        check_rollouts(seen, self.step, self.device)
        t0 = time.perf_counter()
        trajs = [t for _, g, _ in kept for t in g]
        groups = [i for i, (_, g, _) in enumerate(kept) for _ in g]
        adv = dapo.group_advantages([r for _, _, rs in kept for r in rs], groups, norm_by_std=cfg.rl.norm_by_std)
        rows = dapo.rows_from_trajectories(trajs, adv.tolist())
        order = mini_batch_order(trajs, cfg.rl.shuffle_mini_batches, [cfg.seed, self.step])
        mini = [self.learner.micro_batches([rows[i] for i in part])
                for part in np.array_split(order, cfg.rl.mini_batches)]
        m = {}
        if cfg.rl.mini_batches > 1:
            drift = [self.learner.recompute_old_logprobs(mbs) for mbs in mini]
            d = all_sum({"diff": sum(x for x, _ in drift), "n": sum(n for _, n in drift)}, self.device)
            m["rollout_logp_diff"] = d["diff"] / max(d["n"], 1)
        logprob_s, t0 = time.perf_counter() - t0, time.perf_counter()
        updates = [u for u in (self.learner.update(mbs) for mbs in mini) if u]
        update_s = time.perf_counter() - t0
        m.update({k: float(np.mean([u[k] for u in updates if k in u])) for u in updates for k in u})
        m.update(means(all_sum(dict(rollout_metrics(seen, kept), **{"adv_mean": float(adv.sum()), "adv_sq":
                                    float((adv ** 2).sum()), "adv_mean/n": len(adv), "adv_sq/n": len(adv)},
                                    train_tokens=sum(map(len, rows)), prefill_tokens=st.pop("prefill_tokens"),
                                    prefix_cache_tokens=st.pop("prefix_cache_tokens")), self.device)),
                 **st, logprob_s=logprob_s, update_s=update_s)
        m.update(adv_std=math.sqrt(max(m.pop("adv_sq") - m["adv_mean"] ** 2, 0)),
                 gen_tokens_per_s=m["gen_tokens"] / max(st["rollout_s"], 1e-9),
                 train_tokens_per_s=m["train_tokens"] / max(update_s + logprob_s, 1e-9))
        return m

    def sft_step(self):
        t0 = time.perf_counter()
        rows = sft_rows(self.cfg, self.tok, self.step, self.rank, self.next_questions)
        m = self.learner.update(self.learner.micro_batches(rows)) or {}
        tokens = all_sum({"t": sum(len(r) for r in rows)}, self.device)["t"]
        m.update(update_s=time.perf_counter() - t0, train_tokens=tokens,
                 train_tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9))
        return m

    def validate(self):
        """Held-out accuracy (by rl.reward, as the release validates with its reward) with the live policy,
        each rank a share of the questions; by task too."""
        e = self.cfg.eval
        share = self.held_out[self.rank::self.world]
        self.model.eval()
        with generation_mode(self.model, self.learner.fsdp):
            engine = make_engine(self.cfg, self.model, self.learner.fsdp, self.step)
            agent = MemoryAgent(engine, self.tok, self.cfg.agent, keep_conversations=False)
            params = SamplingParams(temperature=e.temperature, top_p=e.top_p, seed=derive_seed(e.seed, self.rank))
            trajs = agent.run(share, n=e.n, params=params)
        sums = {}
        for i, t in enumerate(trajs):
            s = share[i // e.n]
            for key in ("val_accuracy", f"val_accuracy/{s.meta.get('task', 'data')}"):
                sums[key] = sums.get(key, 0.0) + reward(self.cfg.rl.reward, s, t)
                sums[key + "/n"] = sums.get(key + "/n", 0) + 1
        return means(all_sum(sums, self.device))

    def load_checkpoint(self):  # -> False if there is no checkpoint to resume from
        state = self.checkpoints.load(self.model, self.opt, self.sched)
        if state is not None:
            self.step, self.position, self.bad_steps = state["step"], state["position"], state["bad_steps"]
        return state is not None

    def save_checkpoint(self):
        return self.checkpoints.save(self.model, self.opt, self.sched,
                                     dict(step=self.step, position=self.position, bad_steps=self.bad_steps))

    def train(self):
        try:
            return self._train()
        finally:
            self.checkpoints.release_out_dir()

    def _train(self):
        cfg = self.cfg
        # torch.distributed.checkpoint notes that it saves in one process when there is one; the LR
        # schedule counts RL steps, including those whose groups were all dropped (no optimizer step)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        if (cfg.resume or cfg.export) and not self.load_checkpoint():
            if cfg.export or self.checkpoints.newest(damaged=True):
                raise RuntimeError(f"--resume/--export: no checkpoint in {self.checkpoints.dir} could be loaded")
            if self.rank == 0:  # nothing to resume: the run starts over, and so does its record
                self.checkpoints.truncate_metrics(0)
        if cfg.export:
            self.checkpoints.export(self.model, self.tok, cfg.agent, cfg.export)
            self.log(f"exported step {self.step} of {cfg.out_dir} to {cfg.export}")
            return []
        self.log(json.dumps(asdict(cfg), indent=2))
        self.log(f"model {cfg.model}: {self.model.num_params() / 1e6:.2f}M parameters, world {self.world}, "
                 f"{'fsdp' if self.learner.fsdp else 'ddp'}, device {self.device}")
        tb = tensorboard(cfg.out_dir) if self.rank == 0 else None
        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.algo, unit="step")
        history = []
        if cfg.eval.every and self.step == 0:  # the starting point, as the release validates before training
            m = dict(self.validate(), step=0)
            if self.rank == 0:
                log_step(self.checkpoints.metrics, m, tb, None, 0)
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            m = self.rl_step() if cfg.algo == "rl" else self.sft_step()
            self.step += 1
            self.sched.step()
            if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.steps):
                m.update(self.validate())
            m.update(step=self.step, lr=self.sched.get_last_lr()[0], step_s=time.perf_counter() - t0,
                     peak_mem_gb=(torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                                  else _rss_bytes()) / 2**30)
            self.bad_steps = self.bad_steps + 1 if m.get("skipped") else 0
            history.append(m)
            if self.rank == 0:
                log_step(self.checkpoints.metrics, m, tb, bar, self.step)
            if self.bad_steps:
                self.log(f"step {self.step}: non-finite loss or gradient, update skipped")
                if self.bad_steps >= cfg.max_bad_steps:
                    raise RuntimeError(f"{self.bad_steps} non-finite steps in a row; stopping")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        if bar:
            bar.close()
        curves = evaluation.plot_curves(self.checkpoints.metrics) if self.rank == 0 else None
        self.log(summary(cfg, history, self.checkpoints.newest(), curves))
        return history



def check_rollouts(seen, step, device):
    """A step whose every rollout failed, on every rank, has nothing to learn and never will: it stops
    the run with the first error, rather than train on nothing step after step."""
    trajs = [t for _, g, _ in seen for t in g]
    errors = [t.error for t in trajs if t.error is not None]
    if all_sum({"ok": len(trajs) - len(errors)}, device)["ok"] == 0:
        raise RuntimeError(f"step {step}: every rollout failed (here: {errors[0] if errors else 'none ran'})")


def earliest_groups(mine, want, world):
    """The indices of the `want` kept groups of the earliest questions of the run, whichever rank holds
    them, and how many all ranks kept: every rank agrees on the batch, and no rank's share (its tasks,
    its lengths) is cut first."""
    every = [mine] if not dist.is_initialized() else [None] * world
    if dist.is_initialized():
        dist.all_gather_object(every, mine)
    return set(sorted(i for ids in every for i in ids)[:want]), sum(map(len, every))


def means(sums):
    """{key: total, key/n: count} -> {key: total / count} (0 for no count); a key with no count stays a total."""
    return {k: v / max(sums[k + "/n"], 1) if k + "/n" in sums else v for k, v in sums.items() if not k.endswith("/n")}


def _rss_bytes():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        Trainer(Config.from_argv(argv, __doc__)).train()
    except (ValueError, OSError) as e:  # a setting, or a file it names (data, tokenizer, out_dir)
        sys.exit(f"train.py: {e}")
    # Only after a clean run, and only once every rank is done communicating: a rank that tears its
    # process group down while a peer's is still busy can abort, and after a failure on one rank the
    # others may sit in a collective (torchrun ends them).
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
