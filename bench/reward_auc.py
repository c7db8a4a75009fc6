"""Reward-model AUC on held-out SYNTHETIC verdicts: expert + weak feedback against weak feedback alone.

    .venv/bin/python bench/reward_auc.py [--n-per-class 64] [--ddim-steps 50] [--experts 3] [key.sub=value ...]

The overrides apply to configs/train_reward.yaml. Needs the 32 px model of bench/pretrain32.py
(runs/pretrain32/model; `.venv/bin/python bench/pretrain32.py --restore` makes it from the kept model in a minute).

1. Samples n_per_class images per class from it (DDIM, 50 steps by default) into
   runs/reward_auc/samples/pretrained (reused when there, with the same count and steps).
2. Simulated pathologists (pathalign_ray.experts.pathologist, through simulated_feedback) judge them into
   runs/reward_auc/feedback.
3. Trains the reward model on 2 Ray Train workers on those verdicts plus weak feedback from the real
   set (runs/pretrain32/data): two weak examples per expert example, half with a wrong class.
4. Baseline: the same model, config and weak examples with data.expert_train=false: no expert label
   is trained on; the same held-out synthetic verdicts score it.

Writes bench/results/reward_auc.json: both held-out AUCs on synthetic verdicts (with a Hanley-McNeil
standard error), the labels used, and the plausible fraction of the labels: with very few plausible
(or implausible) verdicts the AUC says little, and the JSON says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

from bench_common import write_result

from pathalign_ray.config import load_config
from pathalign_ray.experts.simulated_feedback import SimulateFeedbackConfig, simulate_feedback
from pathalign_ray.generator.sampling import SampleConfig, read_manifest, sample
from pathalign_ray.reward.data import build_examples, read_votes, split_examples
from pathalign_ray.reward.train import TrainRewardConfig, train_reward

MODEL = Path("runs/pretrain32/model")
DATASET = Path("runs/pretrain32/data")
RUN = Path("runs/reward_auc")
MIN_MINORITY = 10  # held-out verdicts of the rarer kind below which the AUC is called unreliable


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-per-class", type=int, default=64, help="synthetic images per declared class")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps per synthetic image")
    parser.add_argument("--experts", type=int, default=3, help="simulated pathologists")
    parser.add_argument("overrides", nargs="*", help="key.sub=value for configs/train_reward.yaml")
    args = parser.parse_args(argv)
    if not (MODEL / "unet" / "config.json").is_file():
        sys.exit(
            f"{MODEL} is missing: run `.venv/bin/python bench/pretrain32.py --restore` first (it writes runs/pretrain32)"
        )
    config = load_config(
        TrainRewardConfig, "configs/train_reward.yaml", [f"run_dir={RUN}", f"data.dataset={DATASET}", *args.overrides]
    )
    timings = {}

    started = time.perf_counter()
    samples = RUN / "samples" / "pretrained"
    n_classes = len(json.loads((MODEL / "class_names.json").read_text()))
    if not _samples_match(samples, n_classes * args.n_per_class, args.ddim_steps):
        shutil.rmtree(RUN, ignore_errors=True)  # new images: the old verdicts no longer apply
        sample(
            SampleConfig(
                model=str(MODEL), out_dir=str(samples), n_per_class=args.n_per_class, ddim_steps=args.ddim_steps
            )
        )
    timings["sample"] = time.perf_counter() - started

    started = time.perf_counter()
    feedback = simulate_feedback(SimulateFeedbackConfig(run_dir=str(RUN), experts=args.experts))
    timings["simulate_feedback"] = time.perf_counter() - started

    started = time.perf_counter()
    weak_only = train_reward(_with(config, expert_train=False))
    shutil.rmtree(RUN / "reward_weak_only", ignore_errors=True)
    weak_only.model_dir.rename(RUN / "reward_weak_only")
    timings["train_weak_only"] = time.perf_counter() - started
    started = time.perf_counter()
    mixed = train_reward(config).info
    timings["train_expert_and_weak"] = time.perf_counter() - started
    weak_only = weak_only.info
    labels = _labels(config, feedback["experts"])
    figures = {
        "held_out_synthetic_auc": {
            "expert_and_weak_feedback": _auc(mixed),
            "weak_feedback_only": _auc(weak_only),
        },
        "held_out_real_weak_auc": {
            "expert_and_weak_feedback": mixed["metrics"]["test/weak/auc"],
            "weak_feedback_only": weak_only["metrics"]["test/weak/auc"],
        },
        "labels": labels,
        "target_auc": 0.95,
        "best_epoch": {"expert_and_weak_feedback": mixed["epoch"], "weak_feedback_only": weak_only["epoch"]},
        "history_expert_auc": [row["test/expert/auc"] for row in mixed["history"]],
        "ddim_steps": args.ddim_steps,
        "config": f"configs/train_reward.yaml run_dir={RUN} data.dataset={DATASET} " + " ".join(args.overrides),
        "wall_s": {**timings, "total": sum(timings.values())},
    }
    minority = min(labels["held_out"]["plausible"], labels["held_out"]["implausible"])
    figures["labels_degenerate"] = minority < MIN_MINORITY
    figures["note"] = (
        f"held-out synthetic verdicts hold only {minority} of the rarer kind (< {MIN_MINORITY}): the AUCs "
        "rest on too few pairs to say much; see labels.plausible_fraction"
        if figures["labels_degenerate"]
        else "both models are scored on the same held-out synthetic samples"
    )
    path = write_result("reward_auc", figures)
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")


def _samples_match(samples: Path, count: int, ddim_steps: int) -> bool:
    if not (samples / "manifest.parquet").is_file():
        return False
    manifest = read_manifest(samples)
    return manifest.num_rows == count and set(manifest.column("ddim_steps").to_pylist()) == {ddim_steps}


def _with(config: TrainRewardConfig, **data) -> TrainRewardConfig:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **data))


def _auc(meta: dict) -> dict:
    """The held-out metrics on synthetic verdicts of one trained model, with the AUC's standard error."""
    metrics = meta["metrics"]
    n = metrics["test/expert/n"]
    n_pos = metrics["test/expert/n_plausible"]
    auc = metrics["test/expert/auc"]
    return {
        "auc": auc,
        "auc_standard_error": _hanley_mcneil(auc, n_pos, n - n_pos),
        "accuracy": metrics["test/expert/accuracy"],
        "balanced_accuracy": metrics["test/expert/balanced_accuracy"],
        "ece": metrics["test/expert/ece"],
        "held_out_samples": n,
        "model_id": meta["model_id"],
    }


def _hanley_mcneil(auc: float | None, n_pos: int, n_neg: int) -> float | None:
    """Standard error of an AUC (Hanley and McNeil 1982, eq. 2); None where the AUC is undefined."""
    if auc is None or not n_pos or not n_neg:
        return None
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return math.sqrt(max(variance, 0.0))


def _labels(config: TrainRewardConfig, experts: list[str]) -> dict:
    """Expert labels used for training and held out, and how many of them say plausible."""
    examples = build_examples(config.data, config.run_dir, config.model.image_size)
    train, test = split_examples(examples, config.data.test_fraction, config.data.seed)
    votes = read_votes([Path(config.run_dir) / store for store in config.data.feedback], config.data.rounds)

    def side(index):
        expert = index[examples.sources[index] == "expert"]
        ids = set(examples.sample_ids[expert].tolist())
        side_votes = [v for v in votes if v["sample_id"] in ids]
        consensus = examples.labels[expert]
        return {
            "samples": len(ids),
            "verdicts": len(side_votes),
            "plausible": int((consensus > 0.5).sum()),
            "implausible": int((consensus < 0.5).sum()),
            "ties": int((consensus == 0.5).sum()),
            "plausible_fraction_of_verdicts": _fraction(side_votes),
        }

    weak = examples.sources[train] != "expert"
    return {
        "trained_on": side(train),
        "held_out": side(test),
        "weak_examples_trained_on": int(weak.sum()),
        "experts": experts,
        "plausible_fraction": _fraction(votes),  # of all verdicts; of the consensus: see trained_on, held_out
    }


def _fraction(votes: list[dict]) -> float:
    return sum(v["verdict"] == "plausible" for v in votes) / max(1, len(votes))


if __name__ == "__main__":
    main(sys.argv[1:])
