"""Images per second of the simulated pathologist (judge_batch) on one core, against generating the
same images procedurally; and its verdicts on them, as a check that the timed work is the real one.

    .venv/bin/python bench/pathologist_speed.py [--repeats 5]

For 32 and 64 px: the ten cell types, IMAGES_PER_CLASS each, judged against their true class. Each
rate is the median over repeats, wall-clock and CPU time (CPU time is steadier on a shared machine).
Baseline: procedural.generate() of the same images. Then the 32 diffusion-model samples of
tests/data/diffusion_samples_32px.npz (judged DIFFUSION_COPIES times per repeat) against their declared
class, with how many have no cell found, are plausible, and agree with the reading by eye stored with
them. Writes bench/results/pathologist_speed.json.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before numpy is imported: one core

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from bench_common import write_result

from pathalign_ray.data.procedural import CELL_TYPES, generate
from pathalign_ray.experts.pathologist import judge_batch

IMAGES_PER_CLASS = {32: 40, 64: 30}  # per repeat: a fraction of a second each
DIFFUSION_SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "data" / "diffusion_samples_32px.npz"
DIFFUSION_COPIES = 10  # 320 images per repeat


def _rates(work, count: int, repeats: int) -> tuple[float, float]:
    """Median (wall-clock, CPU-time) images per second of work() over repeats."""
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        work()
        wall.append(count / (time.perf_counter() - start_wall))
        cpu.append(count / max(time.process_time() - start_cpu, 1e-9))
    return statistics.median(wall), statistics.median(cpu)


def measure(size: int, per_class: int, repeats: int) -> dict:
    data = generate(per_class, size, seed=0, classes=CELL_TYPES)
    declared = [CELL_TYPES[label] for label in data.labels]
    judge_batch(data.images[:10], declared[:10])  # warm up
    judge_wall, judge_cpu = _rates(lambda: judge_batch(data.images, declared), len(data), repeats)
    generate_wall, generate_cpu = _rates(lambda: generate(per_class, size, 0, CELL_TYPES), len(data), repeats)
    plausible = np.mean([verdict.plausible for verdict in judge_batch(data.images, declared)])
    return {
        "judge_images_per_s": round(judge_wall, 1),
        "judge_cpu_images_per_s": round(judge_cpu, 1),
        "judge_ms_per_image": round(1000 / judge_cpu, 2),
        "generate_images_per_s": round(generate_wall, 1),
        "generate_cpu_images_per_s": round(generate_cpu, 1),
        "judge_cost_vs_generate": round(generate_cpu / judge_cpu, 2),
        "true_class_plausible": round(float(plausible), 4),
        "images_per_repeat": len(data),
    }


def measure_diffusion(repeats: int) -> dict:
    data = np.load(DIFFUSION_SAMPLES)
    images = np.concatenate([data["images"]] * DIFFUSION_COPIES)
    declared = list(data["declared_classes"]) * DIFFUSION_COPIES
    judge_wall, judge_cpu = _rates(lambda: judge_batch(images, declared), len(images), repeats)
    verdicts = judge_batch(data["images"], list(data["declared_classes"]))
    plausible = np.array([verdict.plausible for verdict in verdicts])
    return {
        "judge_images_per_s": round(judge_wall, 1),
        "judge_cpu_images_per_s": round(judge_cpu, 1),
        "judge_ms_per_image": round(1000 / judge_cpu, 2),
        "samples": len(verdicts),
        "no_cell_found": int(sum(not verdict.measurements.found_cell for verdict in verdicts)),
        "plausible": int(plausible.sum()),
        "agreement_with_eye": round(float(np.mean(plausible == data["eye_plausible"])), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    figures = {f"{size}px": measure(size, per_class, args.repeats) for size, per_class in IMAGES_PER_CLASS.items()}
    print(f"{'size':>6} {'judge img/s':>12} {'cpu img/s':>10} {'ms/img':>7} {'generate img/s':>15} {'x generate':>11}")
    for size, row in figures.items():
        judged = f"{row['judge_images_per_s']:>12.0f} {row['judge_cpu_images_per_s']:>10.0f}"
        judged += f" {row['judge_ms_per_image']:>7.2f}"
        print(f"{size:>6} {judged} {row['generate_images_per_s']:>15.0f} {row['judge_cost_vs_generate']:>11.1f}")
    row = figures["diffusion_32px"] = measure_diffusion(args.repeats)
    print(f"{'diff32':>6} {row['judge_images_per_s']:>12.0f} {row['judge_cpu_images_per_s']:>10.0f}", end="")
    print(f" {row['judge_ms_per_image']:>7.2f}   no cell {row['no_cell_found']}/{row['samples']},", end="")
    print(f" plausible {row['plausible']}, agreement with eye {row['agreement_with_eye']:.2f}")
    print(f"wrote {write_result('pathologist_speed', figures)}")


if __name__ == "__main__":
    main()
