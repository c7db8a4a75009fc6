"""The demo's figures and its one-page report: the generator before and after feedback, on held-out noise.

`demo_summary` is pure (dicts in, dict out); `write_demo_report` writes one self-contained HTML file,
every image inline, that a browser opens from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from pathalign_ray import storage
from pathalign_ray.reward.metrics import auc_text

CURVES = ("loss", "reward_mean", "fresh_reward_mean", "kl_to_base")  # finetuning history keys plotted, if logged


def demo_summary(metrics: dict, rows: list[dict], reward_info: dict, wall_s: float) -> dict:
    """The demo's figures from the evaluation's metrics.json (columns: base, finetuned, real_test), the
    align rounds' rows and the last reward model's reward.json."""
    before, after = metrics["columns"][:2]
    sampling = metrics["config"]["sampling"]
    test = reward_info.get("metrics", {})
    figures = {name: _model_figures(metrics, column) for name, column in (("before", before), ("after", after))}
    return {
        **figures,
        "plausibility_gain_pp": 100 * (figures["after"]["plausibility"] - figures["before"]["plausibility"]),
        "real_plausibility": metrics["plausibility"]["simulated"]["real_test"]["plausible"]["rate"],
        "labels": rows[-1]["labels"],
        "rounds": len(rows),
        "reward_auc": test.get("test/expert/auc"),
        "reward_auc_text": auc_text(
            test.get("test/expert/auc"), test.get("test/expert/n", 0), test.get("test/expert/n_plausible", 0)
        ),
        "eval_noise": {key: sampling[key] for key in ("namespace", "seed", "n_per_class", "ddim_steps", "eta")},
        "wall_s": wall_s,
    }


def _model_figures(metrics: dict, column: str) -> dict:
    simulated = metrics["plausibility"]["simulated"][column]
    return {
        "name": column,
        "plausibility": simulated["plausible"]["rate"],
        "plausibility_ci": [simulated["plausible"]["low"], simulated["plausible"]["high"]],
        "per_class": {name: value["rate"] for name, value in simulated["per_class"].items()},
        "failure_rate": {name: value["rate"] for name, value in simulated["failure_rate"].items()},
        "domain_fid": metrics["fidelity"]["domain"][column]["frechet_distance"],
        "coverage": metrics["diversity"]["domain"][column]["coverage"],
        "utility_accuracy": metrics["utility"][column]["accuracy"],
    }


def headline(summary: dict) -> list[str]:
    """The few lines the demo ends with."""
    b, a = summary["before"], summary["after"]
    noise = summary["eval_noise"]
    return [
        (
            f"plausibility {_pct(b['plausibility'])} [{_pct(b['plausibility_ci'][0])}, {_pct(b['plausibility_ci'][1])}] -> "
            f"{_pct(a['plausibility'])} [{_pct(a['plausibility_ci'][0])}, {_pct(a['plausibility_ci'][1])}] "
            f"({summary['plausibility_gain_pp']:+.1f} pp; real images {_pct(summary['real_plausibility'])}), "
            f"on {noise['n_per_class']} held-out samples per class (DDIM {noise['ddim_steps']}, eta {noise['eta']:g})"
        ),
        (
            f"domain FID {b['domain_fid']:.3f} -> {a['domain_fid']:.3f}, coverage {b['coverage']:.3f} -> {a['coverage']:.3f}, "
            f"utility accuracy {b['utility_accuracy']:.3f} -> {a['utility_accuracy']:.3f}"
        ),
        (
            f"{summary['labels']} labels in {summary['rounds']} round(s); reward model held-out AUC {summary['reward_auc_text']}; "
            f"{summary['wall_s']:.0f} s"
        ),
    ]


def write_demo_report(summary: dict, metrics: dict, history: list[dict], grids: Path, path: str | Path) -> str | Path:
    """RUN_DIR/report.html (a path or a URI): contact sheets side by side, plausibility per class, failed criteria,
    reward model, finetuning curves; `grids` is the evaluation's local folder of contact sheets (one PNG per column)."""
    e = html.escape
    b, a = summary["before"], summary["after"]
    rows = [
        ("plausibility (simulated pathologist)", _pct(b["plausibility"]), _pct(a["plausibility"])),
        ("95% interval", _interval(b["plausibility_ci"]), _interval(a["plausibility_ci"])),
        ("domain FID (lower is closer to real)", f"{b['domain_fid']:.3f}", f"{a['domain_fid']:.3f}"),
        ("coverage", f"{b['coverage']:.3f}", f"{a['coverage']:.3f}"),
        ("utility: train-on-synthetic accuracy", f"{b['utility_accuracy']:.3f}", f"{a['utility_accuracy']:.3f}"),
    ]
    noise = summary["eval_noise"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>pathalign_ray demo</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse}",
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right} td:first-child{text-align:left}",
        ".pair{display:flex;gap:1.5em} .pair figure{flex:1;margin:0} img{max-width:100%;image-rendering:pixelated}",
        "</style></head><body>",
        "<h1>One round of expert feedback: the generator before and after</h1>",
        "<p>" + "<br>".join(e(line) for line in headline(summary)) + "</p>",
        (
            f"<p>Both models were judged on the same noise, drawn in the <code>{e(noise['namespace'])}</code> seed "
            f"namespace (base seed {noise['seed']}), which no feedback round, finetuning check or Tune probe ever draws.</p>"
        ),
        "<h2>Before and after</h2><table><tr><th></th><th>before</th><th>after</th></tr>",
        *[f"<tr><td>{e(name)}</td><td>{e(x)}</td><td>{e(y)}</td></tr>" for name, x, y in rows],
        "</table>",
        "<h2>Samples, one row per declared cell type</h2><div class='pair'>",
        *[
            f"<figure><figcaption>{e(caption)}</figcaption>{_img((grids / (s['name'] + '.png')).read_bytes(), caption)}</figure>"
            for caption, s in (("before: the generator the round started from", b), (f"after: {a['name']}", a))
        ],
        "</div>",
        "<h2>Plausibility per cell type</h2>",
        _img(_bars(list(b["per_class"]), b["per_class"], a["per_class"], "plausible"), "plausibility per class"),
        "<h2>Checklist criteria that failed</h2>",
        _img(
            _bars(list(b["failure_rate"]), b["failure_rate"], a["failure_rate"], "share of samples failing"),
            "failed criteria",
        ),
        "<h2>Reward model</h2>",
        f"<p>Held-out AUC on the experts' verdicts: {e(summary['reward_auc_text'])} ({summary['labels']} labels).</p>",
        "<h2>Finetuning</h2>",
        _img(_curves(history), "finetuning curves")
        if len(history) >= 2
        else "<p>n/a: fewer than two finetuning steps logged</p>",
        "</body></html>",
    ]
    storage.write_bytes(path, "\n".join(parts).encode())
    return path


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _interval(bounds: list[float]) -> str:
    return f"[{_pct(bounds[0])}, {_pct(bounds[1])}]"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _bars(labels: list[str], before: dict, after: dict, ylabel: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(labels))
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 3.6))
    axis.bar(x - 0.2, [before[k] for k in labels], 0.4, label="before", color="#999999")
    axis.bar(x + 0.2, [after.get(k, np.nan) for k in labels], 0.4, label="after", color="#3b7dd8")
    axis.set_xticks(x, [label.replace("_", "\n") for label in labels], fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel(ylabel)
    axis.legend()
    return _png(figure)


def _curves(history: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in CURVES if sum(key in row for row in history) >= 2]  # a curve needs two points
    figure, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(row["step"], row[key]) for row in history if key in row]
        axis.plot(*zip(*points), marker="." if len(points) < 30 else None)
        axis.set_title(key)
        axis.set_xlabel("step")
    return _png(figure)
