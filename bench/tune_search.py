"""The feedback-weight search on the 32 px benchmark against the hand-set form, both judged on held-out noise.

    .venv/bin/python bench/tune_search.py [--base MODEL --data DATASET --tag NAME] [key.sub=value ...]
        # overrides apply to configs/tune.yaml; --base/--data/--tag as bench/align_benchmark.py's

1. One feedback round: bench/align_benchmark.py's RWL part at seed 0 (run_part, runs/align32-rwl-s0[-TAG]),
   its part file in runs/tune32[-TAG]/feedback-round, not bench/results: the search needs the round's
   pool and reward model on this machine, so a fresh machine runs the round again (resumed, or reused
   if done): 256 samples (DDIM 50, eta 1) from the base model, 768 simulated labels, a reward model,
   and the hand-set form finetuned on them (centred weights, ratio clip 0.3, lr 1e-4, 600 steps:
   align_benchmark.OBJECTIVES["rwl"]), judged on held-out noise.
2. The search (configs/tune.yaml's conditional space, search_overrides below: a 90-minute budget) on that
   round's pool with that round's reward model for every trial. It is not told the hand-set values:
   its first trial is the paper's setting (beta 0.3, raw weights); each trial's probe draws the
   "probe" noise namespace, which no pool, check or evaluation draws. Rerun to resume it.
3. The best trial's model (the highest objective) judged as the hand-set one was: align_benchmark's
   judge on EVAL_SAMPLING (evaluation namespace) under DDIM 50, eta 1, plausibility with its Wilson
   95% interval; the base model beside them.

Writes bench/results/tune_search[-TAG].json (best_plausibility, best_plausibility_ci, hand_set_plausibility,
hand_set_ci, best_config, target_met: the best at least the hand-set's lower bound, the trials
table), tune_pareto[-TAG].md and .png; the search itself under runs/tune32[-TAG]/tune (trials.csv,
pareto.md, pareto.png, best_feedback.yaml). Several hours on 2 cores: the round about 15 minutes,
the search 90, the judging about 5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from align_benchmark import (
    EVAL_SAMPLING,
    OBJECTIVES,
    ROUND_SAMPLES,
    add_base_arguments,
    check_base_arguments,
    judge,
    part_name,
    part_run,
    run_part,
)
from bench_common import RESULTS_DIR, write_result

from pathalign_ray.config import config_to_dict, load_config
from pathalign_ray.tune.config import SearchConfig, flat_branch
from pathalign_ray.tune.search import search

SAMPLER = "ddim50_eta1"  # align_benchmark.EVAL_SAMPLERS: the pools' sampler and the base model's best


def search_overrides(run_dir: Path, round_dir: Path, data: Path) -> list[str]:
    """configs/tune.yaml's inputs: round 0's pool and reward model (round_dir), the real images, a 90-minute budget."""
    return [
        f"out_dir={run_dir / 'tune'}",
        f"finetune.run_dir={run_dir}",
        f"finetune.base_model={round_dir / 'model'}",
        f"finetune.data.samples=[{round_dir / 'rounds/0/samples'}]",
        f"finetune.data.real_dataset={data}",
        f"finetune.reward.model={run_dir / 'reward-round0'}",
        "num_trials=32",  # more than fit: the time budget ends the search
        "time_budget_s=5400",
        "probe.threads=2",  # the probe runs after its trial's Ray Train run, with the cores to itself
    ]


def round0_reward(round_dir: Path, run_dir: Path) -> Path:
    """A copy of round 0's reward model (later rounds of the align part replace round_dir/reward), made once."""
    copy = run_dir / "reward-round0"
    if not copy.is_dir():
        version = json.loads((round_dir / "reward" / "reward.json").read_text())["version"]
        if version != 0:
            sys.exit(f"{round_dir / 'reward'} is round {version}'s reward model, not round 0's: "
                     "the search needs round 0's; run it before later rounds, or with another --tag")  # fmt: skip
        shutil.copytree(round_dir / "reward", copy)
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/tune.yaml")
    args = parser.parse_args()
    check_base_arguments(parser, args)
    suffix = f"-{args.tag}" if args.tag else ""
    run_dir = Path(f"runs/tune32{suffix}").resolve()
    round_dir = part_run(part_name("rwl", 0, "all", "even", args.tag))
    overrides = [*search_overrides(run_dir, round_dir, args.data.resolve()), *args.overrides]
    config = load_config(SearchConfig, "configs/tune.yaml", overrides)  # before the round: fail early
    clock = time.perf_counter()
    feedback_parts = run_dir / "feedback-round"
    part_path = run_part("rwl", 0, [ROUND_SAMPLES], "all", "even", [], feedback_parts, args.tag, args.base, args.data)
    round_row = json.loads(part_path.read_text())["rows"][0]
    run_dir.mkdir(parents=True, exist_ok=True)
    round0_reward(round_dir, run_dir)
    wall = {"round": time.perf_counter() - clock}
    clock = time.perf_counter()
    written = search(config)
    wall["search"] = time.perf_counter() - clock
    clock = time.perf_counter()
    best = written["best"]
    best_judged = judge(Path(best["model"]), run_dir / f"eval-best-{SAMPLER}", SAMPLER, args.base, args.data)
    wall["judge"] = time.perf_counter() - clock
    best_figures, hand_set = best_judged["model"], round_row["judged"][SAMPLER]["model"]
    fields = flat_branch(config.space[best["branch"]])
    figures = {
        "config": " ".join(["configs/tune.yaml", *overrides]),
        "base_model": str(args.base),
        "data": str(args.data),
        "best_plausibility": best_figures["plausibility"],
        "best_plausibility_ci": best_figures["plausibility_ci"],
        "hand_set_plausibility": hand_set["plausibility"],
        "hand_set_ci": hand_set["plausibility_ci"],
        "base_plausibility": best_judged["base"]["plausibility"],
        "base_ci": best_judged["base"]["plausibility_ci"],
        "target_met": best_figures["plausibility"] >= hand_set["plausibility_ci"][0],
        "best_config": {
            "path": str(written["best_config"]),
            "trial": best["trial"],
            "branch": best["branch"],
            "params": {key: best[key] for key in fields} | {"train.steps": best["step"]},
            "probe": {key: best[key] for key in ("objective", "plausibility", "fid", "coverage")},
        },
        "best_judged": best_figures,
        "hand_set_judged": hand_set,
        "base_judged": best_judged["base"],
        "hand_set_settings": OBJECTIVES["rwl"],
        "hand_set_part": str(part_path),
        "eval_sampling": {**EVAL_SAMPLING, "sampler": SAMPLER},
        "feedback_round": {key: round_row.get(key) for key in ("labels", "plausibility", "reward_auc", "reward_mean")},
        "base_probe": written["base"],
        "as_written_trial": written["as_written"],
        "trials": written["rows"],
        "search": config_to_dict(config),
        "wall_s": wall,
    }
    shutil.copy(written["plot"], RESULTS_DIR / f"tune_pareto{suffix}.png")
    shutil.copy(written["pareto"], RESULTS_DIR / f"tune_pareto{suffix}.md")
    print(f"best trial {best['trial']} ({best['branch']}): {best_figures['plausibility']:.3f} "
          f"{best_figures['plausibility_ci']}; hand-set {hand_set['plausibility']:.3f} {hand_set['plausibility_ci']}")  # fmt: skip
    print(f"wrote {write_result(f'tune_search{suffix}', figures)}")


if __name__ == "__main__":
    main()
