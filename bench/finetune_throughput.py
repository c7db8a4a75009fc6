"""Finetuning throughput: reward-weighted likelihood on Ray Train + DeepSpeed against a bare PyTorch loop.

    .venv/bin/python bench/finetune_throughput.py [--steps 60] [--batch-size 16] [--rounds 3]

The 32 px benchmark model (configs/pretrain.yaml, freshly initialised: speed does not depend on
the weights), batch 16 synthetic + 16 real images per step, the same work per step in each run:
the paper's loss (both terms at the same timesteps, one forward pass), backward, clipped AdamW
step, EMA update, and the drift-to-base metric (two more forward passes, as the job logs it):
  bare      one process, 2 torch threads, data in memory
  ray_1x2   jobs/finetune.py's path: Ray Train, 1 worker x 2 threads, DeepSpeed ZeRO-2, Ray Data
Steady state skips the first logging window. The host's speed drifts within minutes, so the two
runs repeat in rounds; the ratio is the median of the per-round ratios (bench/train_throughput.py
does the same). Writes bench/results/finetune_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import write_result
from diffusers import DDIMScheduler, DDPMScheduler

from pathalign_ray.config import load_config
from pathalign_ray.data import procedural
from pathalign_ray.data.shards import read_dataset, write_dataset
from pathalign_ray.generator.diffusion import (
    build_noise_scheduler,
    build_unet,
    diffusion_loss_per_sample,
    draw_noise_and_timesteps,
    export_model,
    load_model,
    to_model_input,
)
from pathalign_ray.generator.finetune import FinetuneConfig, finetune
from pathalign_ray.generator.objectives import reward_weighted_loss, reward_weights
from pathalign_ray.generator.pretrain import PretrainConfig
from pathalign_ray.generator.sampling import SampleConfig, read_manifest, sample

LOG_EVERY = 10


def bare_loop(model_dir: Path, synthetic: tuple, real: tuple, steps: int, batch: int, threads: int) -> float:
    """Images/s (synthetic + real) of the same reward-weighted step in a plain loop: no Ray, no DeepSpeed."""
    torch.set_num_threads(threads)
    unet, ddim, _, _ = load_model(model_dir)
    unet.train()
    reference, _, _, _ = load_model(model_dir)
    reference.requires_grad_(False)
    scheduler = DDPMScheduler.from_config(ddim.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    ema = [p.detach().clone() for p in unet.parameters()]
    (images, labels, rewards), (real_images, real_labels) = synthetic, real
    generator = torch.Generator().manual_seed(0)
    size = images.shape[-1]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        index = torch.randint(0, len(images), (batch,), generator=generator)
        real_index = torch.randint(0, len(real_images), (batch,), generator=generator)
        noise, timesteps = draw_noise_and_timesteps(
            batch, (3, size, size), scheduler.config.num_train_timesteps, generator
        )
        real_noise = torch.randn(noise.shape, generator=generator)
        both = torch.cat([images[index], real_images[real_index]])
        losses = diffusion_loss_per_sample(
            unet,
            scheduler,
            both,
            torch.cat([labels[index], real_labels[real_index]]),
            torch.cat([noise, real_noise]),
            torch.cat([timesteps, timesteps]),
        )
        weights = reward_weights(rewards[index], "raw", 0.5, class_ids=labels[index], temperature=1.0)
        loss, _ = reward_weighted_loss(losses[:batch], weights, losses[batch:], beta=0.3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 0.01)
            noisy = scheduler.add_noise(images[index], noise, timesteps)
            ours = unet(noisy, timesteps, class_labels=labels[index]).sample
            float(((ours - reference(noisy, timesteps, class_labels=labels[index]).sample) ** 2).mean())
        times.append(time.perf_counter() - start)
    steady = times[LOG_EVERY:]
    return 2 * batch * len(steady) / sum(steady)


def ray_history(
    model_dir: str | Path,
    samples: str | Path,
    dataset: str | Path,
    steps: int,
    batch: int,
    run_dir: str | Path,
    checkpoint_every: int | None = None,
) -> float:
    """The logged windows of jobs/finetune.py's rwl path, 1 worker x 2 threads, every LOG_EVERY steps;
    every location may be a URI (bench/storage_throughput.py); one checkpoint at the end by default."""
    config = load_config(
        FinetuneConfig,
        None,
        [
            f"run_dir={run_dir}",
            "name=throughput",
            f"base_model={model_dir}",
            f"data.samples=[{samples}]",
            f"data.real_dataset={dataset}",
            "reward.kind=pathologist",
            "objective.kind=rwl",
            f"train.steps={steps}",
            f"train.batch_size={batch}",
            f"train.log_every={LOG_EVERY}",
            f"train.checkpoint_every={checkpoint_every or steps}",
            "train.eval_every=0",
            "train.eval_per_class=1",
            "train.eval_ddim_steps=2",
            "scale.num_workers=1",
            "scale.threads_per_worker=2",
        ],
    )
    return [row for row in finetune(config).history if row["step"] % LOG_EVERY == 0]


def ray_run(model_dir: Path, samples: Path, dataset: Path, steps: int, batch: int, run_dir: Path) -> float:
    """Steady-state images/s (synthetic + real) of jobs/finetune.py's rwl path: the median window after the first."""
    windows = ray_history(model_dir, samples, dataset, steps, batch, run_dir)[1:]
    return statistics.median(2 * batch / row["step_time_s"] for row in windows)


def pools(samples: Path, dataset: Path, class_names: list[str]) -> tuple[tuple, tuple]:
    """The same synthetic pool (with the simulated pathologist's rewards) and real set, in memory."""
    from pathalign_ray.experts.pathologist import judge
    from pathalign_ray.images import decode_image

    rows = read_manifest(samples).to_pylist()
    pixels = np.stack([decode_image((samples / row["path"]).read_bytes(), 32, row["path"]) for row in rows])
    rewards = torch.tensor([float(judge(p, row["declared_class"]).plausible) for p, row in zip(pixels, rows)])
    labels = torch.tensor([class_names.index(row["declared_class"]) for row in rows])
    real = read_dataset(dataset, "train")
    return (to_model_input(pixels), labels, rewards), (to_model_input(real.images), torch.from_numpy(real.labels))


def benchmark_inputs(tmp: Path) -> tuple[Path, Path, Path, list[str]]:
    """The freshly initialised 32 px model, a small procedural data set and a pool of 8 samples per class
    (DDIM 2) in `tmp`: (model, dataset, samples, class names). Needs Ray up (sampling runs on it)."""
    pretrain = load_config(PretrainConfig, "configs/pretrain.yaml")
    dataset = write_dataset(
        procedural.generate(40, pretrain.model.sample_size, seed=0), tmp / "data", 0.2, 0, source="procedural"
    )
    class_names = read_dataset(dataset, "train").class_names
    torch.manual_seed(0)
    unet = build_unet(pretrain.model, len(class_names))
    ddim = DDIMScheduler.from_config(build_noise_scheduler(pretrain.model).config)
    model_dir = export_model(unet, ddim, class_names, tmp / "model", {"model_id": "bench-init", "step": 0})
    samples = sample(SampleConfig(model=str(model_dir), out_dir=str(tmp / "samples"), n_per_class=8, ddim_steps=2))
    return model_dir, dataset, samples, class_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from pathalign_ray.cluster import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init_ray(num_cpus=2)
        model_dir, dataset, samples, class_names = benchmark_inputs(tmp)
        synthetic, real = pools(samples, dataset, class_names)
        rounds = []
        for number in range(args.rounds):
            bare = bare_loop(model_dir, synthetic, real, args.steps, args.batch_size, threads=2)
            ray = ray_run(model_dir, samples, dataset, args.steps, args.batch_size, tmp / f"ray{number}")
            rounds.append({"bare": bare, "ray_1x2": ray, "ratio_ray_over_bare": ray / bare})
            print(f"round {number + 1}: bare loop {bare:.1f}, Ray Train + DeepSpeed 1 x 2 {ray:.1f} img/s")
    figures = {
        "model": "configs/pretrain.yaml (32 px, channels 32-64-64), objective rwl, beta 0.3",
        "batch_size_per_term": args.batch_size,
        "steps": args.steps,
        "rounds": rounds,
        "bare_2_threads_images_per_s": statistics.median(r["bare"] for r in rounds),
        "ray_1_worker_2_threads_images_per_s": statistics.median(r["ray_1x2"] for r in rounds),
        "ratio_ray_over_bare": statistics.median(r["ratio_ray_over_bare"] for r in rounds),
    }
    write_result("finetune_throughput", figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
