"""What the feedback-weight search writes once its trials end: the tables, the plot and the best config.

Under OUT_DIR: trials.csv and trials.md (one row per trial: params, last report, status, error,
Pareto flag), pareto.md (plausibility against FID), objective_vs_beta.png; and the best trial's
FinetuneConfig at `best_config`, ready for jobs/finetune.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from pathalign_ray.config import config_to_dict
from pathalign_ray.finetune import FinetuneConfig
from pathalign_ray.tune_config import SearchConfig, as_written_params, map_input_paths, trial_config
from pathalign_ray.tune_objective import pareto_front

METRICS = ("objective", "gain", "plausibility", "fid", "coverage", "fid_penalty", "coverage_penalty")


def trial_rows(results, config: SearchConfig) -> list[dict]:
    """One row per trial: its params, its last report (the state it ended in), status, error, Pareto flag."""
    rows = []
    as_written = as_written_params(config) if config.as_written_trial else None
    for result in results:
        metrics = result.metrics or {}
        params = {k: result.config.get(k) for k in config.ranges}
        steps = trial_config(config, params, config.out_dir, "row").train.steps
        step = metrics.get("step")
        status = "error" if result.error else ("done" if step == steps else "stopped early")
        row = {
            "trial": metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"),
            "status": status,
            "step": step,
            **{k: metrics.get(k, math.nan) for k in METRICS},
            **params,
            "as_written": params == as_written,
            "error": _last_line(result.error) if result.error else "",
        }
        rows.append(row)
    front = pareto_front([r["plausibility"] for r in rows], [r["fid"] for r in rows]) if rows else []
    for row, on_front in zip(rows, front):
        row["pareto"] = bool(on_front)
    return rows


def _last_line(error: BaseException) -> str:
    """The message of a trial's error: a RayTaskError's text ends with the original exception's line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:400] if lines else type(error).__name__


def write_results(rows: list[dict], config: SearchConfig, base: dict) -> dict:
    """trials.csv, trials.md, pareto.md, objective_vs_beta.png and the best config; each printed or named."""
    import csv

    out = Path(config.out_dir)
    columns = list(rows[0]) if rows else []
    with (out / "trials.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows, [c for c in columns if c != "error"])
    (out / "trials.md").write_text(table)
    print(f"trials:\n{table}")
    errors = [f"trial {r['trial']}: {r['error']}" for r in rows if r["error"]]
    if errors:
        print("failed trials:\n" + "\n".join(errors))
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["fid"])
    pareto = markdown_table(front, ["trial", "plausibility", "fid", "coverage", "objective", *config.ranges])
    (out / "pareto.md").write_text(pareto)
    print(f"Pareto front, plausibility against FID (base model: plausibility {base['plausibility']:.4g}, "
          f"FID {base['fid']:.4g}):\n{pareto}")
    plot = plot_objective_vs_beta(rows, config, out / "objective_vs_beta.png")
    scored = [r for r in rows if np.isfinite(r["objective"])]
    if not scored:
        where = out / "trials.csv"
        raise RuntimeError(f"no trial of the search reported an objective; see {where}: " + "; ".join(errors))
    best = max(scored, key=lambda r: r["objective"])
    best_path = write_best_config(best, config)
    print(f"best trial {best['trial']}: objective {best['objective']:.4g}; its config: {best_path}")
    as_written = next((r for r in rows if r["as_written"]), None)
    if as_written is not None:
        print(f"as-written trial {as_written['trial']} (the finetune section's own values): "
              f"objective {as_written['objective']:.4g}, status {as_written['status']}")
    return {
        "trials": out / "trials.csv", "pareto": out / "pareto.md", "plot": plot, "best_config": best_path, "best": best,
        "as_written": as_written, "base": base,
    }


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_objective_vs_beta(rows: list[dict], config: SearchConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    beta = [r.get("objective.beta", config.finetune.objective.beta) for r in rows]
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    for status, marker in (("done", "o"), ("stopped early", "x")):
        chosen = [i for i, r in enumerate(rows) if r["status"] == status and np.isfinite(r["objective"])]
        axes.scatter([beta[i] for i in chosen], [rows[i]["objective"] for i in chosen], marker=marker, label=status)
    scored = [i for i, r in enumerate(rows) if np.isfinite(r["objective"])]
    if scored:
        best = max(scored, key=lambda i: rows[i]["objective"])
        axes.scatter([beta[best]], [rows[best]["objective"]], marker="*", s=160, facecolors="none",
                     edgecolors="red", label=f"best ({rows[best]['trial']})")
        written = [i for i in scored if rows[i].get("as_written")]
        axes.scatter([beta[i] for i in written], [rows[i]["objective"] for i in written], marker="D", s=90,
                     facecolors="none", edgecolors="black", label="as written (the paper's setting)")
    else:
        axes.text(0.5, 0.5, "no trial reported an objective", ha="center", transform=axes.transAxes)
    if scored and getattr(config.ranges.get("objective.beta"), "kind", "") == "loguniform":
        axes.set_xscale("log")
        axes.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap over a decade
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_xlabel("beta (weight of the real-data term)")
    axes.set_ylabel("objective (plausibility gain - penalties)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _paths_relative_to_cwd(config: FinetuneConfig) -> FinetuneConfig:
    """The search made the input paths absolute for the trials (tune._resolved); those under the working
    directory go back to relative, so the best config stays usable from another checkout of the project."""
    cwd = Path.cwd()
    return map_input_paths(config, lambda path: str(Path(path).relative_to(cwd)) if Path(path).is_relative_to(cwd) else path)


def write_best_config(best: dict, config: SearchConfig) -> Path:
    """The best trial's FinetuneConfig, at the step count its objective was measured at, for jobs/finetune.py."""
    params = {k: best[k] for k in config.ranges}
    params["train.steps"] = int(best["step"])
    finetune = _paths_relative_to_cwd(trial_config(config, params, config.finetune.run_dir, config.best_name))
    header = (
        f"# jobs/tune.py: the best of {config.num_trials} trials (trial {best['trial']}): objective "
        f"{best['objective']:.4g}, plausibility {best['plausibility']:.4g}, FID {best['fid']:.4g}, "
        f"coverage {best['coverage']:.4g}\n# run it: python jobs/finetune.py --config THIS_FILE\n"
    )
    path = Path(config.best_config or Path(config.out_dir) / "best_feedback.yaml")  # a search result, not a shipped config
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(config_to_dict(finetune), sort_keys=False))
    return path
