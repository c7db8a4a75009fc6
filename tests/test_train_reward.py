"""Integration: the reward model trained on 2 Ray Train workers (DDP), then used to pick uncertain samples.

Runs jobs/train_reward.py and jobs/sample.py in-process on the session's Ray cluster, on the tiny
model's samples judged by simulated experts plus weak feedback from the tiny data set.
"""

from __future__ import annotations

import itertools
import json
import math
import runpy
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pathalign_ray.config import load_config
from pathalign_ray.experts.simulated_feedback import SimulateFeedbackConfig, simulate_feedback
from pathalign_ray.generator.diffusion import load_model
from pathalign_ray.generator.sampling import read_manifest
from pathalign_ray.reward.data import build_examples, split_examples
from pathalign_ray.reward.model import load_reward_model
from pathalign_ray.reward.selection import most_uncertain
from pathalign_ray.reward.train import TrainRewardConfig, evaluate, train_reward, warmup_steps_of
from pathalign_ray.training import lr_factor

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
TINY_REWARD_OVERRIDES = [
    "model.image_size=16",
    "model.channels=[8,16]",
    "model.hidden=16",
    "model.class_embedding=8",
    "train.epochs=2",
    "train.steps_per_epoch=2",
    "train.batch_size=8",
    "data.weak_per_expert=2",
    "data.test_fraction=0.25",
    "scale.num_workers=2",
]


def _job(name: str):
    return runpy.run_path(str(ROOT / "jobs" / f"{name}.py"), run_name="job")["main"]


@pytest.fixture(scope="module")
def reward_run(tiny_samples, tiny_dataset, tmp_path_factory):
    """A run with the tiny samples judged by 3 simulated experts, and a reward model trained on it."""
    run_dir = tmp_path_factory.mktemp("reward_run")
    shutil.copytree(tiny_samples, run_dir / "samples" / "pretrained")
    simulate_feedback(SimulateFeedbackConfig(run_dir=str(run_dir), experts=3))
    argv = ["--config", str(ROOT / "configs" / "train_reward.yaml"), f"run_dir={run_dir}"]
    argv += [f"data.dataset={tiny_dataset}"]
    started = time.perf_counter()
    _job("train_reward")(argv + TINY_REWARD_OVERRIDES)
    print(f"train_reward on 2 workers: {time.perf_counter() - started:.1f} s")
    return run_dir, load_config(TrainRewardConfig, run_dir / "train_reward.yaml")


def test_writes_the_model_with_label_counts_and_metrics(reward_run):
    run_dir, _config = reward_run
    model_dir = run_dir / "reward"
    assert sorted(p.name for p in model_dir.iterdir()) == ["reward.json", "reward.safetensors"]
    meta = json.loads((model_dir / "reward.json").read_text())
    assert meta["model_id"] == f"{run_dir.name}-reward-v0" and meta["version"] == 0
    train_counts, test_counts = meta["label_counts"]["train"], meta["label_counts"]["test"]
    assert train_counts["expert"]["rows"] + test_counts["expert"]["rows"] == 12, "one consensus row per sample"
    assert test_counts["expert"]["images"] == 3, "a quarter of the 12 images held out"
    weak = sum(counts[s]["rows"] for counts in (train_counts, test_counts) for s in ("weak_true", "weak_wrong"))
    assert weak == 24, "two weak examples per expert example"
    assert [row["epoch"] for row in meta["history"]] == [1, 2]
    assert 1 <= meta["epoch"] <= 2
    for key in (
        "train/loss",
        "test/loss",
        "test/all/auc",
        "test/expert/auc",
        "test/weak/auc",
        "test/all/accuracy",
        "test/all/balanced_accuracy",
        "test/all/ece",
        "test/expert/n",
        "report",
    ):
        assert key in meta["metrics"], key
    assert meta["metrics"]["test/loss"] > 0 and meta["metrics"]["test/all/n"] == sum(
        counts["rows"] for counts in test_counts.values()
    )
    assert set(meta["metrics"]["report"]["all"]["per_class"]) <= set(meta["class_names"])
    assert meta["training"]["model"]["channels"] == [8, 16]
    checkpoints = [p for p in (run_dir / "reward_train").glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 1, "Ray Train keeps the last checkpoint only"


def test_saved_model_scores_match_the_reported_metrics(reward_run):
    """The held-out metrics recomputed in this process from load_reward_model equal what the workers reported."""
    run_dir, config = reward_run
    model, meta = load_reward_model(run_dir / "reward")
    examples = build_examples(config.data, run_dir, config.model.image_size)
    test_set = examples.take(split_examples(examples, config.data.test_fraction, config.data.seed)[1])
    images = torch.from_numpy(test_set.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    class_ids = torch.from_numpy(test_set.class_ids)
    with torch.no_grad():
        logits = model(images, class_ids)
        criteria_logits = model.criteria_logits(images, class_ids)
    metrics, _ = evaluate(logits, criteria_logits, test_set, np.ones(len(test_set), bool), config.train)
    for key in ("test/loss", "test/all/auc", "test/all/accuracy", "test/all/brier", "test/weak/auc"):
        reported = meta["metrics"][key]
        assert (reported is None and math.isnan(metrics[key])) or metrics[key] == pytest.approx(reported, rel=1e-4), key


def test_uncertain_selection_writes_exactly_k_rows(reward_run, tiny_pretrained):
    run_dir, _ = reward_run
    model_dir = tiny_pretrained[2]
    sample_job = _job("sample")
    base = [f"model={model_dir}", "n_per_class=3", "ddim_steps=2", f"reward_model={run_dir / 'reward'}"]
    sample_job(base + [f"out_dir={run_dir / 'scored'}"])
    scored = read_manifest(run_dir / "scored").to_pylist()
    assert len(scored) == 12 and all(0 < row["reward"] < 1 for row in scored)

    sample_job(base + [f"out_dir={run_dir / 'uncertain'}", "--select", "uncertain", "--k=5"])
    kept = read_manifest(run_dir / "uncertain").to_pylist()
    assert len(kept) == 5 and len(list((run_dir / "uncertain" / "images").glob("*.png"))) == 5
    expected = {scored[i]["sample_id"] for i in most_uncertain(np.array([row["reward"] for row in scored]), 5)}
    assert {row["sample_id"] for row in kept} == expected
    assert (run_dir / "uncertain" / "contact_sheet.png").is_file()


def test_trains_on_the_pretrained_generators_unet_as_backbone(tiny_samples, tiny_dataset, tiny_pretrained, tmp_path):
    """model.backbone: the generator's UNet encoder, finetuned under DDP; the saved model needs no backbone folder."""
    shutil.copytree(tiny_samples, tmp_path / "samples" / "pretrained")
    simulate_feedback(SimulateFeedbackConfig(run_dir=str(tmp_path), experts=1))
    backbone = tiny_pretrained[2]
    argv = [
        "--config",
        str(ROOT / "configs" / "train_reward.yaml"),
        f"run_dir={tmp_path}",
        f"data.dataset={tiny_dataset}",
    ]
    _job("train_reward")(argv + TINY_REWARD_OVERRIDES + [f"model.backbone={backbone}", "train.epochs=1"])
    model, meta = load_reward_model(tmp_path / "reward")
    assert meta["training"]["model"]["backbone"] == str(backbone.resolve())
    assert meta["backbone_config"]["sample_size"] == 16
    unet = load_model(backbone)[0]
    assert model.encoder.conv_in.weight.shape == unet.conv_in.weight.shape
    assert not torch.equal(model.encoder.conv_in.weight, unet.conv_in.weight), "the backbone is finetuned"
    assert bool(torch.isfinite(model.score(torch.zeros(2, 3, 16, 16), torch.tensor([0, 1]))).all())


def test_missing_feedback_fails_before_training(tmp_path, tiny_dataset):
    config = load_config(TrainRewardConfig, None, [f"run_dir={tmp_path}", f"data.dataset={tiny_dataset}"])
    with pytest.raises(FileNotFoundError, match="feedback store .* does not exist"):
        train_reward(config)
    assert not (tmp_path / "reward").exists()


def test_the_reward_models_cosine_schedule_warms_up_peaks_and_decays_to_zero():
    total = 200
    warmup = warmup_steps_of("cosine", total)
    factors = [lr_factor(step, total, "cosine", warmup) for step in range(total)]
    assert warmup == 10 and factors[0] == pytest.approx(1 / 10)  # 5 % warm-up: 10 steps
    assert factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 189 / 190)))
    assert lr_factor(total, total, "cosine", warmup) == pytest.approx(0.0)
    assert warmup_steps_of("constant", total) == 0
    assert {lr_factor(step, total, "constant") for step in range(total)} == {1.0}
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, total, "linear")


def test_one_schedule_serves_deepspeeds_warm_up_and_the_classifiers_cosine():
    """build_engine's warm-up to a constant rate and the evaluation's cosine without warm-up, as torch schedulers."""
    from pathalign_ray.training import lr_schedule

    def rates(schedule) -> list[float]:
        seen = []
        for _ in range(8):
            seen.append(schedule.get_last_lr()[0])
            schedule.step()
        return seen

    def optimizer():
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)

    assert rates(lr_schedule(optimizer(), 0, "constant", warmup_steps=4)) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    cosine = rates(lr_schedule(optimizer(), 8, "cosine"))
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)])


def test_epochs_are_ranked_by_the_held_out_experts_brier_score_or_by_the_loss():
    from pathalign_ray.reward.train import selection_score

    metrics = {"test/loss": 0.2, "test/expert/n": 51, "test/expert/brier": 0.3}
    assert selection_score(metrics, "expert_brier") == 0.3
    assert selection_score(metrics, "loss") == 0.2
    assert selection_score({**metrics, "test/expert/n": 0}, "expert_brier") == 0.2  # no verdict held out
