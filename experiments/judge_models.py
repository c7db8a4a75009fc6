"""Exported generators judged like the loop's models: held-out noise, both of the align benchmark's samplers.

    .venv/bin/python experiments/judge_models.py MODEL NAME [MODEL NAME ...]

Run from the repository root with bench/ importable (`PYTHONPATH=.`). For each model, the figures of
`bench/align_benchmark.py`'s judge (plausibility with its Wilson interval, per class, domain FID,
coverage, utility accuracy and recall) under DDIM 50 eta 1 and DDIM 10 eta 1 on the evaluation
namespace's noise, plus the wall time; written to bench/results/pretrain32_steps/NAME.json (used for
the pretraining-steps table in BENCHMARKS.md).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from align_benchmark import EVAL_SAMPLERS, evaluated
from bench_common import RESULTS_DIR


def judged_under_both_samplers(model: Path, name: str) -> dict:
    figures = {}
    for sampler in EVAL_SAMPLERS:
        started = time.perf_counter()
        figures[sampler] = {**evaluated(model, Path(f"runs/eval-{name}-{sampler}"), sampler),
                            "wall_s": time.perf_counter() - started}  # fmt: skip
        print(name, sampler, figures[sampler]["plausibility"], flush=True)
    return figures


def main(pairs: list[str]) -> None:
    if not pairs or len(pairs) % 2:
        sys.exit(__doc__)
    out = RESULTS_DIR / "pretrain32_steps"
    out.mkdir(parents=True, exist_ok=True)
    for model, name in zip(pairs[::2], pairs[1::2]):
        (out / f"{name}.json").write_text(json.dumps(judged_under_both_samplers(Path(model), name), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
