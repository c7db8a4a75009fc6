"""The feedback-weight search on the 32 px benchmark: 12 trials of configs/tune.yaml, then the best config run.

    .venv/bin/python bench/tune_search.py [key.sub=value ...]   # overrides apply to configs/tune.yaml

Its inputs are the 32 px benchmark run and a reward model trained on feedback about its samples:

    .venv/bin/python bench/pretrain32.py --restore            # runs/pretrain32/{data,model,samples/pretrained}
    .venv/bin/python jobs/simulate_feedback.py run_dir=runs/pretrain32 samples=samples/pretrained experts=3
    .venv/bin/python jobs/train_reward.py --config configs/train_reward.yaml   # runs/pretrain32/reward

The first trial runs the paper's setting (beta 0.3, raw reward weights, the finetune section's lr and
steps: as_written_trial); the JSON says whether the best trial beats it on the objective.

Long on 2 CPU cores: each trial finetunes up to 200 steps on 2 Ray Train workers, reporting (and
probing 160 fresh samples) every 50 steps, one trial at a time; plan on several hours. Rerun the same
command to resume a stopped search (Tune restores it from runs/pretrain32/tune/search).

Writes runs/pretrain32/tune/best_feedback.yaml (the best trial's FinetuneConfig), runs/pretrain32/tune/ (trials.csv,
pareto.md, objective_vs_beta.png, the trials' runs), and bench/results/tune_search.json (wall times, the
base model's and every trial's scores, the best config), bench/results/tune_objective_vs_beta.png and
bench/results/tune_pareto.md. With --finetune-best it then runs jobs/finetune.py on the best config too.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from bench_common import RESULTS_DIR, write_result

from pathalign_ray.config import config_to_dict, load_config
from pathalign_ray.tune import search
from pathalign_ray.tune_config import SearchConfig

INPUTS = {
    "finetune.base_model": "bench/pretrain32.py --restore",
    "finetune.data.real_dataset": "bench/pretrain32.py --restore",
    "finetune.reward.model": "jobs/simulate_feedback.py, then jobs/train_reward.py",
}


def _missing_inputs(config: SearchConfig) -> list[str]:
    paths = {
        "finetune.base_model": config.finetune.base_model,
        "finetune.data.real_dataset": config.finetune.data.real_dataset,
        "finetune.reward.model": config.finetune.reward.model if config.finetune.reward.kind == "model" else "",
    }
    missing = [f"{key}={path} (made by {INPUTS[key]})" for key, path in paths.items() if path and not Path(path).exists()]
    samples = [s for s in config.finetune.data.samples if not Path(s).exists()]
    return missing + [f"finetune.data.samples: {s} (made by bench/pretrain32.py --restore)" for s in samples]


def main(argv: list[str]) -> None:
    finetune_best = "--finetune-best" in argv
    overrides = [a for a in argv if a != "--finetune-best"]
    config = load_config(SearchConfig, "configs/tune.yaml", overrides)
    missing = _missing_inputs(config)
    if missing:
        sys.exit("missing inputs; see this script's docstring for how to make them:\n  " + "\n  ".join(missing))
    started = time.perf_counter()
    written = search(config)
    search_s = time.perf_counter() - started
    figures = {
        "config": "configs/tune.yaml " + " ".join(overrides),
        "search": config_to_dict(config),
        "wall_s": {"search": search_s},
        "trials": [{k: v for k, v in row.items()} for row in _rows(written["trials"])],
        "base_model": written["base"],
        "best": written["best"],
        "as_written": written["as_written"],
        "best_beats_as_written": _beats(written["best"], written["as_written"]),
        "best_config": str(written["best_config"]),
    }
    shutil.copy(written["plot"], RESULTS_DIR / "tune_objective_vs_beta.png")
    shutil.copy(written["pareto"], RESULTS_DIR / "tune_pareto.md")
    if finetune_best:
        from pathalign_ray.finetune import FinetuneConfig, finetune

        clock = time.perf_counter()
        best = finetune(load_config(FinetuneConfig, written["best_config"]))
        figures["wall_s"]["finetune_best"] = time.perf_counter() - clock
        figures["best_model"] = str(best.model_dir)
    print(f"wrote {write_result('tune_search', figures)}")


def _beats(best: dict, as_written: dict | None) -> bool | None:
    """Whether the best trial beats the paper's setting (the as-written trial); None without that trial."""
    if as_written is None:
        return None
    return best["trial"] != as_written["trial"] and best["objective"] > as_written["objective"]


def _rows(path: Path) -> list[dict]:
    import csv

    with Path(path).open() as handle:
        return list(csv.DictReader(handle))


if __name__ == "__main__":
    main(sys.argv[1:])
