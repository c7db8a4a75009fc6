"""The 32 px pretraining benchmark: procedural data set -> pretraining on 2 Ray Train workers -> samples.

    .venv/bin/python bench/pretrain32.py [key.sub=value ...]   # overrides apply to configs/pretrain.yaml

Writes bench/results/pretrain32.json (wall time per stage, loss curve), bench/results/pretrain32_loss.png
and bench/results/pretrain32_contact_sheet.png (16 samples per class, DDIM 50 steps).
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
from pathalign_ray.pretrain import PretrainConfig, pretrain
from pathalign_ray.sampling import SampleConfig, sample


def main(overrides: list[str]) -> None:
    config = load_config(PretrainConfig, "configs/pretrain.yaml", overrides)
    run_dir = Path(config.run_dir)
    if run_dir.exists():
        sys.exit(f"{run_dir} exists; move it away to measure a run from scratch")
    started = time.perf_counter()
    make_dataset(MakeDatasetConfig(out_dir=config.data.dataset, image_size=config.model.sample_size))
    data_done = time.perf_counter()
    model_dir = pretrain(config)
    pretrain_done = time.perf_counter()
    samples = sample(
        SampleConfig(model=str(model_dir), out_dir=str(run_dir / "samples" / "pretrained"), n_per_class=16)
    )
    sample_done = time.perf_counter()

    history = [json.loads(line) for line in (run_dir / "pretrain_metrics.jsonl").read_text().splitlines()]
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
    print(json.dumps({k: v for k, v in figures.items() if k != "loss_curve"}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
