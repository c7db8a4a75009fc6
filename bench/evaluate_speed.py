"""Wall time per stage of evaluating 5,000 images at 32 px, against just decoding their 5,000 PNGs.

    .venv/bin/python bench/evaluate_speed.py [--images 5000] [--real runs/pretrain32/data]

The 5,000 images stand in for a model's samples: procedural images (seed 7, none of them in the
real set), written as a sample folder (manifest.parquet + PNGs) and evaluated with
configs/evaluate.yaml against the real data set (runs/pretrain32/data if it exists, else a
procedural set of the same shape made here). The data set is copied first, so the domain encoder
is trained (a cache miss: the cost of a first evaluation). Ray starts a local cluster on the
machine's cores (2 here): 2 Ray Data actors, 2 classifier trainings at a time.
Baseline, in the same process: decoding the 5,000 PNGs one after the other (decode_image).
Target: the whole evaluation under 5 minutes on 2 cores. Writes bench/results/evaluate_speed.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_common import write_result

from pathalign_ray.config import load_config
from pathalign_ray.data import procedural
from pathalign_ray.data.shards import write_dataset
from pathalign_ray.evaluation.evaluate import EvaluateConfig, evaluate
from pathalign_ray.images import decode_image, encode_png

ROOT = Path(__file__).resolve().parent.parent


def write_sample_folder(images, out: Path) -> Path:
    """A sample folder (the layout of jobs/sample.py) holding procedural images with their true class."""
    (out / "images").mkdir(parents=True)
    rows = []
    for i, (image, label) in enumerate(zip(images.images, images.labels)):
        name = images.class_names[label]
        rows.append(
            {
                "sample_id": f"proc-{name}-{i:05d}",
                "declared_class": name,
                "seed": i,
                "model_id": "procedural",
                "model_step": 0,
                "path": f"images/proc-{i:05d}.png",
                "ddim_steps": 0,
                "eta": 0.0,
            }
        )
        (out / rows[-1]["path"]).write_bytes(encode_png(image))
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--real", default=str(ROOT / "runs" / "pretrain32" / "data"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="evaluate_speed_"))
    try:
        real = work / "data"
        if Path(args.real, "dataset.json").is_file():
            shutil.copytree(args.real, real, ignore=shutil.ignore_patterns(".cache"))
            real_source = args.real
        else:
            write_dataset(procedural.generate(160, 32, seed=0), real, test_fraction=0.2, seed=0, source="procedural")
            real_source = "procedural 32 px, 160 per class (made here)"
        per_class = -(-args.images // len(procedural.DEFAULT_CELL_TYPES))
        fake = procedural.generate(per_class, 32, seed=7)
        fake = fake.subset(np.arange(args.images))
        samples = write_sample_folder(fake, work / "samples" / "procedural")

        started = time.perf_counter()
        png = [path.read_bytes() for path in sorted((samples / "images").iterdir())]
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        for i, data in enumerate(png):
            decode_image(data, 32, f"image {i}")
        decode_s = time.perf_counter() - started

        config = load_config(
            EvaluateConfig,
            ROOT / "configs" / "evaluate.yaml",
            [f"models=[{samples}]", f"real={real}", f"out_dir={work / 'report'}"],
        )
        started = time.perf_counter()
        out = evaluate(config)
        total_s = time.perf_counter() - started

        metrics = json.loads((out / "metrics.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = metrics["columns"][0]
    figures = {
        "images": args.images,
        "image_size": 32,
        "real": real_source,
        "evaluate_wall_s": round(total_s, 1),
        "stages_s": {k: round(v, 2) for k, v in metrics["timings"].items()},
        "baseline_decode_pngs_s": round(decode_s, 2),
        "baseline_read_files_s": round(read_s, 2),
        "evaluate_vs_decode": round(total_s / decode_s, 1),
        "target_s": 300,
        "config": "configs/evaluate.yaml (encoder and utility: 200 steps of 64 images; prdc_k 5; 2 workers x 1 thread)",
        "check": {
            "frechet_distance_domain": metrics["fidelity"]["domain"][name]["frechet_distance"],
            "frechet_distance_domain_real_test": metrics["fidelity"]["domain"]["real_test"]["frechet_distance"],
            "diversity_domain": metrics["diversity"]["domain"][name],
            "utility_accuracy": metrics["utility"][name]["accuracy"],
            "train_on_real_accuracy": metrics["utility"]["train_on_real"]["accuracy"],
            "simulated_plausible": metrics["plausibility"]["simulated"][name]["plausible"]["rate"],
        },
    }
    print(json.dumps(figures, indent=2))
    print(f"written to {write_result('evaluate_speed', figures)}")


if __name__ == "__main__":
    main()
