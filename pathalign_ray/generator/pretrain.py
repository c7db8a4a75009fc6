"""Pretraining the class-conditional diffusion model on Ray Train with DeepSpeed.

`pretrain(config)` runs on the driver: it reads the data set through Ray Data, starts a
TorchTrainer whose workers run `train_loop`, and exports the EMA weights of the last checkpoint
as a diffusers folder. Rerunning the same config resumes from the latest checkpoint. run_dir and the
data set may be URIs (pathalign_ray.storage): checkpoints then go to the bucket through Ray Train, the
data set is read from it by Ray Data, and the export is uploaded to it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from pathalign_ray import storage
from pathalign_ray.cluster import ScaleConfig, init_ray, trainer_settings
from pathalign_ray.config import FractionBelowOne, Location, PositiveFloat, PositiveInt, config_dataclass, save_config
from pathalign_ray.data.shards import ray_dataset, read_dataset_info
from pathalign_ray.generator.diffusion import (
    ModelConfig,
    build_noise_scheduler,
    build_unet,
    derive_seed,
    diffusion_loss_per_sample,
    draw_noise_and_timesteps,
    export_model,
)
from pathalign_ray.progress import report_progress, watch
from pathalign_ray.training import (
    MetricsWindow,
    TrainResult,
    build_engine,
    checkpoint_due,
    cycle_batches,
    init_ema,
    log_and_report,
    mean_over_workers,
    read_checkpoint,
    restore_checkpoint,
    update_ema,
    worker_setup,
)


@config_dataclass
class PretrainDataConfig:
    dataset: Location = "runs/demo/data"  # a folder or URI written by jobs/make_dataset.py


@config_dataclass
class PretrainTrainConfig:
    steps: PositiveInt = 2000  # optimizer steps in total; every worker takes each step together
    batch_size: PositiveInt = 32  # images per worker per step
    lr: PositiveFloat = 2e-4  # AdamW peak learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear learning-rate warm-up
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: FractionBelowOne = 0.999  # exported weights are this exponential moving average
    log_every: PositiveInt = 20  # steps between reported metrics
    checkpoint_every: PositiveInt = 500  # steps between checkpoints (the last step always checkpoints)
    keep_checkpoints: PositiveInt = 2  # checkpoints kept on storage
    seed: int = 0  # noise and timestep draws; a resumed run continues the same stream


@config_dataclass
class PretrainConfig:
    run_dir: Location = (
        "runs/demo"  # a path or URI: checkpoints go to RUN_DIR/pretrain, the exported model to RUN_DIR/model
    )
    data: PretrainDataConfig = dataclasses.field(default_factory=PretrainDataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: PretrainTrainConfig = dataclasses.field(default_factory=PretrainTrainConfig)
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig)


def pretrain(config: PretrainConfig) -> TrainResult:
    """Train on the cluster, then export the EMA model to RUN_DIR/model; return it with the metric history."""
    import ray.data
    from ray.train.torch import TorchTrainer

    info = read_dataset_info(config.data.dataset)
    if info["image_size"] != config.model.sample_size:
        raise ValueError(
            f"model.sample_size is {config.model.sample_size} but {config.data.dataset} holds "
            f"{info['image_size']} px images"
        )
    run_dir = storage.absolute(config.run_dir)
    save_config(config, storage.join(run_dir, "pretrain.yaml"))
    init_ray(device=config.scale.device)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per epoch drowns the training log
    train_set = ray_dataset(config.data.dataset, "train").materialize()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "class_names": list(info["class_names"])},
        datasets={"train": train_set},
        **trainer_settings(config.scale, "pretrain", run_dir, config.train.keep_checkpoints),
    )
    with watch("pretraining", config.train.steps):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining in {run_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:
        return _export_checkpoint(Path(checkpoint_dir), config, run_dir)


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: a DeepSpeed engine over the UNet, resumed from the latest checkpoint."""
    import ray.train

    config: PretrainConfig = loop_config["config"]
    class_names: list[str] = loop_config["class_names"]
    rank, world_size, device = worker_setup(config.scale)
    unet = build_unet(config.model, num_classes=len(class_names))
    scheduler = build_noise_scheduler(config.model)
    engine, lr_schedule = build_engine(
        unet,
        config.scale,
        lr=config.train.lr,
        batch_size=config.train.batch_size,
        grad_clip=config.train.grad_clip,
        warmup_steps=config.train.warmup_steps,
        weight_decay=config.train.weight_decay,
    )
    ema = init_ema(engine.module)
    state = restore_checkpoint(engine, ema) or {"step": 0, "history": [], "class_names": class_names}
    if rank == 0 and state["step"]:
        print(f"resumed pretraining at step {state['step']}")

    seed = derive_seed(config.train.seed, rank, state["step"])
    batches = cycle_batches(ray.train.get_dataset_shard("train"), config.train.batch_size, seed)
    generator = torch.Generator().manual_seed(seed)
    model_dtype = next(engine.module.parameters()).dtype
    window = MetricsWindow()
    while state["step"] < config.train.steps:
        batch = next(batches)
        images = batch["image"].to(device, model_dtype)
        labels = batch["label"].to(device)
        noise, timesteps = draw_noise_and_timesteps(
            len(images), images.shape[1:], config.model.num_train_timesteps, generator
        )
        loss = diffusion_loss_per_sample(
            engine, scheduler, images, labels, noise.to(device, model_dtype), timesteps.to(device)
        ).mean()
        engine.backward(loss)
        engine.step()
        update_ema(ema, engine.module, config.train.ema_decay)
        state["step"] += 1
        step = state["step"]
        window.step()
        if rank == 0:
            report_progress("pretraining", step, f"loss {float(loss):.4f}")
        checkpoint_now = checkpoint_due(step, config.train.checkpoint_every, config.train.steps)
        if step % config.train.log_every == 0 or checkpoint_now:
            step_time = window.close()
            metrics = {
                "step": step,
                **mean_over_workers({"loss": loss}, world_size),
                "images_per_s": len(images) * world_size / step_time,
                "step_time_s": step_time,
                "lr": lr_schedule.get_last_lr()[0],
            }
            log_and_report("pretrain", metrics, state, engine, ema, rank, config.train.steps, checkpoint_now)


def _export_checkpoint(checkpoint_dir: Path, config: PretrainConfig, run_dir: str) -> TrainResult:
    ema, state = read_checkpoint(checkpoint_dir)
    unet = build_unet(config.model, num_classes=len(state["class_names"]))
    unet.load_state_dict(ema, strict=True)
    info = {"model_id": f"{Path(run_dir).name}-pretrain", "step": state["step"], "dataset": config.data.dataset}
    scheduler = DDIMScheduler.from_config(build_noise_scheduler(config.model).config)
    model_dir = storage.join(run_dir, "model")
    with storage.output_dir(model_dir) as folder:
        export_model(unet, scheduler, state["class_names"], folder, info)
    history = "".join(json.dumps(row) + "\n" for row in state["history"])
    storage.write_bytes(storage.join(run_dir, "pretrain_metrics.jsonl"), history.encode())
    return TrainResult(storage.location(model_dir), state["history"])
