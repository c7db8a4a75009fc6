"""The 32 px pretraining benchmark: procedural data set -> pretraining on 2 Ray Train workers -> samples.

    .venv/bin/python bench/pretrain32.py [key.sub=value ...]   # overrides apply to configs/pretrain.yaml
    .venv/bin/python bench/pretrain32.py --restore             # runs/pretrain32 from the kept model, in a minute

Writes bench/results/pretrain32.json (wall time per stage, loss curve), bench/results/pretrain32_loss.png
and bench/results/pretrain32_contact_sheet.png (16 samples per class, DDIM 50 steps), and keeps the
exported model in models/cells32 (committed, a few MB; make demo starts from it: pretraining takes 16 to 55 minutes on
2 cores, so the benchmarks built on it restore it with --restore rather than pretrain again).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from bench_common import RESULTS_DIR, write_result

from pathalign_ray.config import load_config
from pathalign_ray.data.make import MakeDatasetConfig, make_dataset
from pathalign_ray.generator.pretrain import PretrainConfig, pretrain
from pathalign_ray.generator.sampling import SampleConfig, sample

KEPT_MODEL = Path(__file__).resolve().parent.parent / "models" / "cells32"


def sample_pretrained(run_dir: Path) -> Path:
    """16 samples per class of run_dir/model in run_dir/samples/pretrained (the same images every time)."""
    return sample(
        SampleConfig(model=str(run_dir / "model"), out_dir=str(run_dir / "samples" / "pretrained"), n_per_class=16)
    )


def restore(config: PretrainConfig) -> None:
    """runs/pretrain32 as a fresh run leaves it, from the kept model: the same data set (deterministic
    per seed), the model, and the same samples (deterministic per seed); no pretraining."""
    run_dir = Path(config.run_dir)
    if (run_dir / "model").exists():
        sys.exit(f"{run_dir / 'model'} exists; nothing to restore")
    if not (KEPT_MODEL / "pathalign.json").is_file():
        sys.exit(f"no kept model in {KEPT_MODEL}: run bench/pretrain32.py without --restore")
    make_dataset(MakeDatasetConfig(out_dir=config.data.dataset, image_size=config.model.sample_size))
    shutil.copytree(KEPT_MODEL, run_dir / "model")
    sample_pretrained(run_dir)
    print(f"restored {run_dir} from {KEPT_MODEL}")


def main(argv: list[str]) -> None:
    overrides = [arg for arg in argv if arg != "--restore"]
    config = load_config(PretrainConfig, "configs/pretrain.yaml", overrides)
    if "--restore" in argv:
        return restore(config)
    run_dir = Path(config.run_dir)
    if run_dir.exists():
        sys.exit(f"{run_dir} exists; move it away to measure a run from scratch")
    started = time.perf_counter()
    make_dataset(MakeDatasetConfig(out_dir=config.data.dataset, image_size=config.model.sample_size))
    data_done = time.perf_counter()
    result = pretrain(config)
    pretrain_done = time.perf_counter()
    samples = sample_pretrained(result.model_dir.parent)
    sample_done = time.perf_counter()

    history = result.history
    shutil.copy(samples / "contact_sheet.png", RESULTS_DIR / "pretrain32_contact_sheet.png")
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([row["step"] for row in history], [row["loss"] for row in history])
    axis.set(xlabel="step", ylabel="noise-prediction MSE", yscale="log", title="32 px pretraining loss")
    figure.tight_layout()
    figure.savefig(RESULTS_DIR / "pretrain32_loss.png", dpi=100)
    figures = {
        "config": "configs/pretrain.yaml " + " ".join(overrides),
        "steps": config.train.steps,
        "global_batch": config.train.batch_size * config.scale.num_workers,
        "workers_x_threads": f"{config.scale.num_workers}x{config.scale.threads_per_worker}",
        "wall_s": {
            "make_dataset": data_done - started,
            "pretrain": pretrain_done - data_done,
            "sample_128_images": sample_done - pretrain_done,
            "total": sample_done - started,
        },
        "final_loss": history[-1]["loss"],
        "median_images_per_s": sorted(row["images_per_s"] for row in history)[len(history) // 2],
        "loss_curve": [[row["step"], round(row["loss"], 5)] for row in history],
    }
    write_result("pretrain32", figures)
    shutil.rmtree(KEPT_MODEL, ignore_errors=True)
    shutil.copytree(result.model_dir, KEPT_MODEL)
    print(json.dumps({k: v for k, v in figures.items() if k != "loss_curve"}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
