"""Finetuning the diffusion model with the reward, on Ray Train with DeepSpeed: the driver's side.

Any generator (pathalign_ray.generator: a pixel UNet, or a latent model with its VAE) and two objectives
(pathalign_ray.generator.objectives), whose steps the workers run (pathalign_ray.generator.finetune_worker):
- rwl, the paper's reward-weighted likelihood: a pool of synthetic samples scored once by the
  reward (over HTTP from the Serve endpoint, or in-process), and real images for the beta term;
  both reach the workers in the generator's model space (a latent model's encoded here, once).
- ddpo, policy gradient: every step each worker samples fresh trajectories with DDIM (eta > 0),
  scores the final images with the reward, and takes PPO-clipped steps on each denoising step's
  log-probability.
Every weight trains under DeepSpeed ZeRO, or with `lora` set only a LoRA adapter does (and only it is
checkpointed); the export is the EMA weights, with LoRA the base model plus the adapter.
Rerunning the same config resumes from the latest checkpoint; a worker that dies is replaced and
the run resumes from its last checkpoint (FailureConfig).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from pathalign_ray import storage
from pathalign_ray.cluster import ScaleConfig, init_ray, trainer_settings
from pathalign_ray.config import (
    FractionBelowOne,
    Location,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
    save_config,
)
from pathalign_ray.data.shards import ray_dataset, read_dataset, read_dataset_info
from pathalign_ray.generator import load_generator
from pathalign_ray.generator.lora import LoraSettings, adapter_config
from pathalign_ray.generator.objectives import class_means
from pathalign_ray.images import decode_image
from pathalign_ray.progress import watch
from pathalign_ray.reward.functions import RewardSourceConfig, make_reward_fn
from pathalign_ray.training import TrainResult, ema_weights, read_checkpoint


@config_dataclass
class ObjectiveConfig:
    kind: Literal["rwl", "ddpo"] = "rwl"
    beta: NonNegativeFloat = 0.3  # weight of the real-data term (the paper's default); 0 drops it
    # rwl: w(r), see objectives.reward_weights
    weighting: Literal["raw", "threshold", "class_normalized", "centred"] = "raw"
    threshold: float = 0.5  # weighting=threshold: reward needed to count
    temperature: float = 1.0  # weighting=class_normalized: softmax temperature
    # rwl: synthetic losses relative to the pretrained model's, clipped to 1 +- this (0: off)
    ratio_clip: FractionBelowOne = 0.0
    clip_range: PositiveFloat = 1e-4  # ddpo: importance-ratio clip (DDPO's default)
    ddim_steps: Annotated[int, Field(ge=2)] = 10  # ddpo: denoising steps per trajectory
    eta: float = 1.0  # ddpo: DDIM stochasticity of the policy (> 0)
    trajectories_per_step: PositiveInt = 8  # ddpo: trajectories sampled per worker per step
    inner_epochs: PositiveInt = 1  # ddpo: passes over each batch of trajectories
    advantage_clip: float = 5.0  # ddpo: advantages clipped to +-this
    kl_coef: float = 0.0  # ddpo: weight of the drift penalty towards the pretrained model

    def __post_init__(self) -> None:
        if self.kind == "ddpo" and self.eta <= 0:
            raise ValueError("ddpo needs eta > 0: a deterministic DDIM step has no log-probability")
        if self.weighting == "centred" and self.ratio_clip == 0:
            raise ValueError(
                "weighting centred needs ratio_clip > 0: its negative weights would raise losses without bound"
            )


@config_dataclass
class FinetuneDataConfig:
    samples: tuple[Location, ...] = ()  # rwl: sample folders or URIs (jobs/sample.py) forming the synthetic pool
    real_dataset: Location = ""  # a data set folder or URI (jobs/make_dataset.py) for the beta term


@config_dataclass
class FinetuneTrainConfig:
    steps: PositiveInt = 200  # optimizer steps in total (ddpo: sample-then-update rounds)
    batch_size: PositiveInt = 16  # images per worker per step, for each term
    lr: float = 1e-5  # AdamW learning rate
    # linear warm-up: AdamW's first steps move every weight by about lr, whatever its gradient
    warmup_steps: NonNegativeInt = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.99  # exported weights are this exponential moving average
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 2
    eval_every: int = 50  # steps between scoring fresh samples (and at the end); 0: only at the end
    eval_per_class: PositiveInt = 4  # fresh samples per class at each evaluation
    eval_ddim_steps: int = 20
    eval_eta: NonNegativeFloat = 0.0  # DDIM stochasticity of those samples (match the sampler the model is judged with)
    seed: int = 0


@config_dataclass
class FinetuneLoraConfig(LoraSettings):
    """LoRA (Hu et al. 2021): only the adapter trains and is checkpointed, the reference model is the UNet with the
    adapter disabled, and the export is the base model folder plus the adapter (diffusers' load_lora_weights)."""

    merged_export: bool = False  # export the adapter folded into the UNet's weights instead: a plain model


@config_dataclass
class FinetuneRecipe:
    """How to finetune, whatever the model and data: the part of FinetuneConfig the loop's rounds share (align)."""

    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    train: FinetuneTrainConfig = dataclasses.field(default_factory=FinetuneTrainConfig)
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig)
    # a LoRA adapter trains (e.g. lora.rank=8), or the one the base model holds; null: every weight, with a frozen
    # copy as the reference
    lora: FinetuneLoraConfig | None = None
    # also the simulated pathologist's verdicts: fresh samples, DDPO trajectories
    evaluate_with_pathologist: bool = True


@config_dataclass
class FinetuneConfig(FinetuneRecipe):
    run_dir: Location = (
        "runs/demo"  # path or URI: checkpoints in RUN_DIR/NAME, the exported model in RUN_DIR/NAME-model
    )
    name: str = "finetune"  # this finetuning run's name inside run_dir
    base_model: Location = (
        "runs/demo/model"  # the model folder or URI to start from: jobs/pretrain.py's, or a latent model's
    )
    data: FinetuneDataConfig = dataclasses.field(default_factory=FinetuneDataConfig)
    reward: RewardSourceConfig = dataclasses.field(default_factory=RewardSourceConfig)

    def __post_init__(self) -> None:
        if self.objective.kind == "rwl" and not self.data.samples:
            raise ValueError("objective rwl needs data.samples: the sample folders to weight")
        if self.objective.beta > 0 and not self.data.real_dataset:
            raise ValueError("objective.beta > 0 needs data.real_dataset")


def finetune(config: FinetuneConfig) -> TrainResult:
    """Finetune on the cluster, export the EMA model to RUN_DIR/NAME-model; return it with the metric history."""
    import ray
    import ray.data
    from ray.train.torch import TorchTrainer

    from pathalign_ray.generator.finetune_worker import train_loop  # cycle: finetune_worker imports finetune

    run_dir = storage.absolute(config.run_dir)
    generator = load_generator(storage.download_dir(config.base_model))
    if config.reward.kind == "model":  # workers load it from another working directory: give them an absolute path
        reward = dataclasses.replace(config.reward, model=storage.absolute(config.reward.model))
        config = dataclasses.replace(config, reward=reward)
    if config.objective.beta > 0:
        _check_real_dataset(config.data.real_dataset, generator)
    _prepare_lora(generator, config.lora, config.train.seed)
    save_config(config, storage.join(run_dir, f"{config.name}.yaml"))
    init_ray(device=config.scale.device)
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {}
    if config.objective.kind == "rwl":
        datasets["synthetic"] = _synthetic_pool(config, generator)
    if config.objective.beta > 0:
        datasets["real"] = _real_images(config.data.real_dataset, generator)
    trainer = TorchTrainer(
        train_loop,
        # the generator travels through the object store: workers on other nodes need no shared storage
        train_loop_config={"config": config, "generator": ray.put(generator)},
        datasets=datasets,
        **trainer_settings(config.scale, config.name, run_dir, config.train.keep_checkpoints),
    )
    with watch(f"finetuning {config.name}", config.train.steps):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"finetuning {config.name} in {run_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:
        return _export(Path(checkpoint_dir), generator, config, run_dir)


def _prepare_lora(generator, lora: FinetuneLoraConfig | None, seed: int) -> None:
    """Add the adapter that trains (seeded: the same initial A on every worker, every rerun), or train on the one
    the base model holds (an earlier round's export, base folder + adapter)."""
    if generator.has_lora:
        held = adapter_config(generator.unet)
        if lora is None or (held["r"], held["lora_alpha"]) != (lora.rank, lora.alpha):
            raise ValueError(
                f"lora: the base model holds a LoRA adapter of rank {held['r']}, alpha {held['lora_alpha']}; "
                "set lora.rank and lora.alpha to match to train it on, or start from a merged export"
            )
        return
    if lora is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator.add_lora(lora)


def _check_real_dataset(dataset: str, generator) -> None:
    """Real labels index the model's classes: the data set's classes must be the model's first ones
    (a model with a new concept, pathalign_ray.generator.concepts, has more classes than its real data); its
    images must have the model's size."""
    info = read_dataset_info(dataset)
    real_classes, class_names = list(info["class_names"]), generator.class_names
    if real_classes != class_names[: len(real_classes)]:
        raise ValueError(f"{dataset}: its classes {real_classes} are not the model's first classes {class_names}")
    if info["image_size"] != generator.image_size:
        raise ValueError(
            f"data.real_dataset: {dataset} holds {info['image_size']} px images, the model makes "
            f"{generator.image_size} px"
        )


def _real_images(dataset: str, generator):
    """The real training split as a Ray Dataset of image (x_0 in model space) and label. A pixel model's
    streams through Ray Data; a latent model's is encoded once, here, and kept in this node's cache for later
    rounds and runs (LatentGenerator.encode_cached names the file after the images and the VAE)."""
    import ray.data

    if generator.kind == "pixel":
        return ray_dataset(dataset, "train").materialize()
    real = read_dataset(dataset, "train")
    latents = generator.encode_cached(real.images, storage.cache_root() / "latents").numpy()
    return ray.data.from_items(
        [{"image": latents[i], "label": int(label)} for i, label in enumerate(real.labels)]
    ).materialize()


def _synthetic_pool(config: FinetuneConfig, generator):
    """The rwl pool as a Ray Dataset: image (x_0 in model space: (3, H, W) pixels in [-1, 1], or the VAE's
    latents), label, reward (scored once, here, on the images) and baseline (the mean reward of the sample's
    class over the pool, for centred weights)."""
    import ray.data

    from pathalign_ray.generator.diffusion import to_model_input  # heavy: diffusion imports diffusers
    from pathalign_ray.generator.sampling import read_manifest  # heavy: sampling imports diffusers

    class_names, size = generator.class_names, generator.image_size
    images, classes = [], []
    for folder in config.data.samples:
        for row in read_manifest(folder).to_pylist():
            if row["declared_class"] not in class_names:
                raise ValueError(
                    f"{folder}: sample {row['sample_id']} declares unknown class {row['declared_class']!r}"
                )
            path = storage.join(folder, row["path"])
            images.append(decode_image(storage.read_bytes(path), size, name=path))
            classes.append(row["declared_class"])
    images = np.stack(images)
    rewards, reward_info = make_reward_fn(config.reward)(images, classes)
    print(f"scored {len(images)} synthetic samples with {reward_info.get('source')}: mean reward {rewards.mean():.3f}")
    tensors = generator.encode(to_model_input(images)).cpu().numpy()
    labels = [class_names.index(name) for name in classes]
    baselines = class_means(torch.as_tensor(rewards, dtype=torch.float32), torch.tensor(labels)).tolist()
    return ray.data.from_items(
        [
            {"image": tensors[i], "label": labels[i], "reward": float(rewards[i]), "baseline": baselines[i]}
            for i in range(len(images))
        ]
    ).materialize()


def _export(checkpoint_dir: Path, generator, config: FinetuneConfig, run_dir: str) -> TrainResult:
    """The checkpoint's EMA weights (every weight, or the adapter's) in the generator, saved (generator.save)."""
    ema, state = read_checkpoint(checkpoint_dir)
    info = {
        "model_id": f"{Path(run_dir).name}-{config.name}",
        "step": state["step"],
        "base_model": generator.info.get("model_id"),
        "objective": config.objective.kind,
    }
    merged = config.lora is not None and config.lora.merged_export
    model_dir = storage.join(run_dir, f"{config.name}-model")
    with ema_weights(generator.unet, ema), storage.output_dir(model_dir) as folder:
        generator.save(folder, info, merged=merged)
    history = "".join(json.dumps(row) + "\n" for row in state["history"])
    storage.write_bytes(storage.join(run_dir, f"{config.name}_metrics.jsonl"), history.encode())
    return TrainResult(storage.location(model_dir), state["history"])
