"""Training the reward model r(x, c) on expert verdicts and weak feedback, on Ray Train (DDP).

`train_reward(config)` runs on the driver: it builds the examples (reward.data) and the held-out
split before Ray starts, so a missing store or empty feedback fails at once; then a TorchTrainer's
workers run `train_loop`; the best epoch's model (lowest held-out loss) is written to RUN_DIR/reward.

The examples reach the workers as in-memory arrays through one object in Ray's object store, not
as a Ray Data pipeline: expert feedback is small by nature (the paper: a few thousand verdicts;
5,000 images at 64 px are 61 MB), every epoch draws class-balanced batches with replacement from
the whole set, and every epoch scores the whole held-out split; all three are a few lines on
arrays and awkward on a stream. The model is small, so plain DDP (prepare_model), no DeepSpeed.

Each call trains afresh on the feedback there is now; within one call, a worker failure restarts
from the best checkpoint so far (scale.max_failures).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pathalign_ray import storage
from pathalign_ray.cluster import init_ray, trainer_settings
from pathalign_ray.config import (
    Location,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
    config_to_dict,
    save_config,
)
from pathalign_ray.images import to_model_range
from pathalign_ray.progress import report_progress, watch
from pathalign_ray.reward.data import (
    RewardDataConfig,
    RewardExamples,
    balanced_weights,
    build_examples,
    label_counts,
    split_examples,
)
from pathalign_ray.reward.metrics import auc_text, classification_report
from pathalign_ray.reward.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    RewardModel,
    RewardModelConfig,
    backbone_folder,
    load_reward_model,
    save_reward_model,
)
from pathalign_ray.training import lr_factor, mean_over_workers, read_latest_checkpoint, report_with_checkpoint


@dataclasses.dataclass(frozen=True)
class RewardTrainResult:
    """The published reward model's folder and its metadata (reward.json: model_id, version, label counts,
    the kept epoch and its held-out metrics, every epoch's history)."""

    model_dir: str | Path  # a path, or a URI where run_dir is one
    info: dict


TRAIN_RUN_NAME = "reward_train"  # Ray Train's checkpoints: RUN_DIR/reward_train
MODEL_DIR_NAME = "reward"  # the trained model: RUN_DIR/reward


@config_dataclass
class RewardTrainConfig:
    epochs: PositiveInt = 40  # passes; the held-out split is scored after each (bench/reward_auc.py: 20 under-trains)
    steps_per_epoch: NonNegativeInt = 0  # optimizer steps per epoch; 0: training rows / global batch, rounded up
    batch_size: PositiveInt = 64  # examples per worker per step (global batch = batch_size x num_workers)
    lr: PositiveFloat = 1e-3  # AdamW peak learning rate
    # cosine: a linear warm-up over the first 5 % of the steps, then half a cosine down to 0 at the last step. On a
    # round's few hundred verdicts the constant rate left the held-out AUC jumping by +-0.1 from epoch to epoch;
    # the decay lets the last epochs settle.
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    weight_decay: float = 1e-4
    loss: Literal["mse", "bce"] = "mse"  # mse: (sigmoid(logit) - label)^2, the paper's; bce: cross-entropy
    criteria_weight: NonNegativeFloat = 0.5  # weight of the criteria heads' masked cross-entropy (0: plausibility only)
    augment: bool = True  # random flips and quarter turns: a cell on a slide has no orientation
    threshold: float = 0.5  # a score at or above it predicts plausible (accuracy metrics)
    ece_bins: PositiveInt = 10  # equal-width bins of the expected calibration error
    # the epoch whose weights are kept: the lowest Brier score on the held-out expert verdicts (what the reward
    # is for: on a few hundred samples it overfits them after a few epochs while the weak-feedback loss still
    # falls), or the lowest held-out training loss; "expert_brier" uses the loss when no verdict is held out
    keep_best: Literal["expert_brier", "loss"] = "expert_brier"
    seed: int = 0  # initial weights, batch draws, augmentation


@config_dataclass
class RewardScaleConfig:
    num_workers: PositiveInt = 2  # Ray Train workers (DDP ranks)
    threads_per_worker: PositiveInt = 1  # torch intra-op threads and Ray CPUs reserved per worker
    device: Literal["cpu", "cuda"] = "cpu"  # cuda: one GPU per worker, nccl; cpu: gloo
    max_failures: int = 1  # worker-group restarts from the best checkpoint before the run fails


@config_dataclass
class TrainRewardConfig:
    run_dir: Location = "runs/demo"  # path or URI; feedback stores, image_refs relative to it; model: RUN_DIR/reward
    data: RewardDataConfig = dataclasses.field(default_factory=RewardDataConfig)
    model: RewardModelConfig = dataclasses.field(default_factory=RewardModelConfig)
    train: RewardTrainConfig = dataclasses.field(default_factory=RewardTrainConfig)
    scale: RewardScaleConfig = dataclasses.field(default_factory=RewardScaleConfig)


def train_reward(config: TrainRewardConfig) -> RewardTrainResult:
    """Train on the cluster; write the best epoch's model to RUN_DIR/reward; return that folder and its metadata."""
    import ray
    from ray.train.torch import TorchTrainer

    run_dir = storage.absolute(config.run_dir)
    if config.model.backbone:  # every worker reads it: an absolute path or a URI, and a wrong one fails here
        backbone = storage.absolute(config.model.backbone)
        backbone_folder(backbone)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, backbone=backbone))
    examples = build_examples(config.data, run_dir, config.model.image_size)
    train_index, test_index = split_examples(examples, config.data.test_fraction, config.data.seed)
    if not config.data.expert_train:
        train_index = train_index[examples.sources[train_index] != "expert"]
    if not len(train_index):
        raise ValueError(f"no training examples: {len(examples)} examples, all held out or excluded")
    expert_rounds = examples.rounds[train_index][examples.sources[train_index] == "expert"]
    version = int(expert_rounds.max()) if len(expert_rounds) else 0
    info = {
        "model_id": f"{Path(run_dir).name}-reward-v{version}" + ("" if len(expert_rounds) else "-weak"),
        "version": version,  # the latest feedback round learnt from (0 on weak feedback alone)
        "label_counts": {
            "train": label_counts(examples.take(train_index)),
            "test": label_counts(examples.take(test_index)),
        },
        "training": config_to_dict(config),
    }
    save_config(config, storage.join(run_dir, "train_reward.yaml"))
    init_ray(device=config.scale.device)
    storage.delete_dir(storage.join(run_dir, TRAIN_RUN_NAME))  # a fresh run on the feedback of now, no resume
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config,
            "examples": ray.put(examples),  # one copy in the object store; workers on a node share it
            "train_index": train_index,
            "test_index": test_index,
            "info": info,
        },
        **trainer_settings(config.scale, TRAIN_RUN_NAME, run_dir, keep_checkpoints=1),
    )
    with watch("reward model", config.train.epochs, unit="epoch"):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"reward training in {run_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:
        _, meta = load_reward_model(checkpoint_dir)  # refuse to publish anything that does not load
        return RewardTrainResult(_publish(Path(checkpoint_dir), storage.join(run_dir, MODEL_DIR_NAME)), meta)


def reward_loss(
    logits: torch.Tensor,
    criteria_logits: torch.Tensor,
    labels: torch.Tensor,
    criteria: torch.Tensor,
    criteria_mask: torch.Tensor,
    kind: str = "mse",
    criteria_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The reward model's objective: (loss, {"plausible_loss", "criteria_loss"}).

    logits (B,) of P(plausible); criteria_logits (B, 6) of P(criterion fails), or (B, 0) without
    criteria heads; labels (B,) in [0, 1]; criteria (B, 6) in [0, 1]; criteria_mask (B, 6) bool.
    Plausibility: mse = mean (sigmoid(logit) - label)^2 (the paper) or bce = cross-entropy with
    logits. Criteria: cross-entropy averaged over the entries the mask marks known (0 if none).
    """
    if kind == "mse":
        plausible = (torch.sigmoid(logits) - labels).square().mean()
    elif kind == "bce":
        plausible = F.binary_cross_entropy_with_logits(logits, labels)
    else:
        raise ValueError(f"loss must be 'mse' or 'bce', got {kind!r}")
    if criteria_logits.shape[-1]:
        mask = criteria_mask.to(criteria_logits.dtype)
        per_entry = F.binary_cross_entropy_with_logits(criteria_logits, criteria, reduction="none")
        criteria_loss = (per_entry * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        criteria_loss = logits.new_zeros(())
    loss = plausible + criteria_weight * criteria_loss
    return loss, {"plausible_loss": float(plausible.detach()), "criteria_loss": float(criteria_loss.detach())}


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: DDP over the reward model; every rank reports, rank 0 checkpoints the best."""
    import ray
    import ray.train
    import ray.train.torch

    config: TrainRewardConfig = loop_config["config"]
    examples: RewardExamples = ray.get(loop_config["examples"])
    train_set, test_set = examples.take(loop_config["train_index"]), examples.take(loop_config["test_index"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.scale.threads_per_worker)
    torch.manual_seed(config.train.seed)

    model = RewardModel(config.model, list(examples.class_names))
    start_epoch, state = _restore(model)
    net = ray.train.torch.prepare_model(_Heads(model))  # DDP over gloo (nccl on GPU), on the worker's device
    device = next(net.parameters()).device
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    weights = balanced_weights(train_set) if config.data.balance else np.ones(len(train_set))
    global_batch = config.train.batch_size * world_size
    steps = config.train.steps_per_epoch or -(-len(train_set) // global_batch)
    total_steps = config.train.epochs * steps
    warmup_steps = warmup_steps_of(config.train.lr_schedule, total_steps)
    selection = np.ones(len(test_set), bool) if config.data.expert_train else test_set.sources != "expert"
    best_weights = _copy_weights(model)  # the restored best, or the initial weights until an epoch is scored

    for epoch in range(start_epoch, config.train.epochs):
        draws = np.random.default_rng([config.train.seed, epoch]).choice(
            len(train_set), size=(steps, global_batch), p=weights / weights.sum()
        )  # the same on every rank; rank r takes columns r, r + W, ...
        augment_rng = np.random.default_rng([config.train.seed, epoch, rank])
        net.train()
        losses = []
        for step, rows in enumerate(draws[:, rank::world_size]):
            for group in optimizer.param_groups:
                group["lr"] = config.train.lr * lr_factor(
                    epoch * steps + step, total_steps, config.train.lr_schedule, warmup_steps
                )
            batch = _tensors(train_set, rows, device, augment_rng if config.train.augment else None)
            logits, criteria_logits = net(batch["images"], batch["class_ids"])
            loss, _ = reward_loss(
                logits,
                criteria_logits,
                batch["labels"],
                batch["criteria"],
                batch["criteria_mask"],
                config.train.loss,
                config.train.criteria_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))

        logits, criteria_logits = _score_all(model, test_set, device, rank, world_size)
        metrics, report = evaluate(logits, criteria_logits, test_set, selection, config.train)
        metrics = {"epoch": epoch + 1, **mean_over_workers({"train/loss": np.mean(losses)}, world_size), **metrics}
        score = selection_score(metrics, config.train.keep_best)
        improved = not selection.any() or score < state["best_score"]  # nothing held out: the last
        if improved:
            state.update(best_score=score, best_epoch=epoch + 1)
            state["best_metrics"] = {**metrics, "report": report}
            best_weights = _copy_weights(model)
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        if rank == 0:
            auc = auc_text(metrics["test/expert/auc"], metrics["test/expert/n"], metrics["test/expert/n_plausible"])
            print(
                f"reward epoch {epoch + 1}/{config.train.epochs} train loss {metrics['train/loss']:.4f} "
                f"held-out loss {metrics['test/loss']:.4f} expert AUC {auc}"
            )
            report_progress("reward model", epoch + 1, f"held-out expert AUC {auc}")
        final = epoch + 1 == config.train.epochs
        if rank == 0 and (improved or final):
            _report_checkpoint(model, best_weights, state, loop_config["info"], metrics)
        else:
            ray.train.report(metrics)


def selection_score(metrics: dict, keep_best: str) -> float:
    """What an epoch is ranked by (lower is better): see RewardTrainConfig.keep_best."""
    if keep_best == "expert_brier" and metrics.get("test/expert/n", 0) > 0:
        return metrics["test/expert/brier"]
    return metrics["test/loss"]


def evaluate(
    logits: torch.Tensor, criteria_logits: torch.Tensor, test_set: RewardExamples, selection: np.ndarray, train_config
) -> tuple[dict, dict]:
    """Held-out metrics: (flat scalars for ray.train.report, classification reports per source kind).

    test/loss is the training objective over the `selection` rows (the sources trained on). AUC,
    accuracy, ECE are over rows with a verdict: consensus ties (label 0.5) are left out, a soft
    label counts as plausible above 0.5. Keys: test/{all,expert,weak}/{auc,accuracy,...}.
    """
    loss, parts = math.nan, {"plausible_loss": math.nan, "criteria_loss": math.nan}
    if selection.any():
        pick = torch.from_numpy(selection)
        loss, parts = reward_loss(
            logits[pick],
            criteria_logits[pick],
            torch.from_numpy(test_set.labels[selection]),
            torch.from_numpy(test_set.criteria[selection]),
            torch.from_numpy(test_set.criteria_mask[selection]),
            train_config.loss,
            train_config.criteria_weight,
        )
    scores = torch.sigmoid(logits).double().numpy()
    decided = test_set.labels != 0.5
    expert = test_set.sources == "expert"
    kinds = {"all": decided, "expert": decided & expert, "weak": decided & ~expert}
    metrics = {"test/loss": float(loss), **{f"test/{k}": v for k, v in parts.items()}}
    reports = {}
    for kind, rows in kinds.items():
        classes = np.asarray(test_set.class_names)[test_set.class_ids[rows]]
        reports[kind] = classification_report(
            scores[rows], test_set.labels[rows] > 0.5, classes, train_config.threshold, train_config.ece_bins
        )
        metrics.update({f"test/{kind}/{k}": v for k, v in reports[kind].items() if k != "per_class"})
    return metrics, reports


class _Heads(torch.nn.Module):
    """Both heads of a RewardModel in one forward, so DDP sees every parameter used by one call.

    forward(images (B, 3, H, W), class_ids (B,)) -> (logits (B,), criteria logits (B, 6) or (B, 0)).
    """

    def __init__(self, model: RewardModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(images, class_ids)
        logits = self.model.plausible_head(features).squeeze(1)
        if self.model.criteria_head is None:
            return logits, features.new_zeros(len(features), 0)
        return logits, self.model.criteria_head(features)


def _tensors(examples: RewardExamples, rows: np.ndarray, device, rng: np.random.Generator | None) -> dict:
    """Rows of the examples as model-ready tensors; rng: a random flip and quarter turn per image."""
    images = examples.images[rows]
    if rng is not None and len(images):
        turns, flips = rng.integers(0, 4, len(images)), rng.integers(0, 2, len(images))
        images = np.stack([np.rot90(im[:, ::-1] if f else im, t) for im, t, f in zip(images, turns, flips)])
    return {
        "images": torch.from_numpy(to_model_range(np.ascontiguousarray(images))).to(device),
        "class_ids": torch.from_numpy(examples.class_ids[rows]).to(device),
        "labels": torch.from_numpy(examples.labels[rows]).to(device),
        "criteria": torch.from_numpy(examples.criteria[rows]).to(device),
        "criteria_mask": torch.from_numpy(examples.criteria_mask[rows]).to(device),
    }


@torch.no_grad()
def _score_all(model: RewardModel, test_set: RewardExamples, device, rank: int, world_size: int, batch: int = 256):
    """Logits and criteria logits of every held-out row: each rank scores every W-th row, then all gather."""
    heads = _Heads(model).eval()
    mine = np.arange(rank, len(test_set), world_size)
    parts = [heads(**_images(test_set, mine[i : i + batch], device)) for i in range(0, len(mine), batch)]
    n_criteria = 0 if model.criteria_head is None else model.criteria_head.out_features
    logits = torch.cat([p[0].cpu() for p in parts]) if parts else torch.zeros(0)
    criteria = torch.cat([p[1].cpu() for p in parts]) if parts else torch.zeros(0, n_criteria)
    gathered = [(mine, logits, criteria)]
    if world_size > 1:
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, (mine, logits, criteria))
    all_logits, all_criteria = torch.zeros(len(test_set)), torch.zeros(len(test_set), n_criteria)
    for rows, part_logits, part_criteria in gathered:
        all_logits[torch.from_numpy(rows)] = part_logits
        all_criteria[torch.from_numpy(rows)] = part_criteria
    return all_logits, all_criteria


def _images(examples: RewardExamples, rows: np.ndarray, device) -> dict:
    batch = _tensors(examples, rows, device, None)
    return {"images": batch["images"], "class_ids": batch["class_ids"]}


def _copy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


def warmup_steps_of(schedule: str, total_steps: int) -> int:
    """The cosine schedule warms up over the first 5 % of the steps (at least one); the constant one does not."""
    return max(1, round(0.05 * total_steps)) if schedule == "cosine" else 0


def _restore(model: RewardModel) -> tuple[int, dict]:
    """After a worker failure: the best weights so far and the training state; else a fresh state."""
    state = {"epoch": 0, "best_score": math.inf, "best_epoch": 0, "best_metrics": {}, "history": []}
    restored = read_latest_checkpoint(load_reward_model)
    if restored is None:
        return 0, state
    restored, meta = restored
    model.load_state_dict(restored.state_dict())
    state.update(meta["train_state"])
    if state["best_score"] is None:  # JSON has no infinity (_finite)
        state["best_score"] = math.inf
    return state["epoch"], state


def _report_checkpoint(model: RewardModel, best_weights, state: dict, info: dict, metrics: dict) -> None:
    """Rank 0: save the best model so far with save_reward_model and report it as the checkpoint."""
    best = RewardModel(model.config, model.class_names, model.backbone_config)
    best.load_state_dict(best_weights)
    meta = {
        **info,
        "epoch": state["best_epoch"],
        "metrics": state["best_metrics"],
        "history": state["history"],
        "train_state": state,  # what a restarted worker group resumes from
    }
    report_with_checkpoint(metrics, lambda folder: save_reward_model(best.eval(), folder, _finite(meta)))


def _finite(value):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _publish(checkpoint_dir: Path, model_dir: str) -> str | Path:
    """Copy the checkpoint's model files to model_dir (a path: replaced in one rename; a URI: uploaded over it)."""
    with storage.output_dir(model_dir) as staging:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copy2(checkpoint_dir / name, staging / name)
    return storage.location(model_dir)
