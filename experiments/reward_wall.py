"""Why the reward model's AUC stops near 0.90: the verdicts need measurements finer than it learns.

    .venv/bin/python experiments/reward_wall.py [--epochs 30]

Runs on the samples, verdicts and held-out split of bench/reward_auc.py (runs/reward_auc; run that
first), without weak feedback, and trains nothing that is kept. Three held-out AUCs on the
consensus verdicts, each from gradient-boosted trees (scikit-learn) fitted to the training
consensus labels, differing only in what the trees see of each image besides its declared class:

1. exact: the simulated pathologist's own measurements (`pathologist.measure`: cell diameter, N:C,
   nucleus offset, lobes, solidity, axis ratio, chromatin, ... 16 numbers). The baseline: what
   the labels teach given perfect features.
2. estimated: the same 16 numbers as the reward model's CNN estimates them on held-out images,
   after training it to regress them on the training images directly (dense targets, far more
   than a verdict tells it). Also each estimate's error sd against the rules' tolerance.
3. the reward model itself (`data.weak_per_expert=0`, the same CNN, verdicts only), for reference.

Writes bench/results/reward_wall.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

from pathalign_ray.config import load_config
from pathalign_ray.experts.pathologist import _TOLERANCES, measure
from pathalign_ray.reward.data import build_examples, split_examples
from pathalign_ray.reward.metrics import roc_auc
from pathalign_ray.reward.model import RewardModel
from pathalign_ray.reward.train import TrainRewardConfig, _Heads, _tensors, reward_loss, warmup_steps_of
from pathalign_ray.training import lr_factor

# bench_common (it writes bench/results/NAME.json) is in bench/, off the path when run as experiments/NAME.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_common import write_result

RUN = "runs/reward_auc"
DATASET = "runs/pretrain32/data"
BATCH = 128


def measurements(images: np.ndarray) -> tuple[list[str], np.ndarray]:
    rows = [dataclasses.asdict(measure(image)) for image in images]
    names = [name for name in rows[0] if name != "found_cell"]
    return names, np.array([[float(row[name]) for name in names] for row in rows])


def tree_auc(train_x, train_class, train_y, test_x, test_class, test_y) -> float:
    trees = HistGradientBoostingClassifier(max_iter=500, learning_rate=0.05, categorical_features=[train_x.shape[1]])
    trees.fit(np.column_stack([train_x, train_class]), train_y)
    return roc_auc(trees.predict_proba(np.column_stack([test_x, test_class]))[:, 1], test_y)


def train_cnn(config, train, epochs: int, targets: np.ndarray | None) -> tuple[RewardModel, torch.nn.Module | None]:
    """The reward CNN on verdicts (targets None) or regressing `targets` (z-scored, NaN skipped).

    The reward training's batches (a random flip and quarter turn per image), heads, loss and
    learning-rate schedule, in one process.
    """
    torch.manual_seed(0)
    model = RewardModel(config.model, list(train.class_names))
    heads = _Heads(model)
    regressor = None if targets is None else torch.nn.Linear(config.model.hidden, targets.shape[1])
    params = list(model.parameters()) + ([] if regressor is None else list(regressor.parameters()))
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay)
    steps = math.ceil(len(train) / BATCH)
    total = steps * epochs
    warmup = warmup_steps_of(config.train.lr_schedule, total)
    for epoch in range(epochs):
        rng = np.random.default_rng(epoch)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = config.train.lr * lr_factor(epoch * steps + step, total, config.train.lr_schedule, warmup)
            rows = rng.choice(len(train), BATCH, replace=False)
            batch = _tensors(train, rows, "cpu", rng)
            if regressor is None:
                logits, criteria_logits = heads(batch["images"], batch["class_ids"])
                loss, _ = reward_loss(
                    logits,
                    criteria_logits,
                    batch["labels"],
                    batch["criteria"],
                    batch["criteria_mask"],
                    config.train.loss,
                    config.train.criteria_weight,
                )
            else:
                target = torch.from_numpy(targets[rows])
                known = torch.isfinite(target)
                predicted = regressor(model.features(batch["images"], batch["class_ids"]))
                loss = ((predicted - target.nan_to_num()) ** 2 * known).sum() / known.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), regressor


@torch.no_grad()
def predict(model: RewardModel, head, examples) -> np.ndarray:
    """Held-out outputs: the plausible logit (head None) or the regressor's estimates."""
    out = []
    for start in range(0, len(examples), 512):
        batch = _tensors(examples, np.arange(start, min(start + 512, len(examples))), "cpu", None)
        if head is None:
            out.append(_Heads(model)(batch["images"], batch["class_ids"])[0].numpy())
        else:
            out.append(head(model.features(batch["images"], batch["class_ids"])).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each CNN")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_config(
        TrainRewardConfig,
        "configs/train_reward.yaml",
        [f"run_dir={RUN}", f"data.dataset={DATASET}", "data.weak_per_expert=0"],
    )
    examples = build_examples(config.data, config.run_dir, config.model.image_size)
    train_index, test_index = split_examples(examples, config.data.test_fraction, config.data.seed)
    train, test = examples.take(train_index), examples.take(test_index)
    train_y, decided = train.labels > 0.5, test.labels != 0.5  # a 0.5 consensus has no side
    test_y = test.labels[decided] > 0.5
    timings, started = {}, time.perf_counter()

    names, train_m = measurements(train.images)
    _, test_m = measurements(test.images)
    timings["measure_s"] = round(time.perf_counter() - started, 1)
    exact = tree_auc(train_m, train.class_ids, train_y, test_m[decided], test.class_ids[decided], test_y)

    started = time.perf_counter()
    mean, sd = np.nanmean(train_m, 0), np.nanstd(train_m, 0) + 1e-6
    model, regressor = train_cnn(config, train, args.epochs, ((train_m - mean) / sd).astype(np.float32))
    estimated_m = predict(model, regressor, test) * sd + mean
    timings["regression_cnn_s"] = round(time.perf_counter() - started, 1)
    estimated = tree_auc(train_m, train.class_ids, train_y, estimated_m[decided], test.class_ids[decided], test_y)
    errors = {}
    for column, name in enumerate(names):
        known = np.isfinite(test_m[:, column])
        error = estimated_m[known, column] - test_m[known, column]
        errors[name] = {
            "error_sd": round(float(error.std()), 4),
            "tolerance": _TOLERANCES.get(name),
            "r2": round(float(1 - error.var() / test_m[known, column].var()), 3),
        }

    started = time.perf_counter()
    reward_model, _ = train_cnn(config, train, args.epochs, None)
    reward = roc_auc(predict(reward_model, None, test)[decided], test_y)
    timings["reward_cnn_s"] = round(time.perf_counter() - started, 1)

    figures = {
        "held_out_auc": {
            "trees_on_exact_measurements": round(exact, 4),
            "trees_on_cnn_estimated_measurements": round(estimated, 4),
            "reward_cnn_on_verdicts": round(reward, 4),
        },
        "estimate_errors": errors,
        "samples": {"train": len(train), "held_out": int(decided.sum()), "held_out_plausible": int(test_y.sum())},
        "epochs": args.epochs,
        "timings": timings,
    }
    path = write_result("reward_wall", figures)
    print(json.dumps(figures, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
