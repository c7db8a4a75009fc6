"""Pretraining throughput: Ray Train + DeepSpeed against a bare PyTorch loop of the same step.

    .venv/bin/python bench/train_throughput.py [--steps 60] [--batch-size 16] [--rounds 3]

Three runs of the 32 px benchmark model (configs/pretrain.yaml), batch 16 per worker, each doing
the same work per step (noise-prediction loss, backward, clipped AdamW step, EMA update):
  bare        one process, 2 torch threads, data in memory
  ray_1x2     Ray Train, 1 worker x 2 threads, DeepSpeed ZeRO-2, data through Ray Data
  ray_2x1     Ray Train, 2 workers x 1 thread, DeepSpeed ZeRO-2 (global batch 32)
Steady-state images/s skip the first window (start-up, warm-up). The host's speed drifts by 20% within
minutes, so the three runs repeat in rounds and each ratio compares runs of the same round; the
figures are the medians over rounds. The local Ray cluster is up (idle) during the bare runs too.
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_common import write_result

from pathalign_ray.config import load_config
from pathalign_ray.data import procedural
from pathalign_ray.data.shards import read_dataset, write_dataset
from pathalign_ray.generator.diffusion import (
    build_noise_scheduler,
    build_unet,
    diffusion_loss_per_sample,
    draw_noise_and_timesteps,
    to_model_input,
)
from pathalign_ray.generator.pretrain import PretrainConfig, pretrain


def bare_loop(config: PretrainConfig, dataset: Path, steps: int, threads: int) -> float:
    """Images/s of the same step in a plain loop: no Ray, no DeepSpeed."""
    torch.set_num_threads(threads)
    data = read_dataset(dataset, "train")
    images, labels = to_model_input(data.images), torch.from_numpy(data.labels)
    unet = build_unet(config.model, len(data.class_names))
    scheduler = build_noise_scheduler(config.model)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.train.lr)
    ema = [p.detach().clone() for p in unet.parameters()]
    generator = torch.Generator().manual_seed(0)
    batch = config.train.batch_size
    times = []
    for step in range(steps):
        start = time.perf_counter()
        index = torch.randint(0, len(images), (batch,), generator=generator)
        noise, timesteps = draw_noise_and_timesteps(
            batch, images.shape[1:], config.model.num_train_timesteps, generator
        )
        loss = diffusion_loss_per_sample(unet, scheduler, images[index], labels[index], noise, timesteps).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.train.grad_clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - config.train.ema_decay)
        times.append(time.perf_counter() - start)
    steady = times[config.train.log_every :]
    return batch * len(steady) / sum(steady)


def ray_run(config: PretrainConfig, dataset: Path, steps: int, workers: int, threads: int, run_dir: Path) -> float:
    """Steady-state global images/s reported by the Ray Train run (median over windows, first skipped)."""
    run = dataclasses.replace(
        config,
        run_dir=str(run_dir),
        data=dataclasses.replace(config.data, dataset=str(dataset)),
        train=dataclasses.replace(config.train, steps=steps, checkpoint_every=steps),
        scale=dataclasses.replace(config.scale, num_workers=workers, threads_per_worker=threads),
    )
    history = pretrain(run).history
    return statistics.median(row["images_per_s"] for row in history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from pathalign_ray.cluster import init_ray

    config = load_config(
        PretrainConfig, "configs/pretrain.yaml", [f"train.batch_size={args.batch_size}", "train.log_every=10"]
    )
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = write_dataset(
            procedural.generate(40, config.model.sample_size, seed=0), tmp / "data", 0.2, 0, source="procedural"
        )
        init_ray(num_cpus=2)
        for number in range(args.rounds):
            bare = bare_loop(config, dataset, args.steps, threads=2)
            one = ray_run(config, dataset, args.steps, workers=1, threads=2, run_dir=tmp / f"one{number}")
            two = ray_run(config, dataset, args.steps, workers=2, threads=1, run_dir=tmp / f"two{number}")
            rounds.append(
                {
                    "bare": bare,
                    "ray_1x2": one,
                    "ray_2x1": two,
                    "ratio_1x2_over_bare": one / bare,
                    "ratio_2x1_over_1x2": two / one,
                }
            )
            print(f"round {number + 1}: bare {bare:.1f}, Ray 1x2 {one:.1f}, Ray 2x1 {two:.1f} img/s")
    figures = {
        "model": "configs/pretrain.yaml (32 px, channels 32-64-64)",
        "batch_size_per_worker": args.batch_size,
        "steps": args.steps,
        "rounds": rounds,
        "bare_2_threads_images_per_s": statistics.median(r["bare"] for r in rounds),
        "ray_1_worker_2_threads_images_per_s": statistics.median(r["ray_1x2"] for r in rounds),
        "ray_2_workers_1_thread_images_per_s": statistics.median(r["ray_2x1"] for r in rounds),
        "ratio_ray_1_worker_over_bare": statistics.median(r["ratio_1x2_over_bare"] for r in rounds),
        "ratio_2x1_over_1x2": statistics.median(r["ratio_2x1_over_1x2"] for r in rounds),
    }
    write_result("train_throughput", figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
