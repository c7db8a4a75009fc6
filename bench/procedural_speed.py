"""Images per second of the procedural cytology set on one core, against the cheapest possible image.

Usage: python bench/procedural_speed.py [--repeats 5]

The baseline is uniform noise, np.random.default_rng().random((n, size, size, 3)) cast to uint8:
what it costs just to fill the arrays. Each figure is the median over repeats; the CPU-time rate is
reported too, as it is steadier than wall-clock time on a shared machine.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before numpy is imported: one core, as the data loaders use it

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench_common import write_result

from pathalign_ray.data.procedural import DEFAULT_CELL_TYPES, generate

IMAGES_PER_CLASS = {32: 60, 64: 40, 128: 12}  # per repeat: about a third of a second each


def _rates(make, count: int, repeats: int) -> tuple[float, float]:
    """Median (wall-clock, CPU-time) images per second of make() over repeats."""
    wall, cpu = [], []
    for repeat in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        make(repeat)
        wall.append(count / (time.perf_counter() - start_wall))
        cpu.append(count / max(time.process_time() - start_cpu, 1e-9))
    return statistics.median(wall), statistics.median(cpu)


def _noise_images(count: int, size: int) -> np.ndarray:
    return (np.random.default_rng().random((count, size, size, 3)) * 255).astype(np.uint8)


def measure(size: int, per_class: int, repeats: int) -> dict:
    count = per_class * len(DEFAULT_CELL_TYPES)
    generate(1, size, 0)  # warm the per-size caches
    images_per_s, cpu_images_per_s = _rates(lambda seed: generate(per_class, size, seed), count, repeats)
    noise_per_s, _ = _rates(lambda _: _noise_images(count, size), count, repeats)
    return {
        "images_per_s": round(images_per_s, 1),
        "cpu_images_per_s": round(cpu_images_per_s, 1),
        "noise_images_per_s": round(noise_per_s, 1),
        "cost_vs_noise": round(noise_per_s / images_per_s, 1),
        "images_per_repeat": count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    figures = {f"{size}px": measure(size, per_class, args.repeats) for size, per_class in IMAGES_PER_CLASS.items()}
    print(f"{'size':>6} {'images/s':>10} {'cpu img/s':>10} {'noise img/s':>12} {'x noise':>8}")
    for size, row in figures.items():
        rates = f"{row['images_per_s']:>10.0f} {row['cpu_images_per_s']:>10.0f} {row['noise_images_per_s']:>12.0f}"
        print(f"{size:>6} {rates} {row['cost_vs_noise']:>8.1f}")

    print(f"wrote {write_result('procedural_speed', figures)}")


if __name__ == "__main__":
    main()
