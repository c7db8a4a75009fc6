"""What each part of the feedback objectives does to plausibility, from one round of feedback on the 32 px model.

    .venv/bin/python bench/pretrain32.py --restore         # once: runs/pretrain32/{data,model}
    .venv/bin/python experiments/feedback_ablation.py      # about 40 minutes on 2 cores
    .venv/bin/python experiments/feedback_ablation.py --only ddpo_lr1e-4,rwl_threshold_oracle_eta1_pool

One feedback round as jobs/align.py runs it (256 samples, DDIM 20, judged by 3 simulated
pathologists; a reward model trained on the verdicts and weak feedback), then one finetuning run per
variant below from the same base model and the same pool, then the simulated pathologist's verdict
on the same 16 fresh samples per class (fixed seeds) of the base and of every finetuned model, drawn
three ways: DDIM 20 with eta 0 (the rounds' sampler), DDIM 10 with eta 1 (DDPO's policy) and
DDIM 50 with eta 1.

Variants (jobs/finetune.py settings on top of configs/finetune.yaml; 2 Ray Train workers, ZeRO-2):
- real_only: the beta term alone, no feedback (threshold 2: no reward reaches it, so every synthetic
  weight is 0): what more training on the real images does by itself;
- rwl_paper: the paper's objective as configs/align.yaml sets it (raw reward weights, beta 0.3, lr 2e-5);
- rwl_threshold: the reward-weighted term on the samples the reward model calls plausible, plus beta;
- rwl_threshold_oracle: the same with the simulated pathologist's own verdict as the weight, an upper
  bound on what better labels could give this objective;
- rwl_threshold_oracle_eta1_pool: the oracle-weighted objective on a pool drawn with DDPO's
  stochastic sampler (DDIM 10, eta 1; 40% plausible on the base) instead of the rounds' DDIM 20;
- rwl_threshold[_oracle]_ddim50_pool: on a pool drawn with DDIM 50, eta 1, whose samples the model
  itself finds nearly as likely as real images (the DDIM 20 eta 0 ones carry 3-4 times the real
  images' noise-prediction loss at the smallest timesteps);
- ddpo: policy gradient against the reward model, at two learning rates, and at the higher one
  with four times the trajectories per step; with 8 trajectories per class a step against the
  reward model and against the simulated pathologist itself (the oracle: is the reward model what
  the policy fails on?), each step's trajectories judged by the pathologist too, at lr 1e-4 and
  3e-5, and at 3e-5 for 80 steps with a 5-step warm-up.
Writes bench/results/feedback_ablation.json; with --only, the base and the named variants go to
bench/results/feedback_ablation_only.json instead, or to bench/results/RESULTS.json with --results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pathalign_ray.align import AlignConfig, collect_feedback
from pathalign_ray.config import load_config
from pathalign_ray.evaluation.plausibility import rate
from pathalign_ray.generator.finetune import FinetuneConfig, finetune

# bench_common (it writes bench/results/NAME.json) is in bench/, off the path when run as experiments/NAME.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_common import write_result

BASE = Path("runs/pretrain32")
RUN = Path("runs/ablation32").resolve()
FRESH_PER_CLASS = 16
# (DDIM steps, eta) of the fresh samples: the rounds' sampler, and DDPO's policy (its trajectories)
# and DDIM 50 with eta 1, whose samples sit closest to the real images in the model's own loss
SAMPLERS = {"ddim20_eta0": (20, 0.0), "ddim10_eta1": (10, 1.0), "ddim50_eta1": (50, 1.0)}
CURVES = ("step", "reward_mean", "trajectory_plausibility")  # kept per logged step in the JSON
# pools of 32 samples per class from the base, drawn once with a stochastic sampler: (DDIM steps, eta)
POOLS = {RUN / "pool_ddim10_eta1": (10, 1.0), RUN / "pool_ddim50_eta1": (50, 1.0)}
STOCHASTIC_POOL, FULL_POOL = POOLS
RWL = ["objective.weighting=threshold", "train.lr=0.0001", "train.steps=150"]
DDPO = [
    "objective.kind=ddpo",
    "objective.beta=0",
    "objective.kl_coef=0.1",
    "objective.clip_range=0.0001",
    "objective.trajectories_per_step=8",
    "objective.ddim_steps=10",
    "train.steps=60",
    "train.log_every=5",
]
# 8 trajectories per class a step (2 workers x 32), every step logged, the EMA short enough to follow 30 steps
DDPO_64 = [
    *DDPO,
    "train.lr=0.0001",
    "objective.trajectories_per_step=32",
    "train.steps=30",
    "train.log_every=1",
    "train.ema_decay=0.9",
]
VARIANTS = {
    "real_only": [*RWL, "objective.threshold=2.0"],
    "rwl_paper": ["objective.weighting=raw", "train.lr=0.00002", "train.steps=100"],  # configs/align.yaml's settings
    "rwl_threshold": RWL,
    "rwl_threshold_oracle": [*RWL, "reward.kind=pathologist"],
    "ddpo_lr2e-5": [*DDPO, "train.lr=0.00002"],
    "ddpo_lr1e-4": [*DDPO, "train.lr=0.0001"],
    "rwl_threshold_oracle_eta1_pool": [*RWL, "reward.kind=pathologist", f"data.samples=[{STOCHASTIC_POOL}]"],
    "rwl_threshold_oracle_ddim50_pool": [*RWL, "reward.kind=pathologist", f"data.samples=[{FULL_POOL}]"],
    "rwl_threshold_ddim50_pool": [*RWL, f"data.samples=[{FULL_POOL}]"],
    "ddpo_lr1e-4_32_trajectories": [
        *DDPO,
        "train.lr=0.0001",
        "objective.trajectories_per_step=32",
        "train.steps=30",
        "train.log_every=3",
    ],
    "ddpo_64_trajectories_every_step": [*DDPO_64],
    "ddpo_64_trajectories_oracle": [*DDPO_64, "reward.kind=pathologist"],
    "ddpo_64_trajectories_lr3e-5": [*DDPO_64, "train.lr=0.00003", "train.steps=40"],
    "ddpo_64_trajectories_oracle_lr3e-5": [*DDPO_64, "reward.kind=pathologist", "train.lr=0.00003", "train.steps=40"],
    "ddpo_64_trajectories_lr3e-5_80_steps": [*DDPO_64, "train.lr=0.00003", "train.steps=80", "train.warmup_steps=5"],
}


def feedback_round() -> dict:
    """Round 0 of the align loop, finetuning left out: samples, verdicts, the reward model."""
    RUN.mkdir(parents=True, exist_ok=True)
    if not (RUN / "model").exists():
        (RUN / "model").symlink_to((BASE / "model").resolve())
    config = load_config(
        AlignConfig,
        "configs/align.yaml",
        [f"run_dir={RUN}", "rounds=1", "sample.n_per_class=32", f"reward.data.dataset={(BASE / 'data').resolve()}"],
    )
    return collect_feedback(config, RUN, 0)


def make_pool(pool: Path) -> None:
    """The base model's samples drawn with the pool's sampler, made once."""
    from pathalign_ray.generator.sampling import SampleConfig, sample

    ddim_steps, eta = POOLS[pool]
    if not (pool / "manifest.parquet").is_file():
        sample(
            SampleConfig(
                model=str(BASE / "model"),
                out_dir=str(pool),
                n_per_class=32,
                ddim_steps=ddim_steps,
                eta=eta,
                seed=4242,
                overwrite=True,
            )
        )


def finetune_variant(name: str, overrides: list[str], reward_dir: str) -> tuple[Path, float]:
    config = load_config(
        FinetuneConfig,
        "configs/finetune.yaml",
        [
            f"run_dir={RUN}",
            f"name={name}",
            f"base_model={BASE / 'model'}",
            f"data.samples=[{RUN / 'rounds/0/samples'}]",
            f"data.real_dataset={BASE / 'data'}",
            "reward.kind=model",
            f"reward.model={reward_dir}",
            "train.eval_every=0",
            "train.eval_per_class=1",
            "train.checkpoint_every=1000",
            *overrides,
        ],
    )
    for folder in (RUN / name, RUN / f"{name}-model"):  # a finished run of the same name would only be resumed
        shutil.rmtree(folder, ignore_errors=True)
    (RUN / f"{name}_metrics.jsonl").unlink(missing_ok=True)
    started = time.perf_counter()
    return finetune(config).model_dir, time.perf_counter() - started


def fresh_plausibility(model_dir: Path) -> dict:
    """{sampler: the simulated pathologist on FRESH_PER_CLASS samples per class}, the same seeds for every model."""
    from pathalign_ray.generator.diffusion import load_model

    unet, ddim, class_names, _ = load_model(model_dir)
    unet.eval()
    return {name: _plausibility(unet, ddim, class_names, steps, eta) for name, (steps, eta) in SAMPLERS.items()}


def _plausibility(unet, ddim, class_names: list[str], ddim_steps: int, eta: float) -> dict:
    import torch
    from diffusers import DDIMScheduler

    from pathalign_ray.experts.pathologist import judge
    from pathalign_ray.generator.diffusion import ddim_sample, derive_seed, to_uint8

    per_class = {}
    for class_id, name in enumerate(class_names):
        labels = torch.full((FRESH_PER_CLASS,), class_id)
        seeds = [derive_seed(777, class_id, j) for j in range(FRESH_PER_CLASS)]
        scheduler = DDIMScheduler.from_config(ddim.config)
        images = to_uint8(ddim_sample(unet, scheduler, labels, seeds, ddim_steps, eta=eta))
        per_class[name] = [judge(image, name).plausible for image in images]
    verdicts = np.concatenate(list(per_class.values()))
    return {
        "plausible": rate(int(verdicts.sum()), len(verdicts), 0.95),
        "per_class": {name: float(np.mean(v)) for name, v in per_class.items()},
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated variants to run (default: all)")
    parser.add_argument("--results", default="", help="bench/results/RESULTS.json (default: feedback_ablation[_only])")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if not (BASE / "model").is_dir():
        sys.exit(f"{BASE / 'model'} is missing: run bench/pretrain32.py --restore first")
    started = time.perf_counter()
    round_row = feedback_round()
    for pool in POOLS:
        if any(f"data.samples=[{pool}]" in VARIANTS[name] for name in chosen):
            make_pool(pool)
    results = {"base": fresh_plausibility(BASE / "model")}
    walls = {}
    for name in chosen:
        overrides = VARIANTS[name]
        model_dir, walls[name] = finetune_variant(name, overrides, round_row["reward_dir"])
        metrics = [json.loads(line) for line in (RUN / f"{name}_metrics.jsonl").read_text().splitlines()]
        results[name] = dict(
            fresh_plausibility(model_dir),
            kl_to_base=metrics[-1].get("kl_to_base"),
            reward_mean_first=metrics[0].get("reward_mean"),
            reward_mean_last=metrics[-1].get("reward_mean"),
            per_logged_step={key: [row[key] for row in metrics] for key in CURVES if key in metrics[0]},
        )
        print(f"[ablation] {name}: {json.dumps(results[name])}", flush=True)
    figures = {
        "round": round_row,
        "variants": {name: VARIANTS[name] for name in chosen},
        "fresh_samples": {"per_class": FRESH_PER_CLASS, "samplers": SAMPLERS},
        "results": results,
        "finetune_wall_s": walls,
        "total_wall_s": time.perf_counter() - started,
    }
    write_result(args.results or ("feedback_ablation_only" if args.only else "feedback_ablation"), figures)
    for name, row in results.items():
        shown = [f"{sampler} {row[sampler]['plausible']['rate']:.3f}" for sampler in SAMPLERS]
        print(f"{name:24s} " + "  ".join(shown))


if __name__ == "__main__":
    main(sys.argv[1:])
