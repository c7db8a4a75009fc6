"""Why reward-weighted likelihood lowered plausibility here, and the centred, ratio-clipped form that raises it.

    .venv/bin/python experiments/rwl_self_training.py [--only NAME,NAME] [--threads 2] [--results NAME]

Plain PyTorch, one process, the objective functions finetuning uses (reward_weights, class_means,
reward_weighted_loss), from runs/pretrain32/model (bench/pretrain32.py --restore). First, how
likely the model finds its own samples: its noise-prediction loss by timestep band on 128 real
test images and on 128 of its samples from each sampler. Then one finetuning run per variant: a
pool of 256 samples of the base (32 per class, DDIM 50 with eta 1 unless the variant says DDIM 10),
weighted by the simulated pathologist's verdict on each (the oracle: no reward model in the way),
plus the real-data term at beta 0.3; AdamW, batches of 16 + 16, the exported weights an EMA at
0.99, the same draws for every variant. Each model is judged on the same 16 fresh samples per
class (fixed seeds) from DDIM 10 eta 1 and DDIM 50 eta 1. Writes bench/results/rwl_self_training.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from pathalign_ray.data.shards import read_dataset
from pathalign_ray.experts.pathologist import judge
from pathalign_ray.generator.diffusion import (
    ddim_sample,
    derive_seed,
    diffusion_loss_per_sample,
    load_model,
    to_model_input,
    to_uint8,
)
from pathalign_ray.generator.objectives import class_means, reward_weighted_loss, reward_weights

# bench_common (it writes bench/results/NAME.json) is in bench/, off the path when run as experiments/NAME.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_common import write_result

MODEL, DATA = "runs/pretrain32/model", "runs/pretrain32/data"
POOL_PER_CLASS, FRESH_PER_CLASS, BATCH, BETA = 32, 16, 16, 0.3
SAMPLERS = {"ddim20_eta0": (20, 0.0), "ddim10_eta1": (10, 1.0), "ddim50_eta1": (50, 1.0)}
EVAL_SAMPLERS = ("ddim10_eta1", "ddim50_eta1")
BANDS = ((0, 50), (50, 200), (200, 500), (500, 1000))
# name: (pool, weighting, ratio clip, lr, steps)
VARIANTS = {
    "real_only": ("ddim50_eta1", "zero", 0.0, 1e-4, 150),
    "real_pool_uniform": ("real", "uniform", 0.0, 1e-4, 150),
    "own_samples_uniform": ("ddim50_eta1", "uniform", 0.0, 1e-4, 150),
    "oracle_threshold": ("ddim50_eta1", "threshold", 0.0, 1e-4, 150),
    "oracle_centred_unclipped": ("ddim50_eta1", "centred", 0.0, 1e-4, 150),
    "oracle_centred_unclipped_300": ("ddim50_eta1", "centred", 0.0, 1e-4, 300),
    "oracle_centred_clip0.3_300": ("ddim50_eta1", "centred", 0.3, 1e-4, 300),
    "oracle_centred_clip0.3_300_ddim10_pool": ("ddim10_eta1", "centred", 0.3, 1e-4, 300),
    "oracle_centred_clip0.5_300": ("ddim50_eta1", "centred", 0.5, 1e-4, 300),
    "oracle_centred_clip0.3_600": ("ddim50_eta1", "centred", 0.3, 1e-4, 600),
    "oracle_centred_clip0.3_300_lr3e-4": ("ddim50_eta1", "centred", 0.3, 3e-4, 300),
}


def draw(unet, ddim, labels: np.ndarray, sampler: str, seed: int) -> np.ndarray:
    steps, eta = SAMPLERS[sampler]
    images = []
    for start in range(0, len(labels), 64):
        chunk = labels[start : start + 64]
        seeds = [derive_seed(seed, start + k) for k in range(len(chunk))]
        images.append(
            to_uint8(ddim_sample(unet, DDIMScheduler.from_config(ddim.config), torch.tensor(chunk), seeds, steps, eta))
        )
    return np.concatenate(images)


def verdicts(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    return np.array(
        [judge(image, class_names[label]).plausible for image, label in zip(images, labels)], dtype=np.float32
    )


def loss_by_band(unet, noise_scheduler, images: np.ndarray, labels: np.ndarray) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    x, y = to_model_input(images), torch.as_tensor(labels)
    losses = []
    with torch.no_grad():
        for low, high in BANDS:
            noise = torch.randn(x.shape, generator=generator)
            timesteps = torch.randint(low, high, (len(x),), generator=generator)
            losses.append(float(diffusion_loss_per_sample(unet, noise_scheduler, x, y, noise, timesteps).mean()))
    return losses


def plausibility(unet, ddim, class_names: list[str]) -> dict:
    labels = np.repeat(np.arange(len(class_names)), FRESH_PER_CLASS)
    unet.eval()
    return {
        sampler: float(verdicts(draw(unet, ddim, labels, sampler, 777), labels, class_names).mean())
        for sampler in EVAL_SAMPLERS
    }


def pool_weights(weighting: str, plausible: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample w from the oracle's 0/1 verdicts, through the library's reward_weights."""
    if weighting == "zero":
        return torch.zeros_like(plausible)
    if weighting == "uniform":
        return torch.ones_like(plausible)
    return reward_weights(plausible, weighting, threshold=0.5, baselines=class_means(plausible, labels))


def finetune(base, noise_scheduler, pool: dict, real: tuple, weighting: str, ratio_clip: float, lr: float, steps: int):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model, ema, reference = copy.deepcopy(base).train(), copy.deepcopy(base).eval(), copy.deepcopy(base).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    weights = pool_weights(weighting, pool["plausible"], pool["labels"])
    for _ in range(steps):
        i = torch.randint(0, len(pool["images"]), (BATCH,), generator=generator)
        j = torch.randint(0, len(real[0]), (BATCH,), generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH,), generator=generator)
        images, labels = torch.cat([pool["images"][i], real[0][j]]), torch.cat([pool["labels"][i], real[1][j]])
        noise = torch.randn(images.shape, generator=generator)
        losses = diffusion_loss_per_sample(
            model, noise_scheduler, images, labels, noise, torch.cat([timesteps, timesteps])
        )
        reference_losses = None
        if ratio_clip > 0:
            with torch.no_grad():
                reference_losses = diffusion_loss_per_sample(
                    reference, noise_scheduler, images[:BATCH], labels[:BATCH], noise[:BATCH], timesteps
                )
        loss, _ = reward_weighted_loss(losses[:BATCH], weights[i], losses[BATCH:], BETA, reference_losses, ratio_clip)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for averaged, live in zip(ema.parameters(), model.parameters()):
                averaged.lerp_(live, 0.01)
    return ema


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default="rwl_self_training", help="bench/results/RESULTS.json")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(VARIANTS)
    if unknown := sorted(set(chosen) - set(VARIANTS)):
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base, ddim, class_names, _ = load_model(MODEL)
    noise_scheduler = DDPMScheduler.from_config(ddim.config)
    train, test = read_dataset(DATA, "train"), read_dataset(DATA, "test")
    rng = np.random.default_rng(0)
    real_pool_index = rng.choice(len(train.labels), POOL_PER_CLASS * len(class_names), replace=False)
    test_index = np.concatenate(
        [rng.choice(np.flatnonzero(test.labels == c), FRESH_PER_CLASS, replace=False) for c in range(len(class_names))]
    )
    fresh_labels = np.repeat(np.arange(len(class_names)), FRESH_PER_CLASS)
    own_loss = {
        "real": {
            "loss_by_band": loss_by_band(base, noise_scheduler, test.images[test_index], test.labels[test_index]),
            "mean_pixel": float(to_model_input(test.images[test_index]).mean()),
        }
    }
    for sampler in SAMPLERS:
        images = draw(base, ddim, fresh_labels, sampler, 5000)
        own_loss[sampler] = {
            "loss_by_band": loss_by_band(base, noise_scheduler, images, fresh_labels),
            "mean_pixel": float(to_model_input(images).mean()),
            "plausible": float(verdicts(images, fresh_labels, class_names).mean()),
        }
        print(f"[self-training] {sampler}: {own_loss[sampler]}", flush=True)
    pool_labels = np.repeat(np.arange(len(class_names)), POOL_PER_CLASS)
    pools = {}
    for sampler in {VARIANTS[name][0] for name in chosen} - {"real"}:
        images = draw(base, ddim, pool_labels, sampler, 4242)
        pools[sampler] = {
            "images": to_model_input(images),
            "labels": torch.as_tensor(pool_labels),
            "plausible": torch.as_tensor(verdicts(images, pool_labels, class_names)),
        }
    if "real" in {VARIANTS[name][0] for name in chosen}:
        pools["real"] = {
            "images": to_model_input(train.images[real_pool_index]),
            "labels": torch.as_tensor(train.labels[real_pool_index]),
            "plausible": torch.ones(len(real_pool_index)),
        }
    real = (to_model_input(train.images), torch.as_tensor(train.labels))
    results = {"base": plausibility(base, ddim, class_names)}
    print(f"[self-training] base: {results['base']}", flush=True)
    walls = {}
    for name in chosen:
        pool_name, weighting, ratio_clip, lr, steps = VARIANTS[name]
        variant_started = time.perf_counter()
        model = finetune(base, noise_scheduler, pools[pool_name], real, weighting, ratio_clip, lr, steps)
        walls[name] = time.perf_counter() - variant_started
        results[name] = plausibility(model, ddim, class_names)
        print(f"[self-training] {name}: {results[name]} ({walls[name]:.0f} s)", flush=True)
    write_result(
        args.results,
        {
            "own_samples_loss": {"bands": BANDS, **own_loss},
            "pool_plausible": {name: float(pool["plausible"].mean()) for name, pool in pools.items()},
            "variants": {
                name: dict(zip(("pool", "weighting", "ratio_clip", "lr", "steps"), VARIANTS[name])) for name in chosen
            },
            "fresh_per_class": FRESH_PER_CLASS,
            "plausible": results,
            "wall_s": walls,
            "total_wall_s": time.perf_counter() - started,
        },
    )


if __name__ == "__main__":
    main(sys.argv[1:])
