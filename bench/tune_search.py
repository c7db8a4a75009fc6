"""The feedback-weight search on the 32 px benchmark against the hand-set form, both judged on held-out noise.

    .venv/bin/python bench/tune_search.py [key.sub=value ...]   # overrides apply to configs/tune.yaml

1. One feedback round, bench/align_benchmark.py's RWL at seed 0, in runs/tune32 (align's round 0,
   resumed if done): 256 samples (DDIM 50, eta 1) from models/cells32, 768 simulated labels, a
   reward model, and the hand-set form finetuned on them (centred weights, ratio clip 0.3, lr 1e-4,
   600 steps: align_benchmark.OBJECTIVES["rwl"]).
2. The search (configs/tune.yaml's conditional space, SEARCH below: a 90-minute budget) on that
   round's pool with that round's reward model for every trial. It is not told the hand-set values:
   its first trial is the paper's setting (beta 0.3, raw weights); each trial's probe draws the
   "probe" noise namespace, which no pool, check or evaluation draws. Rerun to resume it.
3. The best trial's model (the highest objective) and the hand-set model judged on the same
   held-out noise: align_benchmark's EVAL_SAMPLING (evaluation namespace) under DDIM 50, eta 1,
   plausibility with its Wilson 95% interval; the base model beside them.

Writes bench/results/tune_search.json (best_plausibility, best_plausibility_ci, hand_set_plausibility,
hand_set_ci, best_config, target_met: the best at least the hand-set's lower bound, the trials
table), bench/results/tune_pareto.md and tune_pareto.png; the search itself under runs/tune32/tune
(trials.csv, pareto.md, pareto.png, best_feedback.yaml). Several hours on 2 cores: the round about
45 minutes, the search 90, the judging about 15.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from align_benchmark import BASE_MODEL, DATA, EVAL_SAMPLING, OBJECTIVES, PARTS, judge, seed_overrides
from bench_common import RESULTS_DIR, write_result

from pathalign_ray.align import AlignConfig, align
from pathalign_ray.config import config_to_dict, load_config
from pathalign_ray.tune.config import SearchConfig, flat_branch
from pathalign_ray.tune.search import search

RUN_DIR = Path("runs/tune32")
SAMPLER = "ddim50_eta1"  # align_benchmark.EVAL_SAMPLERS: the pools' sampler and the base model's best
SEARCH = [
    f"out_dir={RUN_DIR / 'tune'}",
    f"finetune.run_dir={RUN_DIR}",
    f"finetune.base_model={RUN_DIR / 'model'}",
    f"finetune.data.samples=[{RUN_DIR / 'rounds/0/samples'}]",
    f"finetune.data.real_dataset={DATA}",
    f"finetune.reward.model={RUN_DIR / 'reward'}",
    "num_trials=32",  # more than fit: the time budget ends the search
    "time_budget_s=5400",
    "probe.threads=2",  # the probe runs after its trial's Ray Train run, with the cores to itself
]


def feedback_round() -> dict:
    """align_benchmark's RWL round 0 at seed 0 in RUN_DIR: the pool, labels, reward model and the hand-set model."""
    run_dir = RUN_DIR.resolve()
    if not (run_dir / "model").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model").symlink_to(BASE_MODEL.resolve())
    overrides = [f"run_dir={run_dir}", f"reward.data.dataset={DATA.resolve()}", "rounds=1"]
    config = load_config(AlignConfig, "configs/align.yaml", [*overrides, *OBJECTIVES["rwl"], *seed_overrides(0)])
    return align(config)[0]


def reported_hand_set() -> dict | None:
    """align_benchmark's own round-0 figure for the hand-set form at seed 0 (another run of the same round), if any."""
    path = PARTS / "rwl-s0.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    return rows[0]["judged"][SAMPLER]["model"] if rows else None


def main(overrides: list[str]) -> None:
    missing = [f"{path} ({how})" for path, how in ((BASE_MODEL, "bench/pretrain32.py --restore"),
               (DATA, "bench/align_benchmark.py makes it")) if not path.exists()]  # fmt: skip
    if missing:
        sys.exit("missing inputs: " + ", ".join(missing))
    config = load_config(SearchConfig, "configs/tune.yaml", [*SEARCH, *overrides])  # before the round: fail early
    clock = time.perf_counter()
    round_row = feedback_round()
    wall = {"round": time.perf_counter() - clock}
    clock = time.perf_counter()
    written = search(config)
    wall["search"] = time.perf_counter() - clock
    clock = time.perf_counter()
    best = written["best"]
    best_judged = judge(Path(best["model"]), RUN_DIR / f"eval-best-{SAMPLER}", SAMPLER)
    hand_set_judged = judge(RUN_DIR / "round0-model", RUN_DIR / f"eval-hand-set-{SAMPLER}", SAMPLER)
    wall["judge"] = time.perf_counter() - clock
    best_figures, hand_set = best_judged["model"], hand_set_judged["model"]
    fields = flat_branch(config.space[best["branch"]])
    figures = {
        "config": " ".join(["configs/tune.yaml", *SEARCH, *overrides]),
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
        "hand_set_in_align_benchmark": reported_hand_set(),
        "eval_sampling": {**EVAL_SAMPLING, "sampler": SAMPLER},
        "feedback_round": {key: round_row.get(key) for key in ("labels", "plausibility", "reward_auc", "reward_mean")},
        "base_probe": written["base"],
        "as_written_trial": written["as_written"],
        "trials": written["rows"],
        "search": config_to_dict(config),
        "wall_s": wall,
    }
    shutil.copy(written["plot"], RESULTS_DIR / "tune_pareto.png")
    shutil.copy(written["pareto"], RESULTS_DIR / "tune_pareto.md")
    print(f"best trial {best['trial']} ({best['branch']}): {best_figures['plausibility']:.3f} "
          f"{best_figures['plausibility_ci']}; hand-set {hand_set['plausibility']:.3f} {hand_set['plausibility_ci']}")  # fmt: skip
    print(f"wrote {write_result('tune_search', figures)}")


if __name__ == "__main__":
    main(sys.argv[1:])
