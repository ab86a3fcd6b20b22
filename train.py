"""Train the memory agent: Multi-Conv DAPO (RL), or supervised warm-start (--algo sft).

    python train.py --config configs/tiny.json                          # one process
    torchrun --standalone --nproc_per_node=2 train.py --config configs/tiny.json
    torchrun --nnodes=4 --nproc_per_node=8 ... train.py --config configs/qwen2.5-7b-instruct.json

One RL step: questions (deterministic, split over ranks) -> n memory-agent rollouts each, with the
live policy -> final-answer rewards (+ overlong shaping) -> dynamic sampling, agreed across ranks
-> group advantages, broadcast to every conversation of a trajectory -> old log-probs -> for each
mini-batch: token-budget micro-batches, loss over the step's global token count, backward, grad
clip, AdamW. Checkpoints (torch.distributed.checkpoint) are atomic and resumable (--resume).
Data parallelism: `fsdp` (FSDP2, bf16 compute, fp32 master weights and reductions) or `ddp`
(replicas whose gradients are all-reduced once per optimizer step, after accumulation).
"""
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

import dapo
import tasks
from memory_agent import ChunkStream, MemoryAgent, document_tokens
from model import TINY_CONFIGS, Transformer, build_model
from rollout import Engine, SamplingParams
from tokenizer import load_tokenizer, train_sentencepiece


# --------------------------------------------------------------------------------------------
# config: one dataclass tree, a JSON file, --key=value overrides (dots for nesting)

@dataclass
class DataConfig:
    tasks: str = "niah_single"  # comma list of tasks.TASKS names, or jsonl:FILE / hotpotqa:FILE
    lengths: str = "1k"  # document lengths of synthetic questions (comma list, cycled)
    hotpot_docs: int = 200  # documents per HotpotQA question
    questions_per_step: int = 8  # over all ranks
    # SFT of a model trained from scratch (the embedded tiny agent):
    copy_warmup_steps: int = 0  # first steps train on repeated random text (copy_rows) instead
    sft_direct: bool = False  # also teach answering from the whole document (the --mode direct baseline)


@dataclass
class AgentConfig:
    chunk_tokens: int = 5000
    memory_tokens: int = 1024
    answer_tokens: int = 1024
    question_tokens: int = 1024
    template: str = "default"


@dataclass
class RLConfig:
    n: int = 16  # rollouts per question (the group)
    mini_batches: int = 1  # optimizer steps per rollout step
    temperature: float = 1.0
    top_p: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float = 3.0
    loss_agg: str = "token-mean"
    norm_by_std: bool = False  # the released MemAgent scripts use R - mean(R)
    reward: str = "boxed_em"  # boxed_em (the paper's) | sample (the sample's own scorer)
    overlong_buffer: int = 0  # > 0: DAPO's soft penalty on final answers near answer_tokens
    dynamic_sampling: bool = True
    max_rounds: int = 3  # generation rounds per step; then it trains on the informative groups it has
    kl_coef: float = 0.0
    kl_estimator: str = "k3"


@dataclass
class OptimConfig:
    lr: float = 1e-6
    warmup_steps: int = 20
    cooldown_steps: int = 0  # the LR falls linearly to 0 over the run's last cooldown_steps steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    micro_batch_tokens: int = 16384


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0: sized from memory
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.5  # of the card, after the training state
    cuda_graphs: bool = True


@dataclass
class Config:
    model: str = "tiny"  # a HF checkpoint directory, or a tiny config name (fresh weights)
    tokenizer: str = ""  # default: the model directory
    algo: str = "rl"  # rl | sft
    steps: int = 20
    out_dir: str = "runs/tiny"
    seed: int = 0
    parallel: str = "auto"  # auto (fsdp on CUDA with several ranks, else ddp) | ddp | fsdp
    dtype: str = "float32"  # parameter dtype without FSDP (FSDP keeps fp32 masters, computes in bf16)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = False
    export: str = ""  # write the (resumed) model to this directory in HF format and exit
    max_bad_steps: int = 3  # stop after this many non-finite steps in a row
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def _set(obj, key, value, where, section=""):
    """Set dotted `key` on the config tree, converting `value` to the field's type."""
    head, _, rest = key.partition(".")
    full = section + key
    if head not in {f.name for f in dataclasses.fields(obj)}:
        raise ValueError(f"{where}: unknown config key '{full}'")
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            return _set(current, rest, value, where, section + head + ".")
        if not isinstance(value, dict):
            raise ValueError(f"{where}: '{full}' is a section; give it a JSON object")
        for k, v in value.items():
            _set(current, k, v, where, section + head + ".")
        return
    if rest:
        raise ValueError(f"{where}: '{section + head}' has no sub-keys ('{full}')")
    kind = type(current)
    try:
        if isinstance(value, str) and kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            value = value.lower() in ("true", "1")
        elif kind is not str:
            value = kind(value) if not (kind is int and isinstance(value, str) and "e" in value) else int(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: '{full}' expects {kind.__name__}, got {value!r}") from None
    setattr(obj, head, value)


def parse_config(argv):
    """--config FILE first, then --key=value overrides; bare flags (--resume) mean true."""
    cfg = Config()
    args = list(argv)
    if "--config" in args:
        i = args.index("--config")
        path = args[i + 1] if i + 1 < len(args) else ""
        del args[i:i + 2]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config: no such file '{path}'")
        with open(path) as f:
            try:
                for k, v in json.load(f).items():
                    _set(cfg, k, v, path)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
    for a in args:
        if not a.startswith("--"):
            raise ValueError(f"argument '{a}': expected --key=value")
        key, eq, value = a[2:].partition("=")
        _set(cfg, key.replace("-", "_"), value if eq else "true", "command line")
    if cfg.algo not in ("rl", "sft"):
        raise ValueError(f"algo must be rl or sft, got '{cfg.algo}'")
    if cfg.parallel not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"parallel must be auto, ddp or fsdp, got '{cfg.parallel}'")
    if cfg.rl.loss_agg not in dapo.AGGS:
        raise ValueError(f"rl.loss_agg must be one of {dapo.AGGS}, got '{cfg.rl.loss_agg}'")
    for key, value in (("keep_checkpoints", cfg.keep_checkpoints), ("rl.max_rounds", cfg.rl.max_rounds),
                       ("rl.n", cfg.rl.n), ("rl.mini_batches", cfg.rl.mini_batches), ("checkpoint_every", cfg.checkpoint_every)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if cfg.rl.reward not in ("boxed_em", "sample"):
        raise ValueError(f"rl.reward must be boxed_em or sample, got '{cfg.rl.reward}'")
    if cfg.model not in TINY_CONFIGS and not os.path.isdir(cfg.model):
        raise FileNotFoundError(f"model: '{cfg.model}' is neither a checkpoint directory nor one of "
                                f"{sorted(TINY_CONFIGS)}")
    return cfg


# --------------------------------------------------------------------------------------------
# distributed helpers

def setup_distributed():
    """-> (rank, world, device). torchrun sets the env; a plain `python train.py` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def all_sum(values, device):
    """Sum a list of numbers over ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_max(value, device):
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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
# data: the i-th question of the run is a pure function of (config, i)

class Questions:
    def __init__(self, cfg: Config, tok):
        self.cfg, self.tok = cfg, tok
        spec = cfg.data.tasks
        self.samples = None
        if spec.startswith("jsonl:"):
            self.samples = tasks.load_jsonl(spec[6:])
        elif spec.startswith("hotpotqa:"):
            self.samples = tasks.load_hotpotqa(spec[9:], cfg.data.hotpot_docs, seed=cfg.seed)
        else:
            self.names = spec.split(",")
            unknown = [t for t in self.names if t not in tasks.TASKS]
            if unknown:
                raise ValueError(f"data.tasks: unknown tasks {unknown}; known: {sorted(tasks.TASKS)}")
            self.lengths = [tasks.parse_length(x) for x in cfg.data.lengths.split(",")]
        if self.samples is not None and not self.samples:
            raise ValueError(f"data.tasks: {spec} holds no samples")

    def get(self, i):
        if self.samples is not None:  # a fresh seeded permutation per epoch
            epoch, j = divmod(i, len(self.samples))
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.samples))
            return self.samples[order[j]]
        task = self.names[i % len(self.names)]
        length = self.lengths[i // len(self.names) % len(self.lengths)]
        return tasks.TASKS[task](length, self.tok, seed=self.cfg.seed, index=i)


def teacher_rows(sample, agent, tok, direct=False):
    """SFT rows for one synthetic sample: after each chunk the ideal memory is the relevant needle
    sentences read so far; the final turn answers from it in \\boxed{}. [] if a needle straddles chunks.
    With `direct`, one more row answers from the whole document in one prompt."""
    if not sample.meta.get("needles"):
        raise ValueError(f"sample {sample.id}: SFT needs a task with needles (task {sample.meta.get('task')})")
    C = agent.chunk_tokens
    if any(n["relevant"] and n["offset"] // C != (n["offset"] + n["tokens"] - 1) // C for n in sample.meta["needles"]):
        return []  # a needle cut by a chunk boundary: no memory could hold it whole, so no ideal trace
    problem = tok.encode(sample.question)
    stream = ChunkStream(document_tokens(sample.document, tok), C, 1)
    end, rows, memory = [tok.end_of_turn_id], [], []
    for kept in tasks.ideal_memory_trace(sample, agent.chunk_tokens):
        chunk = stream.next(0)
        target = tok.encode(" ".join(kept))
        rows.append(dapo.Row(agent.prompt(problem, memory, chunk), target + end))
        memory = target
    answer = tok.encode("\\boxed{" + ", ".join(sample.answers) + "}")
    rows.append(dapo.Row(agent.prompt(problem, memory), answer + end))
    if direct:
        rows.append(dapo.Row(agent.direct_prompt(sample, max_prompt_tokens=1 << 62), answer + end))
    return rows


def copy_rows(num, length, vocab_size, seed):
    """`num` rows of next-token prediction on random token strings (6..20 ids) repeated end to end.
    Every turn of the memory agent copies (needle into memory, memory into memory, memory into
    answer), and a transformer learns to copy (induction heads) fastest from text that repeats
    itself; trained from scratch on the agent's traces alone, the tiny models did not get there in
    the hundreds of steps we tried (README)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num):
        piece = rng.integers(4, vocab_size, size=int(rng.integers(6, 21)))  # ids 0-3 are special
        seq = np.tile(piece, length // len(piece) + 2)[:length + 1].tolist()
        rows.append(dapo.Row(seq[:1], seq[1:]))
    return rows


# --------------------------------------------------------------------------------------------
# the trainer

class Trainer:
    def __init__(self, cfg: Config, reward_fn=None):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed()
        torch.manual_seed(cfg.seed + self.rank)
        self.fsdp = cfg.parallel == "fsdp" or (cfg.parallel == "auto" and self.device.type == "cuda"
                                               and self.world > 1)
        self.tok = self._tokenizer()
        dtype = getattr(torch, cfg.dtype)
        model = build_model(cfg.model, dtype=torch.float32 if self.fsdp else dtype, device="cpu", seed=cfg.seed)
        if len(self.tok.encode("a")) and model.config.vocab_size < self.tok.vocab_size:
            raise ValueError(f"tokenizer has {self.tok.vocab_size} tokens, the model only {model.config.vocab_size}")
        model.gradient_checkpointing = cfg.gradient_checkpointing
        model.to(self.device)
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for m in fsdp_units(model):
                fully_shard(m, mp_policy=mp)
            # FSDP picks its root at the first forward; the engine calls the blocks directly, so
            # make that first forward go through the root, then drop the gathered weights again.
            with torch.no_grad():
                model(torch.zeros(1, 2, dtype=torch.long, device=self.device))
            model.reshard()
        elif self.world > 1:  # ddp: every rank starts from rank 0's weights
            for p in model.parameters():
                dist.broadcast(p.data, 0)
        self.model = model
        self.ref = None
        if cfg.rl.kl_coef and cfg.algo == "rl":  # a frozen copy of the initial policy
            ref_dtype = torch.bfloat16 if self.fsdp else dtype  # as the policy computes
            self.ref = build_model(cfg.model, dtype=ref_dtype, device=self.device, seed=cfg.seed).eval()
            self.ref.requires_grad_(False)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        rest = [p for n, p in model.named_parameters() if p.dim() < 2]
        o = cfg.optim
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.beta1, o.beta2), foreach=not self.fsdp)
        # warm-up, stable, decay: linear warm-up, constant, then (with cooldown_steps) linear to 0
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / max(1, o.warmup_steps),
                                    (cfg.steps - s) / o.cooldown_steps if o.cooldown_steps else 1.0))
        self.agent_kw = dict(chunk_tokens=cfg.agent.chunk_tokens, memory_tokens=cfg.agent.memory_tokens,
                             answer_tokens=cfg.agent.answer_tokens, question_tokens=cfg.agent.question_tokens,
                             template=cfg.agent.template)
        self.questions = Questions(cfg, self.tok)
        self.reward_fn = reward_fn or self._reward
        self.step, self.position, self.bad_steps = 0, 0, 0
        self.ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
        self.autocast = self.device.type == "cuda" and not self.fsdp and dtype == torch.float32

    def _tokenizer(self):
        cfg = self.cfg
        path = cfg.tokenizer or (cfg.model if os.path.isdir(cfg.model) else "")
        if path:
            return load_tokenizer(path)
        # A from-scratch tiny model with no tokenizer given: train one on the task text (seconds).
        path = os.path.join(cfg.out_dir, "tokenizer.model")
        if self.rank == 0 and not os.path.isfile(path):
            vocab = TINY_CONFIGS[cfg.model].vocab_size
            train_sentencepiece(tiny_corpus(), vocab, path)
        if dist.is_initialized():
            dist.barrier()
        return load_tokenizer(path)

    def _reward(self, sample, traj):
        if self.cfg.rl.reward == "sample":
            return tasks.score(sample, traj.answer)
        return tasks.boxed_em(traj.answer, sample.answers, all_of=sample.meta.get("scorer") == "string_match_all")

    def log(self, *args):
        if self.rank == 0:
            print(*args, flush=True)

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self):
        """Write step_N atomically: into a temporary directory, then one rename (rank 0)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = os.path.join(self.ckpt_dir, f"step_{self.step:06d}")
        tmp = final + ".tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self._barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "state"))
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None},
                   os.path.join(tmp, f"rng_rank{self.rank}.pt"))
        self._barrier()
        if self.rank == 0:
            with open(os.path.join(tmp, "trainer.json"), "w") as f:
                json.dump({"step": self.step, "position": self.position, "bad_steps": self.bad_steps,
                           "scheduler": self.sched.state_dict(), "world": self.world,
                           "config": dataclasses.asdict(self.cfg)}, f, indent=2)
            os.replace(tmp, final)
            done = sorted(d for d in os.listdir(self.ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp"))
            for old in done[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(os.path.join(self.ckpt_dir, old))
        self._barrier()

    def load_checkpoint(self):
        """Resume from the newest complete checkpoint; False if there is none."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not os.path.isdir(self.ckpt_dir):
            return False
        done = sorted(d for d in os.listdir(self.ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp"))
        if not done:
            return False
        path = os.path.join(self.ckpt_dir, done[-1])
        with open(os.path.join(path, "trainer.json")) as f:
            meta = json.load(f)
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(path, "state"))
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.sched.load_state_dict(meta["scheduler"])
        self.step, self.position, self.bad_steps = meta["step"], meta["position"], meta["bad_steps"]
        rng_path = os.path.join(path, f"rng_rank{self.rank}.pt")
        if meta["world"] == self.world and os.path.isfile(rng_path):
            rng = torch.load(rng_path, weights_only=False)
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
        log_path = os.path.join(self.cfg.out_dir, "metrics.jsonl")
        if self.rank == 0 and os.path.isfile(log_path):  # forget the steps after the checkpoint
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= self.step]
            with open(log_path, "w") as f:
                f.writelines(kept)
        self.log(f"resumed from {path} (step {self.step})")
        return True

    def export(self, path):
        """Write the model in HF format (gathering FSDP shards on rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            with torch.device("meta"):
                shell = Transformer(self.model.config)
            shell.save_pretrained(path, state_dict=full)
            self._copy_tokenizer(path)
        self._barrier()

    def _copy_tokenizer(self, path):
        """Copy the tokenizer files next to an exported model."""
        src = self.tok.path if os.path.isdir(self.tok.path) else os.path.dirname(self.tok.path)
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), path)

    def _barrier(self):
        if dist.is_initialized():
            dist.barrier()

    # -- rollouts ------------------------------------------------------------------------------

    def next_questions(self, k):
        """This rank's share of the next k questions of the run (k divisible by the world size)."""
        if k % self.world:
            raise ValueError(f"data.questions_per_step={k} must be divisible by the {self.world} ranks")
        idx = range(self.position + self.rank, self.position + k, self.world)
        self.position += k
        return [self.questions.get(i) for i in idx]

    def rollout(self):
        """Generate until the ranks together hold questions_per_step informative groups.
        -> (this rank's kept groups [(sample, trajectories, rewards)], stats)."""
        cfg, n = self.cfg, self.cfg.rl.n
        want = cfg.data.questions_per_step
        kept, seen, stats = [], [], dict(dropped=0, rounds=0, rollout_s=0.0, gen_tokens=0)
        with generation_mode(self.model, self.fsdp):
            e = cfg.engine
            engine = Engine(self.model, num_blocks=e.num_blocks or None, block_size=e.block_size,
                            max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
                            gpu_memory_utilization=e.gpu_memory_utilization,
                            cuda_graphs=e.cuda_graphs and not self.fsdp,  # FSDP's hooks fork streams
                            seed=cfg.seed * 7919 + self.step)
            agent = MemoryAgent(engine, self.tok, **self.agent_kw)
            for _ in range(cfg.rl.max_rounds):
                t0 = time.perf_counter()
                # the agent seeds each turn from (this, sample index on this rank, rollout, turn)
                params = SamplingParams(temperature=cfg.rl.temperature, top_p=cfg.rl.top_p,
                                        seed=hash((cfg.seed, self.position, self.rank)) & 0x7FFFFFFF)
                samples = self.next_questions(want)
                trajs = agent.run(samples, n=n, params=params)
                stats["rollout_s"] += time.perf_counter() - t0
                stats["rounds"] += 1
                for i, s in enumerate(samples):
                    group = trajs[i * n:(i + 1) * n]
                    rewards = [float(self.reward_fn(s, t)) for t in group]
                    if cfg.rl.overlong_buffer:
                        lengths = [len(t.conversations[-1].response_ids) if t.answer_text is not None else 0
                                   for t in group]
                        pen = dapo.overlong_penalty(lengths, cfg.agent.answer_tokens, cfg.rl.overlong_buffer)
                        rewards = [r + p for r, p in zip(rewards, pen.tolist())]
                    seen.append((s, group, rewards))
                    informative = min(rewards) != max(rewards)
                    if informative or not cfg.rl.dynamic_sampling:
                        kept.append((s, group, rewards))
                    else:
                        stats["dropped"] += 1
                counts = all_sum([len(kept) if r == self.rank else 0 for r in range(self.world)], self.device)
                if sum(counts) >= want or not cfg.rl.dynamic_sampling:
                    break
            stats["gen_tokens"] = sum(t.tokens_generated for _, g, _ in seen for t in g)
            stats["prefill_tokens"] = engine.stats["prefill_tokens"]
            stats["prefix_cache_tokens"] = engine.blocks.cache_hits
            del engine, agent
        # keep the first `want` groups in rank order, so every rank agrees on the batch
        offset = int(sum(counts[:self.rank]))
        kept = kept[:max(0, want - offset)]
        stats["kept"] = int(min(sum(counts), want))
        stats["dropped"] = int(all_sum([stats["dropped"]], self.device)[0])
        stats["seen"] = seen
        return kept, stats

    # -- one optimizer update --------------------------------------------------------------------

    def _forward(self, mb, model, **kw):
        with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            return model(mb.input_ids, mb.position_ids, target_ids=mb.target_ids, **kw)

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
        behaviour log-probs; returns the mean |behaviour - recomputed| (how far they drift)."""
        diff, count = 0.0, 0
        for mb in mbs:
            lp = self._forward(mb or self._empty(), self.model, temperature=self.cfg.rl.temperature).float()
            if mb is None:
                continue
            diff += float((lp - mb.old_logprobs)[mb.mask].abs().sum())
            count += mb.num_tokens
            mb.old_logprobs = torch.where(mb.mask, lp, 0.0)
        return diff, count

    def update(self, mbs):
        """One optimizer step over micro-batches (RL: with advantages and old log-probs; SFT: plain
        next-token loss on the responses). -> metrics, or None if no rank has a token to learn."""
        cfg, sft = self.cfg, self.cfg.algo == "sft"
        n_tok, n_seq = all_sum([sum(mb.num_tokens for mb in mbs if mb), sum(mb.num_seqs for mb in mbs if mb)],
                               self.device)
        if n_tok == 0:
            return None
        self.model.train()
        sums = {}  # token-weighted metric sums over this rank's micro-batches, / global tokens

        def add(key, value):
            sums[key] = sums.get(key, 0.0) + value

        for i, mb in enumerate(mbs):
            if self.fsdp:  # reduce-scatter gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(mbs) - 1)
            empty = mb is None or mb.num_tokens == 0
            mb = mb or self._empty()
            logp, ent = self._forward(mb, self.model, temperature=1.0 if sft else cfg.rl.temperature,
                                      return_entropy=True)
            if empty:
                loss, m = logp.sum() * 0.0, {}
            elif sft:
                loss = dapo.aggregate(-logp, mb.mask, num_tokens=n_tok, dp_size=self.world)
                m = {"entropy": float(ent[mb.mask].mean())}
            else:
                if cfg.rl.mini_batches == 1:  # the current weights are pi_old: ratio 1, gradient exact
                    add("rollout_logp_diff", float((logp.detach() - mb.old_logprobs)[mb.mask].abs().sum()) / n_tok)
                    old = logp.detach()
                else:
                    old = mb.old_logprobs
                ref = None
                if self.ref is not None:
                    with torch.no_grad():
                        ref = self._forward(mb, self.ref, temperature=cfg.rl.temperature)
                loss, m = dapo.policy_loss(
                    logp, old, mb.advantages, mb.mask, clip_low=cfg.rl.clip_low, clip_high=cfg.rl.clip_high,
                    clip_c=cfg.rl.clip_c, agg=cfg.rl.loss_agg, num_tokens=n_tok, num_seqs=n_seq,
                    dp_size=self.world, segment_ids=mb.segment_ids, ref_logprobs=ref, kl_coef=cfg.rl.kl_coef,
                    kl_estimator=cfg.rl.kl_estimator, entropy=ent)
            loss.backward()
            add("loss", float(loss.detach()) / self.world)  # the ranks' shares average to the step loss
            for k, v in m.items():
                add(k, v * mb.num_tokens / n_tok)
        sync_gradients(self.model, self.world, self.fsdp)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        keys = sorted(sums)
        if dist.is_initialized():  # a rank without rows (the others filled the batch) has "loss" alone
            every = [None] * self.world
            dist.all_gather_object(every, keys)
            keys = sorted(set().union(*every))
        metrics = dict(zip(keys, all_sum([sums.get(k, 0.0) for k in keys], self.device)))
        metrics["grad_norm"] = grad_norm
        if not (math.isfinite(grad_norm) and math.isfinite(metrics["loss"])):
            self.opt.zero_grad(set_to_none=True)
            metrics["skipped"] = 1
            return metrics
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return metrics

    # -- steps ---------------------------------------------------------------------------------

    def rl_step(self):
        cfg = self.cfg
        self.model.eval()
        kept, st = self.rollout()
        seen = st.pop("seen")
        t0 = time.perf_counter()
        trajs = [t for _, g, _ in kept for t in g]
        rewards = [r for _, _, rs in kept for r in rs]
        groups = [i for i, (_, g, _) in enumerate(kept) for _ in g]
        adv = dapo.group_advantages(rewards, groups, norm_by_std=cfg.rl.norm_by_std)
        rows = dapo.rows_from_trajectories(trajs, adv.tolist())
        order = np.random.default_rng([cfg.seed, self.step]).permutation(len(rows))
        parts = np.array_split(order, cfg.rl.mini_batches)
        mini = [self.micro_batches([rows[i] for i in part]) for part in parts]
        drift = [0.0, 0]
        if cfg.rl.mini_batches > 1:
            for mbs in mini:
                d, c = self.recompute_old_logprobs(mbs)
                drift = [drift[0] + d, drift[1] + c]
        logprob_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        updates = [u for u in (self.update(mbs) for mbs in mini) if u]
        update_s = time.perf_counter() - t0
        m = {k: float(np.mean([u[k] for u in updates if k in u])) for u in updates for k in u}
        if cfg.rl.mini_batches > 1:
            d, c = all_sum(drift, self.device)
            m["rollout_logp_diff"] = d / max(c, 1)
        # everything the rollout saw, not only the kept groups: the policy's honest accuracy
        all_trajs = [t for _, g, _ in seen for t in g]
        score = [tasks.score(s, t.answer) for s, g, _ in seen for t in g]
        mem_lens = [len(c.response_ids) for t in all_trajs for c in t.conversations if not c.is_final]
        ans_lens = [len(c.response_ids) for t in all_trajs for c in t.conversations if c.is_final]
        sums = all_sum([sum(r for _, _, rs in seen for r in rs), len(all_trajs), sum(score), sum(mem_lens),
                        len(mem_lens), sum(ans_lens), len(ans_lens), sum(t.turns for t in all_trajs),
                        st["gen_tokens"], st["prefix_cache_tokens"], sum(len(r) for r in rows),
                        sum(t.error is not None for t in all_trajs), st["prefill_tokens"]], self.device)
        adv_sums = all_sum([float(adv.sum()), float((adv ** 2).sum()), len(adv)], self.device)
        n = max(sums[1], 1)
        m.update(reward=sums[0] / n, accuracy=sums[2] / n, memory_len=sums[3] / max(sums[4], 1),
                 answer_len=sums[5] / max(sums[6], 1), turns=sums[7] / n, kept_groups=st["kept"],
                 dropped_groups=st["dropped"], rounds=st["rounds"], rollout_s=st["rollout_s"],
                 logprob_s=logprob_s, update_s=update_s, gen_tokens_per_s=sums[8] / max(st["rollout_s"], 1e-9),
                 prefix_cache_tokens=sums[9], train_tokens=sums[10], errors=sums[11], gen_tokens=sums[8],
                 prefill_tokens=sums[12],
                 adv_mean=adv_sums[0] / max(adv_sums[2], 1),
                 adv_std=math.sqrt(max(adv_sums[1] / max(adv_sums[2], 1) - (adv_sums[0] / max(adv_sums[2], 1)) ** 2, 0)),
                 train_tokens_per_s=sums[10] / max(update_s + logprob_s, 1e-9))
        return m

    def sft_step(self):
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.step < cfg.data.copy_warmup_steps:  # one micro-batch of 128-token rows per rank
            num = max(1, cfg.optim.micro_batch_tokens // 129)
            rows = copy_rows(num, 128, self.tok.vocab_size, seed=[cfg.seed, self.step, self.rank])
        else:
            agent = MemoryAgent(None, self.tok, **self.agent_kw)
            rows = [r for s in self.next_questions(cfg.data.questions_per_step)
                    for r in teacher_rows(s, agent, self.tok, cfg.data.sft_direct)]
        m = self.update(self.micro_batches(rows)) or {}
        tokens = all_sum([sum(len(r) for r in rows)], self.device)[0]
        m.update(update_s=time.perf_counter() - t0, train_tokens=tokens,
                 train_tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9))
        return m

    def train(self):
        cfg = self.cfg
        os.makedirs(cfg.out_dir, exist_ok=True)
        # torch.distributed.checkpoint notes that it saves in one process when there is one; the LR
        # schedule counts RL steps, including those whose groups were all dropped (no optimizer step)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        if cfg.resume:
            self.load_checkpoint()
        if cfg.export:
            self.export(cfg.export)
            self.log(f"exported to {cfg.export}")
            return []
        self.log(json.dumps(dataclasses.asdict(cfg), indent=2))
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model {cfg.model}: {n_params / 1e6:.2f}M parameters, world {self.world}, "
                 f"{'fsdp' if self.fsdp else 'ddp'}, device {self.device}")
        log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        tb = _tensorboard(cfg.out_dir) if self.rank == 0 else None
        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.algo, unit="step")
        history = []
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            m = self.rl_step() if cfg.algo == "rl" else self.sft_step()
            self.step += 1
            self.sched.step()
            m.update(step=self.step, lr=self.sched.get_last_lr()[0], step_s=time.perf_counter() - t0,
                     peak_mem_gb=(torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                                  else _rss_bytes()) / 2**30)
            self.bad_steps = self.bad_steps + 1 if m.get("skipped") else 0
            history.append(m)
            if self.rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                if tb:
                    for k, v in m.items():
                        tb.add_scalar(k, v, self.step)
                if bar:
                    bar.update(1)
                    keys = ("reward", "accuracy", "loss", "gen_tokens_per_s") if cfg.algo == "rl" else ("loss",)
                    bar.set_postfix({k: f"{m[k]:.3g}" for k in keys if k in m})
            if self.bad_steps:
                self.log(f"step {self.step}: non-finite loss or gradient, update skipped")
                if self.bad_steps >= cfg.max_bad_steps:
                    raise RuntimeError(f"{self.bad_steps} non-finite steps in a row; stopping")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        if bar:
            bar.close()
        return history


def tiny_corpus(num=400):
    """Text for the tiny tokenizer: the synthetic tasks' documents and questions, the templates."""
    from memory_agent import TEMPLATES

    class Words:  # counts by whitespace, enough to size documents for tokenizer training
        def encode(self, text):
            return text.split()

    out = [t for tmpl in TEMPLATES.values() for t in tmpl.values()]
    for i in range(num):
        name = sorted(tasks.TASKS)[i % len(tasks.TASKS)]
        s = tasks.TASKS[name](600, Words(), seed=12345, index=i)
        out += [s.question, "".join(tasks.document_pieces(s)), "\\boxed{" + ", ".join(s.answers) + "}"]
    return out


def _rss_bytes():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tensorboard(out_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tb"))


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    try:
        Trainer(cfg).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
