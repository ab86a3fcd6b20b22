"""train.py: config parsing, SFT and RL steps, exact resume, a learning signal, 2-process runs."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import train
import warm_start
from train import Config, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model=micro", "--data.tasks=niah_single", "--data.lengths=300", "--data.questions_per_step=2",
        "--agent.chunk_tokens=128", "--agent.memory_tokens=16", "--agent.answer_tokens=8",
        "--agent.question_tokens=32", "--rl.n=2", "--rl.reward=sample", "--optim.lr=1e-3",
        "--optim.warmup_steps=1", "--engine.num_blocks=512", "--progress=false"]


def config(tmp_path, tokenizer_path, *extra):
    return Config.from_argv(TINY + [f"--tokenizer={tokenizer_path}", f"--out_dir={tmp_path}", *extra])


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 7, "rl": {"n": 3}, "optim": {"lr": 2e-5}}))
    cfg = Config.from_argv(["--config", str(path), "--rl.n=5", "--resume", "--optim.warmup_steps=1e1"])
    assert (cfg.steps, cfg.rl.n, cfg.optim.lr, cfg.resume, cfg.optim.warmup_steps) == (7, 5, 2e-5, True, 10)
    with pytest.raises(ValueError, match="unknown key 'rl.nn'; did you mean 'rl.n'"):
        Config.from_argv(["--rl.nn=3"])
    with pytest.raises(ValueError, match="'steps' expects int"):
        Config.from_argv(["--steps=many"])
    with pytest.raises(ValueError, match="nope.json: no such file"):
        Config.from_argv(["--config", "nope.json"])
    with pytest.raises(ValueError, match="no/such/dir"):
        Config.from_argv(["--model=no/such/dir"])
    (tmp_path / "bad.json").write_text(json.dumps({"agent": {"chunk": 1}}))
    with pytest.raises(ValueError, match="bad.json and the command line: unknown key 'agent.chunk'"):
        Config.from_argv(["--config", str(tmp_path / "bad.json")])


def test_sft_rows_follow_the_ideal_memory(tmp_path, tokenizer_path):
    from memory_agent import MemoryAgent
    from tasks import make_samples
    t = Trainer(config(tmp_path, tokenizer_path, "--algo=sft"))
    sample = make_samples("niah_single", 300, t.tok, num=1)[0]
    rows = warm_start.teacher_rows(sample, MemoryAgent(None, t.tok, t.cfg.agent), t.tok)
    assert len(rows) == -(-sample.meta["doc_tokens"] // 128) + 1
    needle = sample.meta["needles"][0]["text"]
    assert t.tok.decode(rows[-2].response_ids).strip() == needle  # the memory holds the needle
    assert t.tok.decode(rows[-1].response_ids) == "\\boxed{" + sample.answers[0] + "}"
    assert all(r.response_ids[-1] == t.tok.end_of_turn_id for r in rows)
    with_direct = warm_start.teacher_rows(sample, MemoryAgent(None, t.tok, t.cfg.agent), t.tok, direct=True)
    assert with_direct[:-1] == rows and with_direct[-1].response_ids == rows[-1].response_ids
    assert len(with_direct[-1].prompt_ids) > sample.meta["doc_tokens"]  # the whole document, one prompt


def test_copy_rows_repeat_a_random_piece():
    rows = warm_start.copy_rows(4, 64, vocab_size=512, seed=[0, 1])
    assert [len(r.prompt_ids) + len(r.response_ids) for r in rows] == [65] * 4
    for r in rows:
        seq = r.prompt_ids + r.response_ids
        period = next(k for k in range(6, 21) if seq[k:] == seq[:-k])
        assert min(seq) >= 4 and max(seq) < 512 and len(set(seq[:period])) > 1
    assert rows == warm_start.copy_rows(4, 64, vocab_size=512, seed=[0, 1])  # a function of the seed


def test_sft_copy_warmup_then_traces(tmp_path, tokenizer_path):
    t = Trainer(config(tmp_path, tokenizer_path, "--algo=sft", "--data.copy_warmup_steps=1",
                       "--optim.micro_batch_tokens=1024"))
    first = t.sft_step()  # step 0: copy rows filling one micro-batch, no question drawn
    assert 1024 // 2 < first["train_tokens"] <= 1024 and t.position == 0 and first["loss"] > 0
    t.step = 1
    second = t.sft_step()  # then the ideal memory traces of the run's questions
    assert t.position == 2 and second["train_tokens"] > 300


def test_lr_warms_up_holds_then_cools_down(tmp_path, tokenizer_path):
    t = Trainer(config(tmp_path, tokenizer_path, "--steps=10", "--optim.warmup_steps=2", "--optim.cooldown_steps=4"))
    lrs = []
    for _ in range(10):
        lrs.append(t.opt.param_groups[0]["lr"])
        t.opt.step()
        t.sched.step()
    assert lrs == pytest.approx([1e-3 * f for f in (0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25)])
    for zero_first in ("true", "false"):  # no warm-up means the full rate from the first step, either way
        t = Trainer(config(tmp_path / zero_first, tokenizer_path, "--optim.warmup_steps=0",
                           f"--optim.warmup_from_zero={zero_first}"))
        assert t.opt.param_groups[0]["lr"] == 1e-3
        t.checkpoints.release_out_dir()


def test_release_optimizer_settings(tmp_path, tokenizer_path):
    """The release's schedule starts its warm-up at 0 (lr = step / warmup_steps) and decays every parameter."""
    t = Trainer(config(tmp_path, tokenizer_path, "--optim.warmup_steps=4", "--optim.warmup_from_zero=true",
                       "--optim.decay_all=true", "--optim.weight_decay=0.1"))
    lrs = []
    for _ in range(6):
        lrs.append(t.opt.param_groups[0]["lr"])
        t.opt.step()
        t.sched.step()
    assert lrs == pytest.approx([1e-3 * f for f in (0, 0.25, 0.5, 0.75, 1, 1)])
    decayed = {id(p) for g in t.opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(p) for p in t.model.parameters()}  # norms and biases too
    default = Trainer(config(tmp_path / "d", tokenizer_path, "--optim.weight_decay=0.1"))
    norms = {id(p) for p in default.model.parameters() if p.dim() < 2}
    assert norms and not norms & {id(p) for g in default.opt.param_groups if g["weight_decay"] for p in g["params"]}


def test_mini_batch_order_contiguous_in_turn_order_or_shuffled():
    from memory_agent import Conversation, Trajectory

    def traj(updates):
        convs = [Conversation([], [], [], k, False, "stop") for k in range(updates)]
        return Trajectory("s", 0, convs + [Conversation([], [], [], updates, True, "stop")])
    trajs = [traj(2), traj(3), traj(1)]  # rows 0-2, 3-6, 7-8 (the last of each is its final answer)
    assert train.mini_batch_order(trajs, False, 0).tolist() == [0, 3, 7, 1, 4, 5, 2, 6, 8]
    shuffled = train.mini_batch_order(trajs, True, [0, 1])
    assert sorted(shuffled.tolist()) == list(range(9)) and shuffled.tolist() != list(range(9))
    assert shuffled.tolist() == train.mini_batch_order(trajs, True, [0, 1]).tolist()


def test_release_training_questions_first_n_cycled_and_centre_truncated(tmp_path, tokenizer_path):
    lines = [json.dumps(dict(id=f"q{i}", question=f"Q{i}?", context=" ".join(f"w{i}x{k}" for k in range(60)),
                             answers=["a"])) for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    t = Trainer(config(tmp_path / "run", tokenizer_path, f"--data.tasks=jsonl:{tmp_path / 'd.jsonl'}",
                       "--data.max_questions=3", "--data.shuffle=false", "--data.max_chunks=2",
                       "--agent.chunk_tokens=16"))
    assert [t.questions.get(i).id for i in range(7)] == ["q0", "q1", "q2", "q0", "q1", "q2", "q0"]
    whole = t.tok.encode(" ".join(f"w0x{k}" for k in range(60)))
    assert len(whole) > 32
    assert t.questions.get(0).document == whole[:16] + whole[-16:]  # its first and last 16 of 2 x 16 tokens
    short = train.centre_truncated(t.questions.samples[1], t.tok, 10 ** 6)
    assert short.document == t.tok.encode(" ".join(f"w1x{k}" for k in range(60)))  # shorter: whole


def low_ids(sample, traj):
    """A toy reward a random policy can climb: the share of low token ids in everything the
    trajectory wrote (its memories and its answer)."""
    ids = [i for c in traj.conversations for i in c.response_ids]
    return sum(i < 128 for i in ids) / max(len(ids), 1)


def test_resume_is_exact(tmp_path, tokenizer_path):
    args = ["--checkpoint_every=2", "--rl.mini_batches=2"]
    straight = Trainer(config(tmp_path / "a", tokenizer_path, "--steps=4", *args), reward_fn=low_ids)
    h_straight = straight.train()
    first = Trainer(config(tmp_path / "b", tokenizer_path, "--steps=2", *args), reward_fn=low_ids)
    h_first = first.train()
    second = Trainer(config(tmp_path / "b", tokenizer_path, "--steps=4", "--resume", *args), reward_fn=low_ids)
    h_second = second.train()
    assert h_straight[-1]["grad_norm"] > 0  # the weights really moved
    for a, b in zip(straight.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    same = lambda m: {k: v for k, v in m.items() if not (k.endswith("_s") or k.startswith("peak_mem"))}
    assert [same(m) for m in h_straight] == [same(m) for m in h_first + h_second]  # timings aside
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step_000002", "step_000004"]

    # a run killed while writing step 6 leaves step_000006.tmp behind: resume skips it
    (tmp_path / "b" / "checkpoints" / "step_000006.tmp").mkdir()
    third = Trainer(config(tmp_path / "b", tokenizer_path, "--steps=4", "--resume", *args), reward_fn=low_ids)
    assert third.load_checkpoint() and third.step == 4


def test_reward_rises_on_a_reachable_toy_reward(tmp_path, tokenizer_path):
    # A random policy writes about 1/4 low ids; Multi-Conv DAPO must raise the share in every
    # conversation, the memory updates included. Two-token replies keep the signal strong.
    cfg = config(tmp_path, tokenizer_path, "--steps=10", "--rl.n=16", "--optim.lr=1e-2", "--rl.norm_by_std=true",
                 "--agent.memory_tokens=2", "--agent.answer_tokens=2", "--checkpoint_every=100")
    trainer = Trainer(cfg, reward_fn=low_ids)
    rewards = [m["reward"] for m in trainer.train()]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.15, rewards

    from memory_agent import MemoryAgent
    from rollout import Engine, SamplingParams
    from tasks import make_samples
    agent = MemoryAgent(Engine(trainer.model, num_blocks=512), trainer.tok, trainer.cfg.agent)
    trajs = agent.run(make_samples("niah_single", 300, trainer.tok, num=2, seed=9), n=8,
                      params=SamplingParams(seed=0))
    memory_ids = [i for t in trajs for c in t.conversations if not c.is_final for i in c.response_ids]
    assert sum(i < 128 for i in memory_ids) / len(memory_ids) > 0.4


def test_non_finite_steps_are_skipped_then_stop(tmp_path, tokenizer_path):
    cfg = config(tmp_path, tokenizer_path, "--algo=sft", "--steps=5", "--max_bad_steps=2")
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.norm.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="2 non-finite steps in a row"):
        trainer.train()
    assert trainer.step == 2 and not os.path.exists(tmp_path / "checkpoints")


def torchrun(tmp_path, tokenizer_path, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, f"--tokenizer={tokenizer_path}", f"--out_dir={tmp_path}", "--steps=2", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(lines) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    assert os.path.isdir(tmp_path / "checkpoints" / "step_000002")
    return lines


RANK_ZERO_REWARD = """
import sys
import torch.distributed as dist
from train import Config, Trainer

def reward(sample, traj):  # rank 1's groups are never informative, so rank 0 alone fills each step
    return float(dist.get_rank() == 0 and traj.conversations[-1].response_ids[0] % 2 == 0)

Trainer(Config.from_argv(sys.argv[1:]), reward_fn=reward).train()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_rl_when_one_rank_has_no_rows(tmp_path, tokenizer_path):
    # rank 1 trains on nothing, yet must join every collective and report the same metric keys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           sys.executable, "-c", RANK_ZERO_REWARD, *TINY, f"--tokenizer={tokenizer_path}",
           f"--out_dir={tmp_path}", "--steps=2", "--rl.n=8", "--data.questions_per_step=2", "--parallel=ddp"]
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(lines) == 2 and all(m["kept_groups"] == 2 and m["dropped_groups"] >= 1 for m in lines)


@pytest.mark.slow
def test_two_processes_rl_fsdp_and_export(tmp_path, tokenizer_path):
    # FSDP2 on gloo: the engine generates with the gathered weights, the update runs sharded
    lines = torchrun(tmp_path, tokenizer_path, "--parallel=fsdp", "--rl.dynamic_sampling=false")
    assert all(m["kept_groups"] == 2 for m in lines)
    from model import Transformer
    from tokenizer import load_tokenizer
    out = tmp_path / "export"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, f"--tokenizer={tokenizer_path}", f"--out_dir={tmp_path}", "--parallel=fsdp", "--resume",
           f"--export={out}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    model = Transformer.from_pretrained(out, dtype=torch.float32)
    assert model.config.vocab_size == 512 and load_tokenizer(out).vocab_size == 512


@pytest.mark.parametrize("name", ["tiny", "tiny-sft", "release-7b", "release-14b", "release-dapo-7b", "dapo-recipe-7b"])
def test_shipped_configs_parse(name):
    Config.from_argv(["--config", os.path.join(ROOT, "configs", f"{name}.json"), "--model=micro"])


@pytest.mark.parametrize("name", ["release-7b", "release-14b"])
def test_release_configs_make_the_releases_choices(name):
    cfg = Config.from_argv(["--config", os.path.join(ROOT, "configs", f"{name}.json"), "--model=micro"])
    d, rl, o = cfg.data, cfg.rl, cfg.optim
    assert (d.max_questions, d.shuffle, d.max_chunks, d.hotpot_docs) == (8192, False, 8, 200)
    assert (rl.reward, rl.shuffle_mini_batches, o.warmup_from_zero, o.decay_all) == ("boxed_em", False, True, True)
    assert cfg.agent.keep_empty_memory and cfg.eval.samples == 128  # validated on the first 128 kept
    default = Config.from_argv(["--model=micro"])  # the embedded agent's settings stay as they were
    assert (default.data.max_questions, default.data.max_chunks, default.rl.shuffle_mini_batches,
            default.optim.warmup_from_zero, default.optim.decay_all, default.agent.keep_empty_memory) == (
        0, 0, True, False, False, False)


def test_dapo_recipe_config_is_verls_dapo_recipe():
    """verl's DAPO recipe (recipe/dapo), value by value, on the release's MemAgent data and agent."""
    cfg = Config.from_argv(["--config", os.path.join(ROOT, "configs", "dapo-recipe-7b.json"), "--model=micro"])
    rl, o = cfg.rl, cfg.optim
    assert (rl.clip_low, rl.clip_high, rl.clip_c, rl.loss_agg, rl.norm_by_std, rl.kl_coef) == (
        0.2, 0.28, 10.0, "token-mean", True, 0.0)
    assert (rl.dynamic_sampling, rl.filter_by, rl.max_rounds, rl.out_of_rounds) == (True, "accuracy", 10, "error")
    assert rl.overlong_buffer == 1024 * 4096 // 20480  # the recipe's 4K of 20K, of this agent's 1K answer
    assert (o.lr, o.warmup_steps, o.weight_decay, o.grad_clip, o.warmup_from_zero, o.decay_all) == (
        1e-6, 10, 0.1, 1.0, True, True)
    assert (rl.n, rl.mini_batches, rl.temperature, rl.top_p, cfg.eval.n, cfg.eval.top_p) == (16, 16, 1.0, 1.0, 1, 0.7)


# ---- bad input and faults: every row an error naming what is wrong, before any work ----------

@pytest.mark.parametrize("args, message", [
    (["--steps=2.9"], "'steps' expects int, got '2.9'"),
    (["--steps=-3"], "'steps' must be >= 1"),
    (["--rl.top_p=1.5"], "'rl.top_p' must be in \\[1e-06, 1\\]"),
    (["--rl.clip_c=0.5"], "'rl.clip_c' must be > 1"),
    (["--optim.lr=0"], "'optim.lr' must be > 0"),
    (["--engine.max_num_seqs=0"], "'engine.max_num_seqs' must be >= 1"),
    (["--rl.n=1"], "n >= 2"),  # dynamic sampling can never keep a group of one
    (["--agent.chunk_tokens=0"], "agent.chunk_tokens"),
    (["--rl.kl_estimator=k9"], "rl.kl_estimator"),
    (["--progress=maybe"], "'progress' expects bool"),
    (["--data.tokenizer_tasks=vt,nope"], "data.tokenizer_tasks"),
])
def test_bad_config_values_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        Config.from_argv(["--model=micro", *args])


def test_json_types_are_strict_and_space_separated_values_work(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 2.9}))
    with pytest.raises(ValueError, match="c.json and the command line: 'steps' expects int, got 2.9"):
        Config.from_argv(["--config", str(path)])
    path.write_text(json.dumps({"data": {"sft_direct": 1}}))
    with pytest.raises(ValueError, match="'data.sft_direct' expects bool"):
        Config.from_argv(["--config", str(path)])
    cfg = Config.from_argv(["--model=micro", "--steps", "4", "--resume", "--rl.n", "3"])
    assert (cfg.steps, cfg.resume, cfg.rl.n) == (4, True, 3)
    assert Config.from_argv(["--model=micro", "--rl.n=1", "--rl.dynamic_sampling=false"]).rl.n == 1


def test_agent_settings_default_to_the_checkpoint():
    cfg = Config.from_argv([f"--model={ROOT}/checkpoints/tiny-sft"])
    assert (cfg.agent.chunk_tokens, cfg.agent.memory_tokens, cfg.agent.template) == (128, 96, "compact")
    cfg = Config.from_argv([f"--model={ROOT}/checkpoints/tiny-sft", "--agent.chunk_tokens=64"])
    assert (cfg.agent.chunk_tokens, cfg.agent.memory_tokens) == (64, 96)


def test_out_dir_is_checked_before_any_step(tmp_path, tokenizer_path):
    # an earlier run there: refused without --resume
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="holds an earlier run; pass --resume"):
        Trainer(config(tmp_path / "old", tokenizer_path, "--steps=1")).train()
    # --export with nothing to export (a typo in out_dir is enough)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(config(tmp_path / "typo", tokenizer_path, "--resume", f"--export={tmp_path}/x")).train()
    assert not os.path.exists(tmp_path / "x")
    # a directory another live run holds
    import fcntl
    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_SH)
        with pytest.raises(OSError, match="in use by another run"):
            Trainer(config(tmp_path / "busy", tokenizer_path, "--steps=1")).train()
    # a refused run writes nothing there: not even the tokenizer it would train for itself
    (tmp_path / "old" / "tokenizer.model").write_bytes(b"the earlier run's")
    with pytest.raises(ValueError, match="holds an earlier run"):
        Trainer(Config.from_argv(TINY + [f"--out_dir={tmp_path / 'old'}", "--data.tokenizer_tasks=vt"]))
    assert (tmp_path / "old" / "tokenizer.model").read_bytes() == b"the earlier run's"
    # not writable
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="not writable"):
        Trainer(config(tmp_path / "file" / "run", tokenizer_path, "--steps=1")).train()


def test_resume_skips_a_damaged_checkpoint_and_a_torn_log_line(tmp_path, tokenizer_path):
    args = ["--algo=sft", "--checkpoint_every=1", "--keep_checkpoints=3"]
    Trainer(config(tmp_path, tokenizer_path, "--steps=2", *args)).train()
    ckpts = tmp_path / "checkpoints"
    for f in (ckpts / "step_000002" / "state").iterdir():  # truncate every shard of the newest
        if f.suffix == ".distcp":
            f.write_bytes(f.read_bytes()[:10])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill mid-write
    t = Trainer(config(tmp_path, tokenizer_path, "--steps=3", "--resume", *args))
    assert t.load_checkpoint() and t.step == 1  # fell back to step 1, the newest intact one
    history = t.train()
    assert [m["step"] for m in history] == [2, 3]
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    # the damaged one is kept aside under its own name, and pruning never counted it
    assert sorted(os.listdir(ckpts)) == ["step_000001", "step_000002", "step_000002.damaged", "step_000003"]
    # a resume that can load nothing, while checkpoints exist, stops instead of starting over
    for d in ("step_000001", "step_000002", "step_000003"):
        os.remove(ckpts / d / "trainer.json")
    with pytest.raises(RuntimeError, match="no checkpoint .* could be loaded"):
        Trainer(config(tmp_path, tokenizer_path, "--steps=4", "--resume", *args)).train()


def test_dotted_agent_keys_in_a_config_file_beat_the_checkpoints_agent_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": f"{ROOT}/checkpoints/tiny-sft", "agent.chunk_tokens": 64}))
    assert Config.from_argv(["--config", str(path)]).agent.chunk_tokens == 64


def test_validation_needs_its_own_file_when_training_reads_one():
    with pytest.raises(ValueError, match="eval.tasks must name a held-out file"):
        Config.from_argv(["--model=micro", "--data.tasks=jsonl:x.jsonl", "--eval.every=5"])


def never_informative(sample, traj):
    return 0.0


def test_dynamic_sampling_out_of_rounds_trains_on_what_it_has(tmp_path, tokenizer_path):
    t = Trainer(config(tmp_path, tokenizer_path, "--steps=1", "--rl.max_rounds=2"), reward_fn=never_informative)
    before = [p.detach().clone() for p in t.model.parameters()]
    m = t.rl_step()
    assert (m["rounds"], m["kept_groups"], m["dropped_groups"]) == (2, 0, 4)  # 2 rounds x 2 questions
    assert t.position == 4 and "loss" not in m  # no update: nothing informative to learn from
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_dynamic_sampling_as_verls_dapo_recipe(tmp_path, tokenizer_path):
    # out of rounds short of informative groups: an error, not a smaller step
    t = Trainer(config(tmp_path / "a", tokenizer_path, "--rl.max_rounds=2", "--rl.out_of_rounds=error"),
                reward_fn=never_informative)
    with pytest.raises(RuntimeError, match="2 generation rounds .* gave 0 informative groups of the 2"):
        t.rl_step()
    # filtered by accuracy: groups whose only spread is the overlong penalty are dropped
    args = ["--rl.overlong_buffer=8", "--rl.max_rounds=1", "--rl.n=4"]
    shaped = Trainer(config(tmp_path / "b", tokenizer_path, *args), reward_fn=never_informative).rl_step()
    unshaped = Trainer(config(tmp_path / "c", tokenizer_path, *args, "--rl.filter_by=accuracy"),
                       reward_fn=never_informative).rl_step()
    assert shaped["kept_groups"] > 0 and unshaped["kept_groups"] == 0


def test_kl_and_overlong_terms_as_training_applies_them(tmp_path, tokenizer_path):
    # overlong shaping: answers are capped at answer_tokens = 8 and the buffer is 8, so an answer of
    # length L gets (0 - L) / 8 added to its reward
    t = Trainer(config(tmp_path, tokenizer_path, "--rl.overlong_buffer=8", "--rl.kl_coef=0.5",
                       "--rl.dynamic_sampling=false", "--rl.n=8"), reward_fn=low_ids)
    kept, seen, _ = t.rollout()
    for s, group, rewards in seen:
        for traj, r in zip(group, rewards):
            assert r == pytest.approx(low_ids(s, traj) - len(traj.conversations[-1].response_ids) / 8)
    # the KL term: the policy starts equal to its reference, so KL = 0; after an update it is > 0
    m1 = t.rl_step()
    m2 = t.rl_step()
    assert m1["kl"] == pytest.approx(0.0, abs=1e-6) and m2["kl"] > 0


def test_validation_during_training_is_logged(tmp_path, tokenizer_path):
    cfg = config(tmp_path, tokenizer_path, "--steps=2", "--eval.every=1", "--eval.samples=2",
                 "--eval.tasks=niah_single,vt", "--eval.lengths=256")
    history = Trainer(cfg, reward_fn=low_ids).train()
    logged = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in logged] == [0, 1, 2]  # validated before training too, as the release does
    for m in (history[-1], logged[-1], logged[0]):
        assert {"val_accuracy", "val_accuracy/niah_single", "val_accuracy/vt"} <= set(m)
        assert m["val_accuracy"] == pytest.approx((m["val_accuracy/niah_single"] + m["val_accuracy/vt"]) / 2)
    for key in ("memory_capped_frac", "no_boxed_frac", "memory_len", "answer_len"):
        assert key in logged[-1]


# ---- the settings boundary: every value accepted gives a valid Config, every other one is named ----------

SETTING_KEYS = ["steps", "seed", "algo", "dtype", "rl.n", "rl.clip_low", "rl.clip_c", "rl.top_p", "rl.loss_agg",
                "optim.lr", "optim.beta2", "engine.block_size", "eval.n", "eval.temperature", "agent.chunk_tokens",
                "data.tasks", "rl.nn", "optim"]


@settings(max_examples=80, deadline=None)
@given(values=st.dictionaries(st.sampled_from(SETTING_KEYS), st.one_of(
    st.integers(-3, 2**64), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.sampled_from(["", "abc", "1e3", "k3", "sft", "token-mean", "bfloat16", "vt,nope", "16", "0.5"])), max_size=4))
def test_any_settings_build_a_checked_config_or_are_refused_by_key(values):
    argv = ["--model=micro"] + [f"--{k}={v}" for k, v in values.items()]
    try:
        cfg = Config.from_argv(argv)
    except ValueError as e:
        assert any(k in str(e) or k.split(".")[-1] in str(e) for k in values), e
        return
    assert cfg.steps >= 1 and 0 <= cfg.rl.clip_low < 1 and cfg.rl.clip_c > 1 and cfg.optim.lr > 0
    assert cfg.engine.block_size >= 16 and cfg.agent.chunk_tokens >= 1
    assert not (cfg.eval.n > 1 and cfg.eval.temperature == 0)


def test_settings_files_and_flags_in_every_form(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: expected a JSON object of settings, got a JSON list"):
        Config.from_argv(["--config", str(tmp_path / "list.json")])
    (tmp_path / "c.json").write_text(json.dumps({"steps": 5}))
    assert Config.from_argv([f"--config={tmp_path / 'c.json'}", "--model=micro"]).steps == 5
    with pytest.raises(ValueError, match="export: .* is the run's model"):
        Config.from_argv([f"--model={ROOT}/checkpoints/tiny-sft", f"--export={ROOT}/checkpoints/tiny-sft/"])
    (tmp_path / "same.json").write_text('{"steps": 4, "steps": 5}')
    with pytest.raises(ValueError, match="same.json: not valid JSON .key 'steps' appears twice"):
        Config.from_argv(["--config", str(tmp_path / "same.json")])
    (tmp_path / "twice.json").write_text(json.dumps({"agent.chunk_tokens": 64, "agent": {"chunk_tokens": 32}}))
    with pytest.raises(ValueError, match="'agent.chunk_tokens' is given twice"):  # one setting, two spellings
        Config.from_argv(["--config", str(tmp_path / "twice.json")])


def test_resume_refuses_settings_that_would_make_the_record_lie(tmp_path, tokenizer_path):
    args = ["--algo=sft", "--checkpoint_every=1"]
    Trainer(config(tmp_path, tokenizer_path, "--steps=1", *args)).train()
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    for change, named in (("--model=mini", "model='micro' there, 'mini' now"), ("--optim.lr=0.01", "optim.lr")):
        with pytest.raises(ValueError, match=f"--resume: .* was made with other settings .*{named}"):
            Trainer(config(tmp_path, tokenizer_path, "--steps=2", "--resume", *args, change))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before  # nothing renamed "damaged"
    t = Trainer(config(tmp_path, tokenizer_path, "--steps=2", "--resume", *args, "--keep_checkpoints=5"))
    assert [m["step"] for m in t.train()] == [2]  # how long a run goes and how it reports may change


def test_a_full_disk_at_checkpoint_time_is_named_and_loses_nothing(tmp_path, tokenizer_path, monkeypatch):
    import errno
    import torch.distributed.checkpoint as dcp
    t = Trainer(config(tmp_path, tokenizer_path, "--steps=2", "--algo=sft", "--checkpoint_every=1"))

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    t.save_checkpoint()
    monkeypatch.setattr(dcp, "save", full)
    t.step = 2
    with pytest.raises(OSError, match=r"step_000002: the disk is full .* intact \(step_000000\)"):
        t.save_checkpoint()
    t.checkpoints.release_out_dir()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000000"]


def test_rl_step_with_non_finite_log_probs_is_skipped(tmp_path, tokenizer_path):
    t = Trainer(config(tmp_path, tokenizer_path, "--steps=1", "--rl.dynamic_sampling=false", "--rl.n=2"))
    real = t.model.token_logprobs  # the update's forward (the engine samples through another)

    def nan_logprobs(*args, **kw):
        out = real(*args, **kw)
        return tuple(x * float("nan") for x in out) if isinstance(out, tuple) else out * float("nan")
    t.model.token_logprobs = nan_logprobs
    before = [p.detach().clone() for p in t.model.parameters()]
    m = t.rl_step()
    assert m["skipped"] == 1
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, t.model.parameters()))
    with torch.no_grad():
        t.model.norm.weight[0] = float("nan")  # every logit is NaN: every rollout fails, nothing can be learned
    with pytest.raises(RuntimeError, match="step 0: every rollout failed .*logits are not finite"):
        t.rl_step()


def test_flags_are_given_once_and_bare_only_for_switches(tmp_path):
    assert Config.from_argv(["--model=micro", "--steps=5", "--steps=1"]).steps == 1  # the later flag wins
    for argv, named in ((["--config", "a.json", "--config", "b.json"], "--config is already given"),
                        (["--rl=5", "--rl.n=3"], "--rl is already given"),
                        (["--export", "--resume"], "'export' expects str, got True"),
                        (["--data.tasks=niah_single,,vt"], "unknown tasks \\[''\\]"),
                        (["--data.lengths=abc"], "data: bad length .abc."),
                        (["--eval.every=5", "--eval.seed=0"], "eval.seed=0 is the run's seed"),
                        (["--steps=2", "--config"], "give the settings file"),
                        (["--data.tasks=niah_single,vt"], "rl.reward=boxed_em scores one boxed answer"),
                        (["--help=maybe"], "'help' expects bool"),
                        (["--eval.every=5", "--eval.tasks=niah_single,vt", "--eval.seed=0"], "is the run's seed"),
                        (["--data.tasks=jsonl:a.jsonl", "--eval.every=5", "--eval.tasks=jsonl:./a.jsonl"],
                         "must name a held-out file"),
                        (["--algo=sft", "--data.max_chunks=8"], "leave it 0 with algo=sft")):
        with pytest.raises(ValueError, match=named):
            Config.from_argv(["--model=micro", *argv])


def test_an_export_goes_to_a_new_directory_outside_the_run(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    (tmp_path / "file").write_text("")
    for export in (tmp_path / "full", tmp_path / "file", tmp_path / "run" / "checkpoints" / "step_000002",
                   tmp_path / "run"):
        with pytest.raises(ValueError, match="export: "):
            Config.from_argv(["--model=micro", f"--out_dir={tmp_path / 'run'}", f"--export={export}"])
    tok = f"{ROOT}/checkpoints/tiny/tokenizer.model"
    with pytest.raises(ValueError, match="the run's model or tokenizer directory"):
        Config.from_argv(["--model=nano", f"--tokenizer={tok}", f"--export={ROOT}/checkpoints/tiny"])


def test_resume_with_nothing_to_resume_starts_the_record_over(tmp_path, tokenizer_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')  # a run killed before its checkpoint
    history = Trainer(config(tmp_path, tokenizer_path, "--steps=1", "--algo=sft", "--resume")).train()
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [m["step"] for m in history] == [1]


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    from run_dir import Checkpointer
    cfg = Config.from_argv(["--model=micro", f"--out_dir={tmp_path}"])
    for step in (999_999, 1_000_000, 12):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    assert Checkpointer(cfg, 0, 1, "cpu").newest() == ["step_000012", "step_999999", "step_1000000"]


def test_an_export_says_which_settings_it_set_aside(tmp_path, tokenizer_path, capsys):
    Trainer(config(tmp_path, tokenizer_path, "--steps=1", "--algo=sft")).train()
    Trainer(config(tmp_path, tokenizer_path, "--steps=1", "--algo=sft", "--resume", "--optim.lr=0.5",
                   f"--export={tmp_path / 'hf'}")).train()
    assert "set aside: optim.lr=0.5" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_an_export_reads_no_training_data(tmp_path, tokenizer_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(dict(id=i, question="Where?", context="here", answers=["here"])) + "\n"
                            for i in range(4)))
    run = ["--steps=1", "--rl.dynamic_sampling=false", f"--data.tasks=jsonl:{data}"]
    Trainer(config(tmp_path / "run", tokenizer_path, *run)).train()
    data.unlink()  # the data moved away: the run can still be exported
    Trainer(Config.from_argv([f"--out_dir={tmp_path / 'run'}", f"--export={tmp_path / 'hf'}", "--progress=false",
                              "--rl.n=3", "--data.lengths=2k"])).train()
    assert (tmp_path / "hf" / "model.safetensors").exists()
    out = capsys.readouterr().out
    assert "set aside: data.lengths='2k', rl.n=3\n" in out  # what was given, not the defaults


def test_a_data_length_too_short_for_the_runs_questions_is_a_settings_error(tmp_path, tokenizer_path):
    with pytest.raises(ValueError, match="data.lengths: niah_single: length 20 is too short"):
        Trainer(config(tmp_path, tokenizer_path, "--data.lengths=20"))
