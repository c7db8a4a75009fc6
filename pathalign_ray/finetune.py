"""Finetuning the diffusion model with the reward, on Ray Train with DeepSpeed.

Two objectives (pathalign_ray.objectives):
- rwl, the paper's reward-weighted likelihood: a pool of synthetic samples scored once by the
  reward (over HTTP from the Serve endpoint, or in-process), and real images for the beta term.
- ddpo, policy gradient: every step each worker samples fresh trajectories with DDIM (eta > 0),
  scores the final images with the reward, and takes PPO-clipped steps on each denoising step's
  log-probability.
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
from pathalign_ray.diffusion import namespaced_seed
from pathalign_ray.progress import report_progress, watch
from pathalign_ray.reward.functions import RewardSourceConfig
from pathalign_ray.training import TrainResult


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
            raise ValueError("weighting centred needs ratio_clip > 0: its negative weights would raise losses without bound")


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
class FinetuneRecipe:
    """How to finetune, whatever the model and data: the part of FinetuneConfig the loop's rounds share (align)."""

    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    train: FinetuneTrainConfig = dataclasses.field(default_factory=FinetuneTrainConfig)
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig)
    # also the simulated pathologist's verdicts: fresh samples, DDPO trajectories
    evaluate_with_pathologist: bool = True


@config_dataclass
class FinetuneConfig(FinetuneRecipe):
    run_dir: Location = "runs/demo"  # path or URI: checkpoints in RUN_DIR/NAME, the exported model in RUN_DIR/NAME-model
    name: str = "finetune"  # this finetuning run's name inside run_dir
    base_model: Location = "runs/demo/model"  # the exported model to start from (jobs/pretrain.py)
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

    from pathalign_ray.diffusion import load_model

    run_dir = storage.absolute(config.run_dir)
    unet, ddim, class_names, info = load_model(storage.download_dir(config.base_model))
    if config.reward.kind == "model":  # workers load it from another working directory: give them an absolute path
        reward = dataclasses.replace(config.reward, model=storage.absolute(config.reward.model))
        config = dataclasses.replace(config, reward=reward)
    if config.objective.beta > 0:
        _check_real_classes(config.data.real_dataset, class_names)
    save_config(config, storage.join(run_dir, f"{config.name}.yaml"))
    init_ray(device=config.scale.device)
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {}
    if config.objective.kind == "rwl":
        datasets["synthetic"] = _synthetic_pool(config, class_names, unet.config.sample_size)
    if config.objective.beta > 0:
        from pathalign_ray.data.shards import ray_dataset

        datasets["real"] = ray_dataset(config.data.real_dataset, "train").materialize()
    base = ray.put((dict(unet.config), unet.state_dict(), dict(ddim.config)))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "class_names": class_names, "base": base, "base_info": info},
        datasets=datasets,
        **trainer_settings(config.scale, config.name, run_dir, config.train.keep_checkpoints),
    )
    with watch(f"finetuning {config.name}", config.train.steps):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"finetuning {config.name} in {run_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:
        return _export(Path(checkpoint_dir), unet, ddim, class_names, info, config, run_dir)


def _check_real_classes(dataset: str, class_names: list[str]) -> None:
    """Real labels index the model's classes: the data set's classes must be the model's first ones
    (a model with a new concept, pathalign_ray.concepts, has more classes than its real data)."""
    from pathalign_ray.data.shards import read_dataset_info

    real_classes = list(read_dataset_info(dataset)["class_names"])
    if real_classes != class_names[: len(real_classes)]:
        raise ValueError(f"{dataset}: its classes {real_classes} are not the model's first classes {class_names}")


def _synthetic_pool(config: FinetuneConfig, class_names: list[str], size: int):
    """The rwl pool as a Ray Dataset: image (3, H, W) in [-1, 1], label, reward (scored once, here) and
    baseline (the mean reward of the sample's class over the pool, for centred weights)."""
    import ray.data

    from pathalign_ray.diffusion import to_model_input
    from pathalign_ray.images import decode_image
    from pathalign_ray.objectives import class_means
    from pathalign_ray.reward.functions import make_reward_fn
    from pathalign_ray.sampling import read_manifest

    images, classes = [], []
    for folder in config.data.samples:
        for row in read_manifest(folder).to_pylist():
            if row["declared_class"] not in class_names:
                raise ValueError(f"{folder}: sample {row['sample_id']} declares unknown class {row['declared_class']!r}")
            path = storage.join(folder, row["path"])
            images.append(decode_image(storage.read_bytes(path), size, name=path))
            classes.append(row["declared_class"])
    images = np.stack(images)
    rewards, reward_info = make_reward_fn(config.reward)(images, classes)
    print(f"scored {len(images)} synthetic samples with {reward_info.get('source')}: mean reward {rewards.mean():.3f}")
    tensors = to_model_input(images).numpy()
    labels = [class_names.index(name) for name in classes]
    baselines = class_means(torch.as_tensor(rewards, dtype=torch.float32), torch.tensor(labels)).tolist()
    return ray.data.from_items(
        [
            {"image": tensors[i], "label": labels[i], "reward": float(rewards[i]), "baseline": baselines[i]}
            for i in range(len(images))
        ]
    ).materialize()


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: load the base model, run the objective, checkpoint, resume."""
    import ray
    import ray.train
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    from pathalign_ray.reward.functions import make_reward_fn
    from pathalign_ray.training import build_engine, init_ema, restore_checkpoint, worker_setup

    config: FinetuneConfig = loop_config["config"]
    class_names: list[str] = loop_config["class_names"]
    rank, world_size, device = worker_setup(config.scale)
    unet_config, state_dict, ddim_config = ray.get(loop_config["base"])
    unet = UNet2DModel.from_config(unet_config)
    unet.load_state_dict(state_dict)
    reference = UNet2DModel.from_config(unet_config)
    reference.load_state_dict(state_dict)
    reference.to(device).eval().requires_grad_(False)
    ddim = DDIMScheduler.from_config(ddim_config)
    accumulation = 1
    if config.objective.kind == "ddpo":
        accumulation = (config.objective.ddim_steps - 1) * config.objective.inner_epochs  # the last step is deterministic
    engine, _ = build_engine(
        unet, config.scale, config.train.lr, config.train.batch_size, config.train.grad_clip,
        warmup_steps=config.train.warmup_steps, accumulation_steps=accumulation,
    )
    ema = init_ema(engine.module)
    state = restore_checkpoint(engine, ema) or {"step": 0, "history": [], "advantage_stats": {}}
    if rank == 0 and state["step"]:
        print(f"resumed {config.name} at step {state['step']}")
    job = _Job(
        config=config,
        class_names=class_names,
        rank=rank,
        world_size=world_size,
        device=device,
        engine=engine,
        ema=ema,
        reference=reference,
        noise_scheduler=DDPMScheduler.from_config(ddim_config),
        ddim=ddim,
        reward_fn=make_reward_fn(config.reward),
        state=state,
    )
    job.run()


@dataclasses.dataclass
class _Job:
    """The state of one worker's finetuning loop, so each objective's step is a short method."""

    config: FinetuneConfig
    class_names: list[str]
    rank: int
    world_size: int
    device: torch.device
    engine: object
    ema: dict
    reference: torch.nn.Module
    noise_scheduler: object
    ddim: object
    reward_fn: object
    state: dict

    def run(self) -> None:
        import ray.train

        from pathalign_ray.objectives import PerClassRewardStats
        from pathalign_ray.training import (
            MetricsWindow,
            checkpoint_due,
            cycle_batches,
            log_and_report,
            mean_over_workers,
            update_ema,
        )

        train = self.config.train
        self.dtype = next(self.engine.module.parameters()).dtype
        seed = namespaced_seed("train", train.seed, self.rank, self.state["step"])
        self.generator = torch.Generator().manual_seed(seed)
        self.synthetic = self.real = None
        if self.config.objective.kind == "rwl":
            self.synthetic = cycle_batches(ray.train.get_dataset_shard("synthetic"), train.batch_size, seed)
        if self.config.objective.beta > 0:
            self.real = cycle_batches(ray.train.get_dataset_shard("real"), train.batch_size, seed + 1)
        self.advantage_stats = PerClassRewardStats()
        self.advantage_stats.load_state(self.state.get("advantage_stats", {}))
        step_fn = self._rwl_step if self.config.objective.kind == "rwl" else self._ddpo_step
        window = MetricsWindow()
        while self.state["step"] < train.steps:
            metrics = step_fn()
            update_ema(self.ema, self.engine.module, train.ema_decay)
            self.state["step"] += 1
            step = self.state["step"]
            window.step()
            if self.rank == 0:
                report_progress(f"finetuning {self.config.name}", step, f"reward {metrics.get('reward_mean', float('nan')):.3f}")
            checkpoint_now = checkpoint_due(step, train.checkpoint_every, train.steps)
            evaluate_now = step == train.steps or (train.eval_every and step % train.eval_every == 0)
            if step % train.log_every == 0 or checkpoint_now or evaluate_now:
                metrics = mean_over_workers(metrics, self.world_size)
                step_time = window.close()
                metrics.update(step=step, step_time_s=step_time, images_per_s=self._images_per_step() / step_time)
                if evaluate_now:
                    metrics.update(self._evaluate_fresh_samples())
                log_and_report(self.config.name, metrics, self.state, self.engine, self.ema, self.rank, train.steps, checkpoint_now)

    def _images_per_step(self) -> int:
        """Images one optimizer step trains on, over all workers: synthetic (+ real) batches, or trajectories."""
        if self.config.objective.kind == "ddpo":
            return self.config.objective.trajectories_per_step * self.world_size
        return self.config.train.batch_size * (2 if self.real is not None else 1) * self.world_size

    def _rwl_step(self) -> dict:
        """The paper's objective on one batch: both terms at the same timesteps, one forward pass."""
        from pathalign_ray.diffusion import (
            diffusion_loss_per_sample,
            draw_noise_and_timesteps,
            noise_prediction_loss,
            predict_noise,
        )
        from pathalign_ray.objectives import reward_weighted_loss, reward_weights

        objective = self.config.objective
        batch = next(self.synthetic)
        images, labels, rewards = batch["image"], batch["label"], batch["reward"]
        count = len(images)
        noise, timesteps = draw_noise_and_timesteps(
            count, images.shape[-1], self.noise_scheduler.config.num_train_timesteps, self.generator
        )
        if self.real is not None:
            real = next(self.real)
            real_noise = torch.randn(real["image"].shape, generator=self.generator)
            images, labels = torch.cat([images, real["image"]]), torch.cat([labels, real["label"]])
            noise, timesteps = torch.cat([noise, real_noise]), torch.cat([timesteps, timesteps])
        on_device = (images.to(self.device, self.dtype), labels.to(self.device),
                     noise.to(self.device, self.dtype), timesteps.to(self.device))
        losses = diffusion_loss_per_sample(self.engine, self.noise_scheduler, *on_device)
        weights = reward_weights(
            rewards, objective.weighting, objective.threshold, class_ids=labels[:count],
            temperature=objective.temperature, baselines=batch["baseline"],
        ).to(losses.device)
        real_losses = losses[count:] if self.real is not None else None
        synthetic_images, synthetic_labels, synthetic_noise, synthetic_timesteps = (t[:count] for t in on_device)
        with torch.no_grad():  # one pass of the pretrained model feeds the ratio clip and the drift metric
            noisy, base_prediction = predict_noise(self.reference, self.noise_scheduler, synthetic_images,
                                                   synthetic_labels, synthetic_noise, synthetic_timesteps)
        reference_losses = noise_prediction_loss(base_prediction, synthetic_noise) if objective.ratio_clip > 0 else None
        loss, metrics = reward_weighted_loss(
            losses[:count], weights, real_losses, objective.beta, reference_losses, objective.ratio_clip
        )
        self.engine.backward(loss)
        self.engine.step()
        metrics.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()))
        metrics["kl_to_base"] = self._drift(noisy, synthetic_labels, synthetic_timesteps, base_prediction)
        return metrics

    def _ddpo_step(self) -> dict:
        """Sample trajectories, score them, normalise advantages per class, take clipped steps."""
        from pathalign_ray.diffusion import to_uint8
        from pathalign_ray.objectives import clipped_policy_loss, ddim_step_with_log_prob

        objective = self.config.objective
        trajectory = self._sample_trajectories()
        class_ids = trajectory["class_ids"]
        images = to_uint8(trajectory["latents"][-1])
        rewards, _ = self.reward_fn(images, [self.class_names[i] for i in class_ids.tolist()])
        advantages = self._advantages(rewards, class_ids.numpy())
        advantages = torch.as_tensor(advantages, dtype=torch.float32).clamp(-objective.advantage_clip, objective.advantage_clip)
        collected: list[dict] = []
        for _ in range(objective.inner_epochs):
            for j, (t, prev_t) in enumerate(trajectory["timesteps"]):
                sample = trajectory["latents"][j].to(self.device, self.dtype)
                labels = class_ids.to(self.device)
                model_output = self.engine(sample, t, class_labels=labels).sample
                _, log_prob = ddim_step_with_log_prob(
                    self.ddim.alphas_cumprod.to(self.device), self.ddim.final_alpha_cumprod.to(self.device),
                    model_output.float(), t, prev_t, sample.float(), objective.eta,
                    prev_sample=trajectory["latents"][j + 1].to(self.device).float(),
                )
                loss, metrics = clipped_policy_loss(log_prob, trajectory["log_probs"][j].to(self.device), advantages.to(self.device), objective.clip_range)
                if objective.kl_coef > 0:
                    with torch.no_grad():
                        reference_output = self.reference(sample, t, class_labels=labels).sample
                    drift = ((model_output.float() - reference_output.float()) ** 2).mean()
                    loss = loss + objective.kl_coef * drift
                    metrics["kl_to_base"] = float(drift.detach())
                self.engine.backward(loss)
                self.engine.step()
                collected.append(metrics)
        metrics = {key: float(np.mean([m[key] for m in collected])) for key in collected[0]}
        metrics.update(reward_mean=float(np.mean(rewards)), reward_std=float(np.std(rewards)))
        if self.config.evaluate_with_pathologist:  # the reward's own view next to the judge it stands in for
            metrics["trajectory_plausibility"] = self._plausibility(images, class_ids.tolist())
        return metrics

    def _sample_trajectories(self) -> dict:
        """This step's trajectories from the current policy, classes in turn over steps and workers."""
        from pathalign_ray.objectives import ddim_trajectories

        objective = self.config.objective
        count = objective.trajectories_per_step
        first = (self.state["step"] * self.world_size + self.rank) * count
        class_ids = torch.tensor([(first + i) % len(self.class_names) for i in range(count)])
        trajectory = ddim_trajectories(
            self.engine.module, self.ddim, class_ids.to(self.device), objective.ddim_steps, objective.eta,
            self.generator, self.dtype,
        )
        return {**trajectory, "class_ids": class_ids}

    def _advantages(self, rewards: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        """Per-class normalised advantages over every worker's rewards; this worker's slice."""
        gathered = [(rewards, class_ids)]
        if self.world_size > 1:
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, (rewards, class_ids))
        all_rewards = np.concatenate([g[0] for g in gathered])
        all_classes = np.concatenate([g[1] for g in gathered])
        advantages = self.advantage_stats.advantages(all_rewards, all_classes)
        self.state["advantage_stats"] = self.advantage_stats.state()
        return advantages[self.rank * len(rewards) : (self.rank + 1) * len(rewards)]

    @torch.no_grad()
    def _drift(self, noisy, labels, timesteps, base_prediction) -> float:
        """Mean squared difference of predicted noise from the base model's: for Gaussian steps of equal
        variance, the KL between the two models' denoising steps is proportional to it."""
        ours = self.engine.module(noisy, timesteps, class_labels=labels).sample.float()
        return float(((ours - base_prediction.float()) ** 2).mean())

    def _evaluate_fresh_samples(self) -> dict:
        """Rank 0 samples eval_per_class images per class (DDIM at eval_ddim_steps, eval_eta; fixed seeds in the
        "check" namespace) from the EMA weights, the model the job exports, and scores them."""
        if self.rank != 0:
            return {}
        from diffusers import DDIMScheduler

        from pathalign_ray.diffusion import ddim_sample, to_uint8
        from pathalign_ray.training import ema_weights

        train = self.config.train
        labels = torch.arange(len(self.class_names)).repeat_interleave(train.eval_per_class)
        seeds = [
            namespaced_seed("check", train.seed, int(c), j % train.eval_per_class) for j, c in enumerate(labels.tolist())
        ]
        scheduler = DDIMScheduler.from_config(self.ddim.config)
        with ema_weights(self.engine.module, self.ema) as unet:
            images = ddim_sample(unet, scheduler, labels.to(self.device), seeds, train.eval_ddim_steps, train.eval_eta)
        images = to_uint8(images)
        classes = [self.class_names[i] for i in labels.tolist()]
        rewards, _ = self.reward_fn(images, classes)
        metrics = {"fresh_reward_mean": float(np.mean(rewards))}
        if self.config.evaluate_with_pathologist:
            metrics["fresh_plausibility"] = self._plausibility(images, labels.tolist())
        return metrics

    def _plausibility(self, images: np.ndarray, class_ids: list[int]) -> float:
        """The simulated pathologist's fraction of plausible images (about 2 ms an image)."""
        from pathalign_ray.pathologist import judge

        return float(np.mean([judge(image, self.class_names[c]).plausible for image, c in zip(images, class_ids)]))


def _export(checkpoint_dir: Path, unet, ddim, class_names, base_info, config: FinetuneConfig, run_dir: str) -> TrainResult:
    from pathalign_ray.diffusion import export_model
    from pathalign_ray.training import read_checkpoint

    ema, state = read_checkpoint(checkpoint_dir)
    unet.load_state_dict(ema, strict=True)
    info = {
        "model_id": f"{Path(run_dir).name}-{config.name}",
        "step": state["step"],
        "base_model": base_info.get("model_id"),
        "objective": config.objective.kind,
    }
    model_dir = storage.join(run_dir, f"{config.name}-model")
    with storage.output_dir(model_dir) as folder:
        export_model(unet, ddim, class_names, folder, info)
    history = "".join(json.dumps(row) + "\n" for row in state["history"])
    storage.write_bytes(storage.join(run_dir, f"{config.name}_metrics.jsonl"), history.encode())
    return TrainResult(storage.location(model_dir), state["history"])
