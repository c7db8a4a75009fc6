"""What the feedback-weight search writes once its trials end: the tables, the plot and the best config.

Under OUT_DIR: trials.csv and trials.md (one row per trial: its branch and params, last report,
status, error, Pareto flag, model folder), pareto.md and pareto.png (plausibility against FID, the
front marked, beside the base model); and the best trial's FinetuneConfig at `best_config`, ready for
jobs/finetune.py. Each is written through `pathalign_ray.storage`: with OUT_DIR a URI, the bucket holds them.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import yaml

from pathalign_ray import storage
from pathalign_ray.config import config_to_dict
from pathalign_ray.generator.finetune import FinetuneConfig
from pathalign_ray.tune.config import (
    TRIAL_NAME,
    SearchConfig,
    as_written_params,
    branch_params,
    flat_branch,
    map_input_paths,
    trial_config,
    trial_run_dir,
)
from pathalign_ray.tune.objective import pareto_front

METRICS = ("objective", "gain", "plausibility", "fid", "coverage", "fid_penalty", "coverage_penalty")


def param_keys(config: SearchConfig) -> list[str]:
    """Every dotted key any branch fixes or draws, in the order the branches give them: the table's param columns."""
    return list(dict.fromkeys(key for branch in config.space.values() for key in flat_branch(branch)))


def trial_rows(results, config: SearchConfig) -> list[dict]:
    """One row per trial: its params, its last report (the state it ended in), status, error, Pareto flag."""
    rows = []
    as_written = as_written_params(config) if config.as_written_trial else None
    keys = param_keys(config)
    for result in results:
        metrics = result.metrics or {}
        params = branch_params(config, result.config)
        steps = trial_config(config, params, config.out_dir, "row").train.steps
        step = metrics.get("step")
        status = "error" if result.error else ("done" if step == steps else "stopped early")
        trial = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        row = {
            "trial": trial,
            "status": status,
            "step": step,
            **{k: metrics.get(k, math.nan) for k in METRICS},
            "branch": params["branch"],
            **{k: params.get(k) for k in keys},
            "as_written": params == as_written,
            "model": storage.join(trial_run_dir(config.out_dir, trial), f"{TRIAL_NAME}-model"),
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
    """trials.csv, trials.md, pareto.md, pareto.png and the best config; each printed or named. Returns where they
    went, the rows, the best and as-written rows and the base model's probe."""
    import csv

    columns = list(rows[0]) if rows else []
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    trials = _write(config.out_dir, "trials.csv", buffer.getvalue())
    table = markdown_table(rows, [c for c in columns if c not in ("error", "model")])
    _write(config.out_dir, "trials.md", table)
    print(f"trials:\n{table}")
    errors = [f"trial {r['trial']}: {r['error']}" for r in rows if r["error"]]
    if errors:
        print("failed trials:\n" + "\n".join(errors))
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["fid"])
    keys = [k for k in param_keys(config) if any(r[k] is not None for r in front)]
    pareto = markdown_table(front, ["trial", "branch", "step", "plausibility", "fid", "coverage", "objective", *keys])
    pareto_path = _write(config.out_dir, "pareto.md", pareto)
    print(
        f"Pareto front, plausibility against FID (base model: plausibility {base['plausibility']:.4g}, "
        f"FID {base['fid']:.4g}):\n{pareto}"
    )
    plot = plot_pareto(rows, base, storage.join(config.out_dir, "pareto.png"))
    scored = [r for r in rows if np.isfinite(r["objective"])]
    if not scored:
        raise RuntimeError(f"no trial of the search reported an objective; see {trials}: " + "; ".join(errors))
    best = max(scored, key=lambda r: r["objective"])
    best_path = write_best_config(best, config)
    print(f"best trial {best['trial']}: objective {best['objective']:.4g}; its config: {best_path}")
    as_written = next((r for r in rows if r["as_written"]), None)
    if as_written is not None:
        print(
            f"as-written trial {as_written['trial']} (the finetune section's own values): "
            f"objective {as_written['objective']:.4g}, status {as_written['status']}"
        )
    return {
        "trials": trials,
        "pareto": pareto_path,
        "plot": plot,
        "best_config": best_path,
        "rows": rows,
        "best": best,
        "as_written": as_written,
        "base": base,
    }


def _write(out_dir: str, name: str, text: str) -> str | Path:
    """OUT_DIR/name (a file, or an object on the bucket); returns where, as storage.location gives it."""
    location = storage.join(out_dir, name)
    storage.write_bytes(location, text.encode())
    return storage.location(location)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict], base: dict, path: str | Path) -> str | Path:
    """Plausibility against domain FID, one marker per branch, the Pareto front joined, the best trial starred,
    the as-written trial ringed, the base model a cross; a PNG at `path` (a path or URI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4), dpi=120)
    scored = [r for r in rows if np.isfinite(r["plausibility"]) and np.isfinite(r["fid"])]
    for branch, marker in zip(dict.fromkeys(r["branch"] for r in scored), "osv^<>pDh8"):
        mine = [r for r in scored if r["branch"] == branch]
        axes.scatter(
            [r["fid"] for r in mine], [r["plausibility"] for r in mine], marker=marker, alpha=0.8, label=branch
        )
    front = sorted((r for r in scored if r["pareto"]), key=lambda r: r["fid"])
    axes.step(
        [r["fid"] for r in front],
        [r["plausibility"] for r in front],
        where="post",
        color="black",
        linewidth=1,
        label="Pareto front",
    )
    axes.scatter([base["fid"]], [base["plausibility"]], marker="x", s=80, color="grey", label="base model")
    objectives = [r for r in scored if np.isfinite(r["objective"])]
    if objectives:
        best = max(objectives, key=lambda r: r["objective"])
        axes.scatter(
            [best["fid"]],
            [best["plausibility"]],
            marker="*",
            s=220,
            facecolors="none",
            edgecolors="red",
            label=f"best objective ({best['trial']})",
        )
    written = [r for r in scored if r["as_written"]]
    axes.scatter(
        [r["fid"] for r in written],
        [r["plausibility"] for r in written],
        marker="o",
        s=160,
        facecolors="none",
        edgecolors="black",
        label="as written (the paper's setting)",
    )
    if not scored:
        axes.text(0.5, 0.5, "no trial reported a probe", ha="center", transform=axes.transAxes)
    axes.set_xlabel("domain FID against the real training set (lower is better)")
    axes.set_ylabel("plausibility on the probe's noise")
    axes.legend(fontsize=7)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    plt.close(figure)
    storage.write_bytes(path, png.getvalue())
    return storage.location(path)


def _paths_relative_to_cwd(config: FinetuneConfig) -> FinetuneConfig:
    """The search made the input paths absolute for the trials (search._resolved); those under the working
    directory go back to relative, so the best config stays usable from another checkout of the project.
    URIs stay as they are."""
    cwd = Path.cwd()

    def relative(location: str) -> str:
        path = storage.location(location)  # a Path for a plain path, the string itself for a URI
        return str(path.relative_to(cwd)) if isinstance(path, Path) and path.is_relative_to(cwd) else location

    return map_input_paths(config, relative)


def write_best_config(best: dict, config: SearchConfig) -> str | Path:
    """The best trial's FinetuneConfig, at the step count its objective was measured at, for jobs/finetune.py."""
    params = {"branch": best["branch"], **{k: best[k] for k in flat_branch(config.space[best["branch"]])}}
    params["train.steps"] = int(best["step"])
    finetune = _paths_relative_to_cwd(trial_config(config, params, config.finetune.run_dir, config.best_name))
    header = (
        f"# jobs/tune.py: the best of {config.num_trials} trials (trial {best['trial']}, branch {best['branch']}): objective "
        f"{best['objective']:.4g}, plausibility {best['plausibility']:.4g}, FID {best['fid']:.4g}, "
        f"coverage {best['coverage']:.4g}\n# run it: python jobs/finetune.py --config THIS_FILE\n"
    )
    # a search result, not a shipped config
    path = config.best_config or storage.join(config.out_dir, "best_feedback.yaml")
    storage.write_bytes(path, (header + yaml.safe_dump(config_to_dict(finetune), sort_keys=False)).encode())
    return storage.location(path)
