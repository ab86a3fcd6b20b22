"""Training curves: metrics.jsonl holds reward, accuracy and the groups dynamic sampling kept, per task,
and the run draws them with held-out accuracy per task to curves.png, named in its summary."""
import json
import sys

import pytest

import eval as ev
from test_train import config, low_ids
from train import Trainer


def niah_only(sample, traj):
    """vt groups all score 0, so dynamic sampling drops every one of them; niah_single groups vary."""
    return low_ids(sample, traj) if sample.meta["task"] == "niah_single" else 0.0


def test_per_task_metrics_and_the_curves(tmp_path, tokenizer_path, capsys):
    cfg = config(tmp_path, tokenizer_path, "--steps=2", "--data.tasks=niah_single,vt", "--data.lengths=256",
                 "--rl.n=4", "--eval.every=2", "--eval.samples=1")
    Trainer(cfg, reward_fn=niah_only).train()
    logged = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    steps = [m for m in logged if m["step"] > 0]
    assert len(steps) == 2
    for m in steps:
        assert m["reward/vt"] == 0 and m["kept_groups/vt"] == 0 < m["groups/vt"]  # generated, never trained
        assert m["kept_groups/niah_single"] == m["kept_groups"] == 2 <= m["groups/niah_single"]
        weights = {t: m[f"groups/{t}"] for t in ("niah_single", "vt")}  # n rollouts a group
        assert m["reward"] == pytest.approx(sum(m[f"reward/{t}"] * w for t, w in weights.items()) / sum(weights.values()))
        assert m["accuracy"] == pytest.approx(
            sum(m[f"accuracy/{t}"] * w for t, w in weights.items()) / sum(weights.values()))
    assert {"val_accuracy/niah_single", "val_accuracy/vt"} <= set(logged[-1])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"training curves: {tmp_path / 'curves.png'}" in capsys.readouterr().out


def test_no_matplotlib_no_plot_and_a_note(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/vt": 0.5}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert ev.plot_curves(str(tmp_path / "metrics.jsonl")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "curves.png").exists()


def test_rollout_metrics_score_each_task_on_the_whole_answer():
    """Accuracy per task and overall read the same thing: the final answer's text, as the scorer expects."""
    from memory_agent import Trajectory
    from tasks import Sample
    from train import rollout_metrics

    def group(task, answers):
        s = Sample(task, "q?", "doc", ["42"], dict(task=task, scorer="exact_match"))
        return s, [Trajectory(task, k, answer_text=a, answer=None) for k, a in enumerate(answers)], [0.0] * len(answers)

    m = rollout_metrics([group("niah_single", ["\\boxed{42}", "\\boxed{7}"]), group("vt", ["\\boxed{42}"] * 2)])
    assert (m["accuracy/niah_single"], m["accuracy/vt"], m["accuracy"]) == (1, 2, 3)
