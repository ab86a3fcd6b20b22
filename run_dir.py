"""A training run's directory and the ranks that share it: collectives, the out_dir lock, checkpoints.

    out_dir/.lock                     held by every rank of the live run (stray workers of a killed one too)
    out_dir/metrics.jsonl             one line per step (cut back to the checkpoint on resume)
    out_dir/checkpoints/step_N/       state/ (torch.distributed.checkpoint), rng_rankR.pt, trainer.json
                                      written to step_N.tmp and renamed: a directory named step_N is whole

Resume restores the newest checkpoint every rank can read, after train.py has compared its saved
settings with the run's; an export writes the model in HF format with its tokenizer and agent.json.
"""
import errno
import fcntl
import json
import os
import re
import shutil
import sys
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

import eval as evaluation
from model import Transformer
from run_outputs import write_file
from settings import SettingError, read_json


# --------------------------------------------------------------------------------------------
# collectives (each a no-op in a single process)

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


def all_sum(values: dict, device) -> dict:
    """Sum each metric over ranks, by key (one collective). A key some rank lacks counts 0 there."""
    keys = sorted(values)
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, keys)
        keys = sorted(set().union(*every))
    t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_max(value, device):
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier():
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# checkpoints: out_dir/checkpoints/step_N/{state (torch.distributed.checkpoint), rng_rankR.pt,
# trainer.json}, written to step_N.tmp and renamed, so a directory named step_N is complete

class Checkpointer:
    def __init__(self, cfg, rank, world, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.dir = os.path.join(cfg.out_dir, "checkpoints")
        self.metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.lock = None

    def claim_out_dir(self):
        """Check out_dir before any work: writable, not in use by a live run, and not an old run
        unless resuming. Every rank holds a shared lock on it while it lives; a new run's rank 0
        needs it exclusively for a moment, so stray workers of a killed run make it fail here."""
        cfg = self.cfg
        if self.rank == 0:
            try:
                os.makedirs(cfg.out_dir, exist_ok=True)
                self.lock = open(os.path.join(cfg.out_dir, ".lock"), "a")
            except OSError as e:
                raise OSError(f"out_dir '{cfg.out_dir}' is not writable ({e.strerror})") from None
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(f"out_dir '{cfg.out_dir}' is in use by another run (its processes still "
                                   "hold out_dir/.lock); stop them or choose another out_dir") from None
            if not (cfg.resume or cfg.export) and (os.path.exists(self.metrics) or self.newest()):
                raise SettingError(f"out_dir '{cfg.out_dir}' holds an earlier run; pass --resume to continue "
                                   "it, or choose a new out_dir")
            if cfg.export and not self.newest():
                raise FileNotFoundError(f"--export: no checkpoint in '{self.dir}' to export (is out_dir right?)")
            fcntl.flock(self.lock, fcntl.LOCK_SH)
        barrier()
        if self.rank != 0:
            self.lock = open(os.path.join(cfg.out_dir, ".lock"), "a")
            fcntl.flock(self.lock, fcntl.LOCK_SH)

    def release_out_dir(self):
        if self.lock is not None:
            self.lock.close()  # closing the file drops the lock
            self.lock = None

    def newest(self, damaged=False):
        """Complete checkpoint directories, oldest first (with damaged: the renamed damaged ones too)."""
        if not os.path.isdir(self.dir):
            return []
        names = [d for d in os.listdir(self.dir) if re.fullmatch(r"step_\d+" + "(\\.damaged)?" * damaged, d)]
        return sorted(names, key=lambda d: int(re.findall(r"\d+", d)[0]))  # step_1000000 after step_999999

    def save(self, model, opt, sched, state):
        """Write step_N atomically: into a temporary directory, then one rename (rank 0)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = os.path.join(self.dir, f"step_{state['step']:06d}")
        tmp = final + ".tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        try:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "state"))
            torch.save({"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                       os.path.join(tmp, f"rng_rank{self.rank}.pt"))
            barrier()
            if self.rank == 0:
                write_file(os.path.join(tmp, "trainer.json"), json.dumps(dict(
                    state, scheduler=sched.state_dict(), world=self.world, config=asdict(self.cfg)), indent=2))
        except (OSError, CheckpointException) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(self._write_error(final, e)) from None
        if self.rank == 0:
            os.replace(tmp, final)
            for old in self.newest()[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(os.path.join(self.dir, old))
        barrier()
        return final

    def _write_error(self, path, error):
        """What a failed save says: a full disk as a full disk, and that nothing before it was lost."""
        chain, e = [], error
        while e is not None:
            chain.append(e)
            e = e.__cause__ or e.__context__ or next(iter(getattr(e, "failures", {}).values()), None)
            e = e[0] if isinstance(e, tuple) else e  # DCP keeps (exception, traceback) per rank
            if len(chain) > 20 or e in chain:
                break
        full = any(getattr(x, "errno", None) == errno.ENOSPC or "No space left" in str(x) for x in chain)
        kept = f"the checkpoints before it are intact ({', '.join(self.newest()) or 'none yet'})"
        if full:
            free = shutil.disk_usage(self.dir).free
            return f"checkpoint {path}: the disk is full ({free / 2**20:.0f} MiB free in {self.dir}); {kept}"
        return f"checkpoint {path}: cannot write ({type(error).__name__}: {str(error)[:300]}); {kept}"

    def newest_meta(self):
        """The newest readable checkpoint's trainer.json (its step, the settings it was made with) and its
        path; (None, None) if there is none."""
        for name in reversed(self.newest()):
            path = os.path.join(self.dir, name)
            try:
                meta = read_json(os.path.join(path, "trainer.json"))
                return dict(config=meta["config"], step=meta["step"]), path
            except (ValueError, KeyError):
                continue  # unreadable: load() names it damaged and tries an older one
        return None, None

    def load(self, model, opt, sched):
        """Restore the newest checkpoint every rank can read -> its state (step, position,
        bad_steps, agent), or None if there is none. A damaged one is named, renamed step_N.damaged
        (so that pruning never counts it), and the one before it is tried; the ranks decide
        together, so none trains on a checkpoint another could not load."""
        for name in reversed(self.newest()):
            path = os.path.join(self.dir, name)
            try:
                meta, rng = self._read(path)  # this rank's files: trainer.json, its RNG state
                ok, error = True, None
            except (Exception, CheckpointException) as e:
                ok, error = False, e
            if self._all_ok(ok):
                try:
                    self._restore(path, model, opt, sched, meta, rng)  # collective: fails on every rank
                except (Exception, CheckpointException) as e:
                    ok, error = False, e
            if self._all_ok(ok):
                if self.rank == 0:
                    self.truncate_metrics(meta["step"])
                    print(f"resumed from {path} (step {meta['step']})", flush=True)
                return {k: meta[k] for k in ("step", "position", "bad_steps")}
            if self.rank == 0:
                print(f"checkpoint {path} is damaged ({type(error).__name__ if error else 'on another rank'}: "
                      f"{str(error)[:200]}); renamed {name}.damaged, trying an older one", flush=True)
                shutil.rmtree(path + ".damaged", ignore_errors=True)
                os.replace(path, path + ".damaged")
            barrier()
        return None

    def _all_ok(self, ok):
        return all_sum({"failed": 0 if ok else 1}, self.device)["failed"] == 0

    def _read(self, path):
        meta = read_json(os.path.join(path, "trainer.json"))
        rng_path = os.path.join(path, f"rng_rank{self.rank}.pt")
        rng = torch.load(rng_path, weights_only=True) if meta["world"] == self.world else None
        return meta, rng

    def _restore(self, path, model, opt, sched, meta, rng):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(path, "state"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        sched.load_state_dict(meta["scheduler"])
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])

    def truncate_metrics(self, step):
        """Forget logged steps after `step`, and a line torn by a kill mid-write."""
        if not os.path.isfile(self.metrics):
            return
        kept = []
        with open(self.metrics) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # torn or foreign line
        write_file(self.metrics, "".join(kept))

    def export(self, model, tok, agent, path):
        """Write the model in HF format (gathering FSDP shards on rank 0), its tokenizer and agent.json."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            with torch.device("meta"):
                shell = Transformer(model.config)
            shell.save_pretrained(path, state_dict=full)
            src = tok.path if os.path.isdir(tok.path) else os.path.dirname(tok.path)
            for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copy(os.path.join(src, name), path)
            agent.save(path)
        barrier()


# --------------------------------------------------------------------------------------------
# the run's record: metrics.jsonl, tensorboard, the curves, the closing summary

def log_step(path, m, tb, bar, step):
    with open(path, "a") as f:
        f.write(json.dumps(m) + "\n")
    if "val_accuracy" in m:
        evaluation.plot_curves(path)
    if tb:
        for k, v in m.items():
            tb.add_scalar(k, v, step)
    if bar:
        bar.update(1)
        bar.set_postfix({k: f"{m[k]:.3g}" for k in ("reward", "accuracy", "val_accuracy", "loss") if k in m})


def summary(cfg, history, checkpoints, curves=None):
    """What the run did and what to do next: the last lines a run prints."""
    lines = [f"done: {len(history)} {cfg.algo} steps in this run, now at step {cfg.steps}"]
    for key in ("reward", "accuracy", "loss"):
        values = [m[key] for m in history if key in m]
        if values:
            k = min(10, len(values) // 2 or 1)
            lines.append(f"  {key}: {np.mean(values[:k]):.3f} over the first {k} steps of this run, "
                         f"{np.mean(values[-k:]):.3f} over the last {k}")
    val = [(m["step"], m["val_accuracy"]) for m in history if "val_accuracy" in m]
    if val:
        lines.append("  held-out accuracy: " + ", ".join(f"{a:.3f} at step {s}" for s, a in val[-4:]))
    if curves:
        lines.append(f"training curves: {curves}")
    if checkpoints:
        args = " ".join(a for a in sys.argv[1:] if a != "--resume" and not a.startswith("--export"))
        lines += [f"newest checkpoint: {os.path.join(cfg.out_dir, 'checkpoints', checkpoints[-1])}",
                  "export it (HF format, with its tokenizer and agent.json), then evaluate it:",
                  f"  python train.py {args} --resume --export=EXPORT_DIR",
                  "  python eval.py --model EXPORT_DIR --tasks TASKS --lengths LENGTHS"]
    return "\n".join(lines)


def tensorboard(out_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tb"))
