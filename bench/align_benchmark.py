"""The feedback loop on the 32 px benchmark: reward-weighted likelihood and policy gradient at the same label budget.

    .venv/bin/python bench/pretrain32.py --restore  # once: runs/pretrain32/{data,model} from the kept model (or pretrain it: no flag)
    .venv/bin/python bench/align_benchmark.py [key.sub=value ...] [--objectives rwl ddpo] [--evaluate key.sub=value ...]
        # overrides apply to configs/align.yaml, --evaluate's to configs/evaluate.yaml

Each objective runs jobs/align.py's loop in its own run folder (runs/align32-rwl, runs/align32-ddpo,
both starting from runs/pretrain32/model): one round of 256 fresh samples (DDIM 50, eta 1) judged
by 3 simulated pathologists, a reward model trained on the verdicts and weak feedback, then
finetuning. Both see the same samples and the same 768 labels. Then jobs/evaluate.py's evaluation
of the base model and both finetuned models against the real data set, on 32 samples per class
drawn with each of EVAL_SAMPLERS (DDIM 50 eta 1, the rounds' sampler; DDIM 10 eta 1, the one DDPO
trains on): the simulated pathologist's plausibility, domain Frechet distance, coverage. Writes
bench/results/RESULTS.json and a contact sheet per model and sampler.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from bench_common import RESULTS_DIR, write_result
from pathalign_ray.align import AlignConfig, align
from pathalign_ray.config import load_config
from pathalign_ray.evaluation.evaluate import EvaluateConfig, evaluate

BASE = Path("runs/pretrain32")
# One round of 256 samples for both (768 verdicts), drawn with DDIM 50, eta 1: the base model's
# samples that its own loss finds nearly as likely as real images, and its best sampler (evaluated so too).
ROUND = ["rounds=1", "sample.n_per_class=32", "sample.ddim_steps=50", "sample.eta=1.0",
         "finetune.train.eval_ddim_steps=50", "finetune.train.eval_eta=1.0"]  # the loop's own check after finetuning too
# Each model is judged on fresh samples from both: the rounds' sampler, and the one DDPO trains on.
EVAL_SAMPLERS = {
    "ddim50_eta1": ["sampling.ddim_steps=50", "sampling.eta=1.0"],
    "ddim10_eta1": ["sampling.ddim_steps=10", "sampling.eta=1.0"],
}
OBJECTIVES = {
    # the paper's objective with centred weights (w = r - the class's mean reward over the pool) and
    # each synthetic loss taken relative to the pretrained model's, clipped to 1 +- 0.3
    "rwl": [*ROUND, "finetune.objective.weighting=centred", "finetune.objective.ratio_clip=0.3",
            "finetune.train.lr=0.0001", "finetune.train.steps=600"],
    # the settings that lifted plausibility in bench/feedback_ablation.py: 8 trajectories per class a
    # step (2 workers x 32), lr 3e-5 after 5 warm-up steps, 80 steps, an EMA that follows the last ones
    "ddpo": [
        *ROUND, "finetune.objective.kind=ddpo", "finetune.objective.beta=0", "finetune.objective.kl_coef=0.1",
        "finetune.objective.clip_range=0.0001", "finetune.objective.trajectories_per_step=32",
        "finetune.objective.ddim_steps=10", "finetune.train.lr=0.00003", "finetune.train.steps=80",
        "finetune.train.warmup_steps=5", "finetune.train.ema_decay=0.9",
    ],
}


def run_objective(name: str, overrides: list[str]) -> tuple[Path, list[dict], float]:
    """The align loop for one objective in runs/align32-NAME; (its last model, round rows, wall s)."""
    run_dir = Path(f"runs/align32-{name}").resolve()
    shutil.rmtree(run_dir, ignore_errors=True)  # align() resumes a run's finished rounds: measure afresh
    run_dir.mkdir(parents=True)
    (run_dir / "model").symlink_to((BASE / "model").resolve())
    config = load_config(
        AlignConfig, "configs/align.yaml",
        [f"run_dir={run_dir}", f"reward.data.dataset={(BASE / 'data').resolve()}",
         *OBJECTIVES[name], *overrides],
    )
    started = time.perf_counter()
    rows = align(config)
    return run_dir / f"round{config.rounds - 1}-model", rows, time.perf_counter() - started


def summary(metrics: dict, column: str) -> dict:
    simulated = metrics["plausibility"]["simulated"][column]
    return {
        "plausibility": simulated["plausible"]["rate"],
        "plausibility_ci": [simulated["plausible"]["low"], simulated["plausible"]["high"]],
        "per_class": {name: value["rate"] for name, value in simulated["per_class"].items()},
        "domain_fid": metrics["fidelity"]["domain"][column]["frechet_distance"],
        "coverage": metrics["diversity"]["domain"][column]["coverage"],
        "density": metrics["diversity"]["domain"][column]["density"],
        "utility_accuracy": metrics["utility"][column]["accuracy"] if column in metrics["utility"] else None,
    }


def evaluate_models(finals: dict[str, Path], sampler: str, overrides: list[str], results: str) -> dict:
    """jobs/evaluate.py's report on the base and finetuned models under one sampler; copies its contact sheets."""
    report = evaluate(
        dataclasses.replace(
            load_config(EvaluateConfig, "configs/evaluate.yaml", overrides),
            models=(str(BASE / "model"), *(str(path) for path in finals.values())),
            real=str(BASE / "data"),
            out_dir=f"runs/align32-report-{sampler}",
        )
    )
    metrics = json.loads((report / "metrics.json").read_text())
    columns = dict(zip(["base", *finals], metrics["columns"]))
    for label, column in columns.items():
        grid = report / "grids" / f"{column}.png"
        if grid.is_file():
            shutil.copy(grid, RESULTS_DIR / f"{results}_{sampler}_{label}.png")
    return {label: summary(metrics, column) for label, column in columns.items()}


def against_base(rows: dict, rounds: dict, walls: dict) -> dict:
    """Each finetuned model's summary row against the base model's: the Must-show's figures."""
    base = rows["base"]
    return {
        label: {
            "plausibility_gain_pp": 100 * (row["plausibility"] - base["plausibility"]),
            "fid_change": row["domain_fid"] / base["domain_fid"] - 1,
            "coverage_ratio": row["coverage"] / base["coverage"] if base["coverage"] else None,
            "labels": rounds[label][-1]["labels"],
            "wall_s": walls[label],
        }
        for label, row in rows.items()
        if label != "base"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/align.yaml")
    parser.add_argument("--results", default="align_benchmark", help="bench/results/RESULTS.json and its contact sheets")
    parser.add_argument("--evaluate", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of configs/evaluate.yaml, for every sampler")
    args = parser.parse_args()
    if not (BASE / "model").is_dir():
        raise SystemExit(f"{BASE / 'model'} is missing: run bench/pretrain32.py --restore first")
    started = time.perf_counter()
    finals, rounds, walls = {}, {}, {}
    for name in args.objectives:
        finals[name], rounds[name], walls[name] = run_objective(name, args.overrides)
        print(f"[bench] {name}: {walls[name]:.0f} s, rounds {json.dumps(rounds[name])}")
    eval_started = time.perf_counter()
    table = {
        sampler: evaluate_models(finals, sampler, [*sampling, *args.evaluate], args.results)
        for sampler, sampling in EVAL_SAMPLERS.items()
    }
    checks = {sampler: against_base(rows, rounds, walls) for sampler, rows in table.items()}
    figures = {
        "objective_overrides": {name: OBJECTIVES[name] for name in finals},
        "overrides": args.overrides,
        "evaluate_overrides": args.evaluate,
        "eval_samplers": EVAL_SAMPLERS,
        "table": table,
        "against_base": checks,
        "rounds_rows": rounds,
        "evaluation_wall_s": time.perf_counter() - eval_started,
        "total_wall_s": time.perf_counter() - started,
    }
    write_result(args.results, figures)
    print(json.dumps({"table": table, "against_base": checks}, indent=2))


if __name__ == "__main__":
    main()
