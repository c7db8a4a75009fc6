"""report.md, report.html, metrics.json and the plots of an evaluation, from its metrics dict.

Tables have one column per evaluated model and a last column for the real data: the held-out test
split (fidelity, diversity, plausibility) or the train-on-real classifier (utility). Plots are
matplotlib with the Agg backend (no display needed):
    plausibility_per_class.png   simulated pathologist's plausible rate per class, Wilson CIs
    failed_criteria.png          failure rate per checklist criterion (the histogram of failed criteria)
    rounds.png                   plausibility and mean reward per feedback round, when a run has rounds
    grids/NAME.png               a sample grid per model (rows: classes), and one of real test images
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from pathalign_ray.experts.checklist import CRITERIA

REAL_COLUMN = "real_test"
SPACE_TITLES = {"domain": "domain encoder", "inception": "InceptionV3"}


def write_metrics(metrics: dict, out_dir: Path) -> Path:
    """metrics.json: every number of the evaluation; NaN written as null (valid JSON)."""
    path = Path(out_dir) / "metrics.json"
    path.write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    return path


def write_report(metrics: dict, grids: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """Write the plots, report.md and report.html; returns {"md", "html", plot name: path}."""
    out_dir = Path(out_dir)
    plots = _plots(metrics, out_dir)
    sections = _sections(metrics)
    images = [(f"Samples: {name}", path) for name, path in grids.items()] + [
        (title, path) for title, path in plots.values()
    ]
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(_markdown(metrics, sections, images, out_dir))
    page.write_text(_html(metrics, sections, images, out_dir))
    return {"md": md, "html": page, **{name: path for name, (_, path) in plots.items()}}


# ---------------------------------------------------------------- tables


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def _rate(value: dict | None) -> str:
    if value is None:
        return "n/a"
    if not value["n"]:
        return "n/a (0)"
    return f"{value['rate']:.3f} [{value['low']:.3f}, {value['high']:.3f}] ({value['successes']}/{value['n']})"


def _sections(metrics: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """[(title, description, header, rows)] of the report's tables."""
    models = [c for c in metrics["columns"] if c != REAL_COLUMN]
    header = ["metric", *models, "real"]
    sections = []

    rows = []
    for space, values in metrics["fidelity"].items():
        rows.append(
            [
                f"Frechet distance ({SPACE_TITLES[space]})",
                *[_fmt(values[c]["frechet_distance"]) for c in metrics["columns"]],
            ]
        )
    sections.append(
        (
            "Fidelity",
            "Frechet distance to the real training split (lower is better); real = held-out test images.",
            header,
            rows,
        )
    )

    rows = []
    for space, values in metrics["diversity"].items():
        for name in ("precision", "recall", "density", "coverage"):
            rows.append([f"{name} ({SPACE_TITLES[space]})", *[_fmt(values[c][name]) for c in metrics["columns"]]])
    k = metrics["config"]["prdc_k"]
    sections.append(
        (
            "Diversity",
            f"Naeem et al. 2020 against the real training split, k = {k}; real = held-out test images.",
            header,
            rows,
        )
    )

    utility = metrics["utility"]
    utility_columns = [*models, "train_on_real"]
    rows = [
        [name.replace("_", " "), *[_fmt(utility[c][name]) for c in utility_columns]]
        for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
    ]
    rows.append(["training images", *[str(utility[c]["n_train"]) for c in utility_columns]])
    sections.append(
        (
            "Utility",
            (
                "A classifier trained on each model's images (declared classes), tested on the real test split; "
                "real = the same classifier trained on the real training split."
            ),
            header,
            rows,
        )
    )

    simulated = metrics["plausibility"]["simulated"]
    if simulated:
        get = lambda c: simulated.get(c)
        rows = [
            ["plausible (all classes)", *[_rate(get(c) and get(c)["plausible"]) for c in metrics["columns"]]],
            ["no cell found", *[_rate(get(c) and get(c)["no_cell"]) for c in metrics["columns"]]],
            *_class_and_criterion_rows(get, metrics),
        ]
        confidence = metrics["config"]["confidence"]
        sections.append(
            (
                "Plausibility: simulated pathologist",
                (
                    f"Rates with Wilson {confidence:.0%} intervals and counts; "
                    "real = held-out test images judged against their true class."
                ),
                header,
                rows,
            )
        )

    experts = metrics["plausibility"]["experts"]
    if experts:
        get = lambda c: experts.get(c)
        rows = [
            ["plausible (majority)", *[_rate(get(c) and get(c)["plausible"]) for c in metrics["columns"]]],
            [
                "samples judged / ties",
                *[f"{get(c)['samples']} / {get(c)['ties']}" if get(c) else "n/a" for c in metrics["columns"]],
            ],
            *_class_and_criterion_rows(get, metrics),
        ]
        sections.append(
            (
                "Plausibility: experts",
                "Majority verdict per sample from the run's feedback store, on these very images (ties left out).",
                header,
                rows,
            )
        )

    encoder = metrics["domain_encoder"]
    rows = [
        ["real test accuracy", _fmt(encoder["test_metrics"]["accuracy"])],
        ["real test macro AUC", _fmt(encoder["test_metrics"]["macro_auc"])],
        ["feature width", str(encoder["feature_dim"])],
        ["from cache", str(encoder["cached"])],
    ]
    sections.append(
        (
            "Domain encoder",
            "The feature space of the domain rows: a cell-type CNN trained on the real training split.",
            ["", "value"],
            rows,
        )
    )
    rows = [[name, f"{seconds:.1f}"] for name, seconds in metrics["timings"].items()]
    sections.append(("Timings", "Wall time per stage, seconds.", ["stage", "s"], rows))
    return sections


def _class_and_criterion_rows(get, metrics: dict) -> list[list[str]]:
    """A plausibility section's rows per declared class and per checklist criterion; get(column) is the
    column's verdict summary or None."""
    columns = metrics["columns"]
    rows = [
        [f"plausible: {name}", *[_rate(get(c) and get(c)["per_class"].get(name)) for c in columns]]
        for name in metrics["dataset"]["class_names"]
    ]
    return rows + [
        [f"fails {criterion}", *[_rate(get(c) and get(c)["failure_rate"][criterion]) for c in columns]]
        for criterion in CRITERIA
    ]


# ---------------------------------------------------------------- plots


def _plots(metrics: dict, out_dir: Path) -> dict[str, tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    simulated = metrics["plausibility"]["simulated"]
    columns = [c for c in metrics["columns"] if c in simulated]
    if columns:
        classes = metrics["dataset"]["class_names"]
        plots["plausibility"] = (
            "Simulated pathologist: plausible rate per declared class",
            out_dir / "plausibility_per_class.png",
        )
        _grouped_bars(
            plt,
            classes,
            columns,
            lambda c, x: simulated[c]["per_class"].get(x),
            "plausible rate",
            plots["plausibility"][1],
        )
        plots["failed_criteria"] = (
            "Failed criteria: failure rate per checklist criterion",
            out_dir / "failed_criteria.png",
        )
        _grouped_bars(
            plt,
            list(CRITERIA),
            columns,
            lambda c, x: simulated[c]["failure_rate"][x],
            "failure rate",
            plots["failed_criteria"][1],
        )
    runs = metrics.get("runs") or {}
    if runs:
        plots["rounds"] = ("Plausibility and mean reward per feedback round", out_dir / "rounds.png")
        _rounds_plot(plt, runs, plots["rounds"][1])
    return plots


def _grouped_bars(plt, groups: list[str], columns: list[str], get, ylabel: str, path: Path) -> None:
    """Bars per group, one per column, with Wilson error bars; a missing value is left out."""
    width = 0.8 / len(columns)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(columns)) ** 0.5 + 2), 4))
    for j, column in enumerate(columns):
        xs, ys, low, high = [], [], [], []
        for i, group in enumerate(groups):
            value = get(column, group)
            if value and value["n"]:
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(value["rate"])
                low.append(max(value["rate"] - value["low"], 0.0))
                high.append(max(value["high"] - value["rate"], 0.0))
        axes.bar(xs, ys, width, yerr=[low, high], capsize=2, label=column)
    axes.set_xticks(range(len(groups)), [g.replace("_", "\n") for g in groups], fontsize=7)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _rounds_plot(plt, runs: dict, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, run in runs.items():
        table = [row for row in run["rounds"] if row.get("plausibility") is not None]
        if table:
            left.plot(
                [r["round"] for r in table], [r["plausibility"] for r in table], "o-", label=f"{name} (rounds.jsonl)"
            )
        feedback = [row for row in run["feedback_rounds"] if row["n"]]
        if feedback:
            rounds = [r["round"] for r in feedback]
            rates = [r["rate"] for r in feedback]
            errors = [
                [max(r["rate"] - r["low"], 0.0) for r in feedback],
                [max(r["high"] - r["rate"], 0.0) for r in feedback],
            ]
            left.errorbar(rounds, rates, yerr=errors, fmt="s--", capsize=3, label=f"{name} (expert verdicts)")
        rewards = [row for row in run["rounds"] if row.get("reward_mean") is not None]
        if rewards:
            right.plot([r["round"] for r in rewards], [r["reward_mean"] for r in rewards], "o-", label=name)
    left.set(xlabel="round", ylabel="plausible rate", ylim=(0, 1.05), title="plausibility")
    right.set(xlabel="round", ylabel="mean reward", title="reward")
    for axes in (left, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
        else:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------- documents


def _intro(metrics: dict) -> list[str]:
    dataset = metrics["dataset"]
    lines = [
        (
            f"Real data: {dataset['path']} ({dataset['image_size']} px, {len(dataset['class_names'])} classes, "
            f"{dataset['counts']['train']['total']} train / {dataset['counts']['test']['total']} test images)."
        )
    ]
    for name in metrics["columns"]:
        s = metrics["sets"][name]
        source = f"sampled from {s['model']}" if "model" in s else s["path"]
        step = f", model step {s['model_step']}" if "model_step" in s else ""
        lines.append(f"- {name}: {s['n_images']} images, {source}{step}")
    return lines


def _markdown(metrics: dict, sections, images, out_dir: Path) -> str:
    out = ["# Evaluation report", "", *_intro(metrics), ""]
    for title, description, header, rows in sections:
        out += [f"## {title}", "", description, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
    out += ["## Figures", ""]
    for title, path in images:
        out += [f"### {title}", "", f"![{title}]({Path(path).relative_to(out_dir).as_posix()})", ""]
    if metrics["notes"]:
        out += ["## Notes", "", *[f"- {note}" for note in metrics["notes"]], ""]
    return "\n".join(out)


def _html(metrics: dict, sections, images, out_dir: Path) -> str:
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;margin-bottom:1em}",
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right} td:first-child{text-align:left}",
        "img{max-width:100%;image-rendering:pixelated}</style></head><body><h1>Evaluation report</h1>",
    ]
    intro = _intro(metrics)
    out.append(f"<p>{e(intro[0])}</p><ul>" + "".join(f"<li>{e(line[2:])}</li>" for line in intro[1:]) + "</ul>")
    for title, description, header, rows in sections:
        out.append(
            f"<h2>{e(title)}</h2><p>{e(description)}</p><table><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in header)
            + "</tr>"
        )
        out += ["<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in rows]
        out.append("</table>")
    out.append("<h2>Figures</h2>")
    for title, path in images:
        out.append(f"<h3>{e(title)}</h3><img src='{e(Path(path).relative_to(out_dir).as_posix())}' alt='{e(title)}'>")
    if metrics["notes"]:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(note)}</li>" for note in metrics["notes"]) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
