"""One Ray Train worker of the finetuning job (generator.finetune): the generator under a DeepSpeed engine, each
objective's step through the generator interface (pathalign_ray.generator), checkpoints and resume.

The steps work in the generator's model space: pixels for a pixel model, VAE latents for a latent one (the
data sets arrive encoded); DDPO decodes its final latents to images for the reward. The reference model (the
ratio clip, the KL term) is `generator.reference()`: the UNet with its LoRA adapter disabled, or a frozen copy
of the base weights under full finetuning.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pathalign_ray.experts.pathologist import judge
from pathalign_ray.generator.diffusion import draw_noise_and_timesteps, namespaced_seed, noise_prediction_loss, to_uint8
from pathalign_ray.generator.finetune import FinetuneConfig
from pathalign_ray.generator.objectives import (
    PerClassRewardStats,
    clipped_policy_loss,
    reward_weighted_loss,
    reward_weights,
)
from pathalign_ray.progress import report_progress
from pathalign_ray.reward.functions import make_reward_fn
from pathalign_ray.training import (
    MetricsWindow,
    build_engine,
    checkpoint_due,
    cycle_batches,
    ema_weights,
    init_ema,
    log_and_report,
    mean_over_workers,
    restore_checkpoint,
    update_ema,
    worker_setup,
)


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: take the generator (with its adapter, when LoRA is on), run the objective,
    checkpoint, resume."""
    import ray

    config: FinetuneConfig = loop_config["config"]
    rank, world_size, device = worker_setup(config.scale)
    generator = ray.get(loop_config["generator"])
    generator.unet.train()
    if config.lora is None:
        generator.keep_reference()
    generator.to(device)
    accumulation = 1
    if config.objective.kind == "ddpo":
        accumulation = (
            config.objective.ddim_steps - 1
        ) * config.objective.inner_epochs  # the last step is deterministic
    engine, _ = build_engine(
        generator.unet,
        config.scale,
        config.train.lr,
        config.train.batch_size,
        config.train.grad_clip,
        warmup_steps=config.train.warmup_steps,
        accumulation_steps=accumulation,
    )
    generator.denoiser = engine
    ema = init_ema(generator.unet)
    state = restore_checkpoint(engine, ema) or {"step": 0, "history": [], "advantage_stats": {}}
    if rank == 0 and state["step"]:
        print(f"resumed {config.name} at step {state['step']}")
    job = _Job(
        config=config,
        generator=generator,
        rank=rank,
        world_size=world_size,
        device=device,
        engine=engine,
        ema=ema,
        reward_fn=make_reward_fn(config.reward),
        state=state,
    )
    job.run()


@dataclasses.dataclass
class _Job:
    """The state of one worker's finetuning loop, so each objective's step is a short method."""

    config: FinetuneConfig
    generator: object  # a generator.Generator whose denoiser is `engine`
    rank: int
    world_size: int
    device: torch.device
    engine: object
    ema: dict
    reward_fn: object
    state: dict

    def run(self) -> None:
        import ray.train

        train = self.config.train
        self.dtype = self.generator.dtype
        seed = namespaced_seed("train", train.seed, self.rank, self.state["step"])
        self.rng = torch.Generator().manual_seed(seed)
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
                report_progress(
                    f"finetuning {self.config.name}", step, f"reward {metrics.get('reward_mean', float('nan')):.3f}"
                )
            checkpoint_now = checkpoint_due(step, train.checkpoint_every, train.steps)
            evaluate_now = step == train.steps or (train.eval_every and step % train.eval_every == 0)
            if step % train.log_every == 0 or checkpoint_now or evaluate_now:
                metrics = mean_over_workers(metrics, self.world_size)
                step_time = window.close()
                metrics.update(step=step, step_time_s=step_time, images_per_s=self._images_per_step() / step_time)
                if evaluate_now:
                    metrics.update(self._evaluate_fresh_samples())
                log_and_report(
                    self.config.name, metrics, self.state, self.engine, self.ema, self.rank, train.steps, checkpoint_now
                )

    def _images_per_step(self) -> int:
        """Images one optimizer step trains on, over all workers: synthetic (+ real) batches, or trajectories."""
        if self.config.objective.kind == "ddpo":
            return self.config.objective.trajectories_per_step * self.world_size
        return self.config.train.batch_size * (2 if self.real is not None else 1) * self.world_size

    def _rwl_step(self) -> dict:
        """The paper's objective on one batch of x_0 in model space: both terms at the same timesteps, one forward pass."""
        objective = self.config.objective
        model = self.generator
        batch = next(self.synthetic)
        x0, labels, rewards = batch["image"], batch["label"], batch["reward"]
        count = len(x0)
        noise, timesteps = draw_noise_and_timesteps(
            count, x0.shape[1:], model.noise_scheduler.config.num_train_timesteps, self.rng
        )
        if self.real is not None:
            real = next(self.real)
            real_noise = torch.randn(real["image"].shape, generator=self.rng)
            x0, labels = torch.cat([x0, real["image"]]), torch.cat([labels, real["label"]])
            noise, timesteps = torch.cat([noise, real_noise]), torch.cat([timesteps, timesteps])
        on_device = (
            x0.to(self.device, self.dtype),
            labels.to(self.device),
            noise.to(self.device, self.dtype),
            timesteps.to(self.device),
        )
        losses = model.loss_per_sample(*on_device)
        weights = reward_weights(
            rewards,
            objective.weighting,
            objective.threshold,
            class_ids=labels[:count],
            temperature=objective.temperature,
            baselines=batch["baseline"],
        ).to(losses.device)
        real_losses = losses[count:] if self.real is not None else None
        synthetic_x0, synthetic_labels, synthetic_noise, synthetic_timesteps = (t[:count] for t in on_device)
        # one pass of the pretrained model feeds the ratio clip and the drift metric
        noisy, base_prediction = model.predict_noise(
            synthetic_x0, synthetic_labels, synthetic_noise, synthetic_timesteps, reference=True
        )
        reference_losses = None
        if objective.ratio_clip > 0:
            target = model.loss_target(synthetic_x0, synthetic_noise, synthetic_timesteps)
            reference_losses = noise_prediction_loss(base_prediction, target)
        loss, metrics = reward_weighted_loss(
            losses[:count], weights, real_losses, objective.beta, reference_losses, objective.ratio_clip
        )
        self.engine.backward(loss)
        self.engine.step()
        metrics.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()))
        metrics["kl_to_base"] = self._drift(noisy, synthetic_labels, synthetic_timesteps, base_prediction)
        return metrics

    def _ddpo_step(self) -> dict:
        """Sample trajectories, score their decoded images, normalise advantages per class, take clipped steps."""
        objective = self.config.objective
        model = self.generator
        trajectory = self._sample_trajectories()
        class_ids = trajectory["class_ids"]
        images = to_uint8(model.decode(trajectory["latents"][-1]))
        rewards, _ = self.reward_fn(images, [model.class_names[i] for i in class_ids.tolist()])
        advantages = self._advantages(rewards, class_ids.numpy())
        advantages = torch.as_tensor(advantages, dtype=torch.float32).clamp(
            -objective.advantage_clip, objective.advantage_clip
        )
        labels = class_ids.to(self.device)
        collected: list[dict] = []
        for _ in range(objective.inner_epochs):
            for j, (t, prev_t) in enumerate(trajectory["timesteps"]):
                sample = trajectory["latents"][j].to(self.device, self.dtype)
                log_prob, model_output = model.step_log_prob(
                    sample, trajectory["latents"][j + 1].to(self.device), t, prev_t, labels, objective.eta
                )
                loss, metrics = clipped_policy_loss(
                    log_prob,
                    trajectory["log_probs"][j].to(self.device),
                    advantages.to(self.device),
                    objective.clip_range,
                )
                if objective.kl_coef > 0:
                    reference_output = model.denoise(sample, t, labels, reference=True)
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
        objective = self.config.objective
        count = objective.trajectories_per_step
        classes = len(self.generator.class_names)
        first = (self.state["step"] * self.world_size + self.rank) * count
        class_ids = torch.tensor([(first + i) % classes for i in range(count)])
        trajectory = self.generator.trajectories(
            class_ids.to(self.device), objective.ddim_steps, objective.eta, self.rng
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
        """Mean squared difference of the model's output from the base model's: for Gaussian steps of equal
        variance, the KL between the two models' denoising steps is proportional to it."""
        ours = self.generator.denoise(noisy, timesteps, labels).float()
        return float(((ours - base_prediction.float()) ** 2).mean())

    def _evaluate_fresh_samples(self) -> dict:
        """Rank 0 samples eval_per_class images per class (DDIM at eval_ddim_steps, eval_eta; fixed seeds in the
        "check" namespace) from the EMA weights, the model the job exports, and scores them."""
        if self.rank != 0:
            return {}
        train = self.config.train
        class_names = self.generator.class_names
        labels = torch.arange(len(class_names)).repeat_interleave(train.eval_per_class)
        seeds = [
            namespaced_seed("check", train.seed, int(c), j % train.eval_per_class)
            for j, c in enumerate(labels.tolist())
        ]
        with ema_weights(self.generator.unet, self.ema):
            images = self.generator.sample_uint8(labels.to(self.device), seeds, train.eval_ddim_steps, train.eval_eta)
        rewards, _ = self.reward_fn(images, [class_names[i] for i in labels.tolist()])
        metrics = {"fresh_reward_mean": float(np.mean(rewards))}
        if self.config.evaluate_with_pathologist:
            metrics["fresh_plausibility"] = self._plausibility(images, labels.tolist())
        return metrics

    def _plausibility(self, images: np.ndarray, class_ids: list[int]) -> float:
        """The simulated pathologist's fraction of plausible images (about 2 ms an image)."""
        class_names = self.generator.class_names
        return float(np.mean([judge(image, class_names[c]).plausible for image, c in zip(images, class_ids)]))
