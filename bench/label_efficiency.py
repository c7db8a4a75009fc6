"""Plausibility against labels spent: uncertainty-first selection against random, on held-out noise.

    .venv/bin/python bench/label_efficiency.py [--selects all uncertain] [--seeds 0 1 2] [--objective rwl]
        [--base MODEL --data DATASET --tag NAME] [--merge-only] [key.sub=value ...]   # overrides apply to configs/align.yaml

The align benchmark's loop (bench/align_benchmark.py: its objective recipe, seeds, held-out noise and
judging) with rounds of SCHEDULE samples, each judged by 3 simulated pathologists: 192, 384, 768 and
1,536 labels spent after rounds 0-3. Round 0 is the same random pool for both selections, run once (the
uncertain part copies the random part's run after round 0: align_benchmark.run_part's round0_from); from round 1
on, `uncertain` draws 3 times the round's samples and the experts judge those the last reward model is
least sure of (sample.select=uncertain), `all` draws the round's samples alone. Each (selection, seed)
is a resumable part, bench/results/label_efficiency_parts/OBJ-sSEED[-uncertain]-labels.json (run
folder runs/align32-NAME); the parts merge into bench/results/label_efficiency.json: per selection the
curve (align_benchmark's per-round rows) and the labels it needs for +20 pp over the base model
(linear between the measured points, from 0 labels at the base model; None if the curve never gets there).
"""

from __future__ import annotations

import argparse
import itertools
import json

from align_benchmark import (
    EVAL_SAMPLERS,
    OBJECTIVES,
    ROUND_SAMPLES,
    add_base_arguments,
    check_base_arguments,
    merge,
    plot_rounds,
    run_part,
)
from bench_common import RESULTS_DIR, write_result

PARTS = RESULTS_DIR / "label_efficiency_parts"
SCHEDULE = [ROUND_SAMPLES // 4, ROUND_SAMPLES // 4, ROUND_SAMPLES // 2, ROUND_SAMPLES]  # 192/384/768/1536 labels
TARGET_GAIN = 0.20


def labels_for_gain(rows: list[dict], sampler: str, gain: float = TARGET_GAIN) -> float | None:
    """Labels at which the curve first reaches base + gain, linear between points; the base model sits at 0."""
    base = rows[0][sampler]["base_plausibility_mean"]
    points = [(0, 0.0)] + [(row["labels"], row[sampler]["plausibility_mean"] - base) for row in rows]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if y1 >= gain:
            return x0 + (x1 - x0) * (gain - y0) / (y1 - y0) if y1 > y0 else x1
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selects", nargs="+", default=["all", "uncertain"], choices=["all", "uncertain"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--objective", default="rwl", choices=list(OBJECTIVES))
    add_base_arguments(parser)  # parts labels[-TAG]
    parser.add_argument("--merge-only", action="store_true", help="merge the parts already written; run nothing")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/align.yaml")
    args = parser.parse_args()
    check_base_arguments(parser, args)
    tag = "-".join(["labels", *([args.tag] if args.tag else [])])
    if not args.merge_only:
        for seed in args.seeds:
            part = [args.objective, seed]
            settings = ["even", args.overrides, PARTS, tag, args.base, args.data]
            round0 = run_part(*part, SCHEDULE[:1], "all", *settings)  # round 0's random pool, for both selections
            for select in sorted(args.selects, key=lambda name: name == "all"):  # "all" last: it shares its round 0
                run_part(*part, SCHEDULE, select, *settings, round0_from=round0 if select != "all" else None)
    parts = [json.loads(path.read_text()) for path in sorted(PARTS.glob("*.json"))]
    table = merge(parts)
    write_result("label_efficiency", {
        "schedule_samples_per_round": SCHEDULE,
        "experts_per_sample": 3,
        "curves": table,
        "labels_for_20pp": {name: {s: labels_for_gain(rows, s) for s in EVAL_SAMPLERS} for name, rows in table.items()},
        "seeds": sorted({part["seed"] for part in parts}),
        "parts": {p["name"]: [r["date"] for r in p["rows"]] for p in parts},
    })  # fmt: skip
    plot_rounds(table, RESULTS_DIR / "label_efficiency.png")
    print(json.dumps({name: [row["ddim50_eta1"]["plausibility_mean"] for row in rows] for name, rows in table.items()}))


if __name__ == "__main__":
    main()
