"""How often the simulated pathologist is right, at full counts: true class, a random wrong class, and
deliberately broken images, at 32 and 64 px.

    .venv/bin/python bench/pathologist_accuracy.py [--images 1000] [--broken 240]

Fresh procedural images (seed FRESH_SEED, used by no test): IMAGES of the ten types, as many of each,
judged against their true class (should be plausible) and against one wrong class drawn at random per
image (should be implausible). Then BROKEN images of each kind of procedural.BROKEN_KINDS, its cell
types in turn: each should be implausible with the kind's criteria among the failed ones ("right
criterion named"); "only those" counts the verdicts that name nothing else. One core; prints a table
and writes bench/results/pathologist_accuracy.json.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before numpy is imported: one core

import argparse
import math
import time
from collections import Counter

import numpy as np
from bench_common import write_result

from pathalign_ray.data.procedural import BROKEN_KINDS, CELL_TYPES, generate, render_broken
from pathalign_ray.experts.pathologist import judge, judge_measurements, measure

FRESH_SEED = 31_415  # the tests use 1-2024; pathologist_speed.py uses 0
SIZES = (32, 64)


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson score interval of a proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def rate(successes: int, n: int) -> dict:
    return {"n": n, "rate": round(successes / n, 4), "ci95": wilson(successes, n)}


def true_and_wrong_class(size: int, images: int) -> dict:
    data = generate(images // len(CELL_TYPES), size, seed=FRESH_SEED, classes=CELL_TYPES)
    measurements = [measure(image) for image in data.images]
    rng = np.random.default_rng([FRESH_SEED, size])
    true_ok, wrong_ok, per_type = 0, 0, Counter()
    for label, m in zip(data.labels, measurements):
        plausible = judge_measurements(m, CELL_TYPES[label]).plausible
        true_ok += plausible
        per_type[CELL_TYPES[label]] += plausible
        wrong = CELL_TYPES[(label + rng.integers(1, len(CELL_TYPES))) % len(CELL_TYPES)]
        wrong_ok += not judge_measurements(m, wrong).plausible
    n = len(data)
    per_class = n // len(CELL_TYPES)
    return {
        "true_class_plausible": rate(true_ok, n),
        "true_class_plausible_lowest_type": min((count / per_class, name) for name, count in per_type.items()),
        "wrong_class_implausible": rate(wrong_ok, n),
    }


def broken(size: int, kind: str, count: int) -> dict:
    expected, cell_types = BROKEN_KINDS[kind]
    cell_types = cell_types or CELL_TYPES  # blank and noise: the declared class is drawn in turn
    implausible = named = only = 0
    others = Counter()
    for j in range(count):
        cell_type = cell_types[j % len(cell_types)]
        rng = np.random.default_rng([FRESH_SEED, size, j, len(kind)])
        verdict = judge(render_broken(kind, cell_type, size, rng), cell_type)
        implausible += not verdict.plausible
        named += set(expected) <= set(verdict.failed)
        only += set(verdict.failed) == set(expected)
        others.update(set(verdict.failed) - set(expected))
    return {
        "expected_criteria": list(expected),
        "implausible": rate(implausible, count),
        "right_criterion_named": rate(named, count),
        "only_those_named": rate(only, count),
        "other_criteria_named": dict(others.most_common()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="fresh procedural images per size")
    parser.add_argument("--broken", type=int, default=240, help="broken images per kind and size")
    args = parser.parse_args()

    figures = {}
    for size in SIZES:
        started = time.perf_counter()
        row = true_and_wrong_class(size, args.images)
        row["broken"] = {kind: broken(size, kind, args.broken) for kind in BROKEN_KINDS}
        row["seconds"] = round(time.perf_counter() - started, 1)
        figures[f"{size}px"] = row

    print(f"{'':30} " + " ".join(f"{f'{size} px':>24}" for size in SIZES))

    def line(name: str, cells) -> None:
        print(f"{name:30} " + " ".join(f"{cell:>24}" for cell in cells))

    def fmt(r: dict) -> str:
        return f"{r['rate']:.1%} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"

    line("true class plausible", [fmt(figures[f"{s}px"]["true_class_plausible"]) for s in SIZES])
    line(
        "  lowest type",
        [f"{r[1]} {r[0]:.0%}" for r in (figures[f"{s}px"]["true_class_plausible_lowest_type"] for s in SIZES)],
    )
    line("random wrong class implausible", [fmt(figures[f"{s}px"]["wrong_class_implausible"]) for s in SIZES])
    for kind in BROKEN_KINDS:
        cells = [figures[f"{s}px"]["broken"][kind] for s in SIZES]
        line(f"{kind}: implausible", [fmt(c["implausible"]) for c in cells])
        line("  right criterion named", [fmt(c["right_criterion_named"]) for c in cells])
        line("  only that named", [fmt(c["only_those_named"]) for c in cells])
    line("seconds", [figures[f"{s}px"]["seconds"] for s in SIZES])
    print(f"wrote {write_result('pathologist_accuracy', figures)}")


if __name__ == "__main__":
    main()
