"""Ray Tune searches the feedback-loss weights: jobs/tune.py on the session's Ray cluster, a tiny model, CPU.

Each trial is a Tune function trial that runs Ray Train V2 finetuning (DeepSpeed, one worker here)
in chunks and reports the probe's objective after each; the best config then runs with jobs/finetune.py.
"""

from __future__ import annotations

import csv
import json
import runpy
import shutil
from pathlib import Path

import pytest

from pathalign_ray.config import ConfigError, load_config
from pathalign_ray.finetune import FinetuneConfig
from pathalign_ray.tune_config import SearchConfig

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def _job(name: str):
    return runpy.run_path(str(ROOT / "jobs" / f"{name}.py"), run_name="job")["main"]


def _search_args(out_dir, model_dir, samples, dataset, *overrides) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "tune.yaml"),
        f"out_dir={out_dir}",
        f"best_config={out_dir / 'best_feedback.yaml'}",
        "num_trials=3",
        "report_every=4",  # one report per trial: each report is a Ray Train run (~30 s here)
        "max_concurrent_trials=0",  # as many as the cluster's CPUs hold
        "probe.n_per_class=4",
        "probe.ddim_steps=3",
        "probe.encoder.steps=20",
        "probe.encoder.batch_size=16",
        "space.train.lr={kind: loguniform, low: 1.0e-4, high: 1.0e-3}",
        "space.train.steps={kind: choice, values: [2, 4]}",
        "finetune.train.steps=4",  # the as-written trial's (the paper's beta 0.3, raw weights)
        f"finetune.run_dir={out_dir / 'best_run'}",
        f"finetune.base_model={model_dir}",
        f"finetune.data.samples=[{samples}]",
        f"finetune.data.real_dataset={dataset}",
        "finetune.reward.kind=pathologist",
        "finetune.train.batch_size=4",
        "finetune.train.log_every=1",
        "finetune.train.checkpoint_every=2",
        "finetune.train.eval_per_class=1",
        "finetune.train.eval_ddim_steps=2",
        "finetune.scale.num_workers=1",
        "finetune.scale.zero_stage=0",
        *overrides,
    ]


def test_a_stuck_search_fails_with_a_message_then_resumes_three_trials_and_jobs_finetune_runs_the_best(
    tiny_pretrained, tiny_samples, tiny_dataset, tmp_path, capsys
):
    """Too short a report timeout stands in for a stuck Ray Train run: every trial fails with a message
    and the search says so. Rerunning the command restores the search (Tuner.restore), reruns the
    failed trials to the end, writes the tables, the plot and the best config; jobs/finetune.py runs it."""
    _, _, model_dir = tiny_pretrained
    out_dir, dataset = tmp_path / "tune", tmp_path / "data"
    shutil.copytree(tiny_dataset, dataset)  # a copy: the search caches its domain encoder beside the data set
    args = _search_args(out_dir, model_dir, tiny_samples, dataset)
    search_job = _job("tune")
    with pytest.raises(RuntimeError, match="no trial of the search reported an objective"):
        search_job([*args, "report_timeout_s=2"])
    rows = list(csv.DictReader((out_dir / "trials.csv").open()))
    assert len(rows) == 3 and all(row["status"] == "error" for row in rows), rows
    assert all("did not finish within report_timeout_s=2 s" in row["error"] for row in rows), rows

    capsys.readouterr()
    written = search_job([*args, "report_timeout_s=600"])
    assert "resuming the search" in capsys.readouterr().out
    rows = list(csv.DictReader((out_dir / "trials.csv").open()))
    assert len(rows) == 3 and all(row["status"] == "done" and row["error"] == "" for row in rows), rows
    assert {row["train.steps"] for row in rows} <= {"2", "4"}
    (as_written,) = [row for row in rows if row["as_written"] == "True"]
    assert (float(as_written["objective.beta"]), as_written["objective.weighting"]) == (0.3, "raw")
    assert written["as_written"]["trial"] == as_written["trial"]
    for row in rows:
        assert int(row["step"]) == int(row["train.steps"])
        assert 0.0 <= float(row["plausibility"]) <= 1.0 and float(row["fid"]) > 0.0
        assert float(row["objective"]) == pytest.approx(
            float(row["gain"]) - float(row["fid_penalty"]) - float(row["coverage_penalty"])
        )
    assert any(row["pareto"] == "True" for row in rows)
    assert (out_dir / "pareto.md").read_text().count("\n") >= 3  # header, rule, at least one trial
    assert (out_dir / "objective_vs_beta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best_path = written["best_config"]
    assert best_path == out_dir / "best_feedback.yaml"
    best = load_config(FinetuneConfig, best_path)
    best_row = max(rows, key=lambda row: float(row["objective"]))
    assert best.objective.beta == pytest.approx(float(best_row["objective.beta"]))
    assert best.objective.weighting == best_row["objective.weighting"]
    assert best.train.lr == pytest.approx(float(best_row["train.lr"]))
    assert best.train.steps == int(best_row["step"]) and best.name == "tuned"

    _job("finetune")(["--config", str(best_path)])
    model_info = json.loads((out_dir / "best_run" / "tuned-model" / "pathalign.json").read_text())
    assert model_info["step"] == best.train.steps


def test_config_errors_before_ray_starts():
    tune_yaml = ROOT / "configs" / "tune.yaml"
    with pytest.raises(ConfigError, match="has no effect with finetune.objective.kind=rwl"):
        load_config(SearchConfig, tune_yaml, ["space.objective.kl_coef={kind: uniform, low: 0, high: 0.1}"])
    with pytest.raises(ConfigError, match="FinetuneConfig has no field train.learning_rate"):
        load_config(SearchConfig, tune_yaml, ["space.train.learning_rate={kind: choice, values: [1]}"])
    with pytest.raises(ConfigError, match="give this field a choice"):
        load_config(SearchConfig, tune_yaml, ["space.train.steps={kind: uniform, low: 1, high: 9}"])
    with pytest.raises(ConfigError, match="loguniform needs low < high"):
        load_config(SearchConfig, tune_yaml, ["space.train.lr={kind: loguniform, low: 0, high: 1}"])
    with pytest.raises(ConfigError, match=r"as_written_trial: finetune.train.steps=200 is not among space.train.steps's values \[50, 100\]"):
        load_config(SearchConfig, tune_yaml, ["space.train.steps={kind: choice, values: [50, 100]}"])
    with pytest.raises(ConfigError, match="scale sizes every trial alike"):
        load_config(SearchConfig, tune_yaml, ["space.scale.num_workers={kind: choice, values: [1, 2]}"])
    ddpo = load_config(SearchConfig, tune_yaml, [
        "finetune.objective.kind=ddpo",
        "space.objective={clip_range: {kind: loguniform, low: 1.0e-5, high: 1.0e-3}, kl_coef: {kind: choice, values: [0, 0.1]}}",
    ])
    assert set(ddpo.ranges) == {"objective.clip_range", "objective.kl_coef", "train.lr", "train.steps"}


@pytest.mark.parametrize("algorithm", ["random", "optuna", "hyperopt"])
def test_each_search_algorithm_draws_from_the_configured_space(algorithm):
    """Built as the search builds it; optuna and hyperopt come with the `tune` extra."""
    from pathalign_ray.tune import _tune_config, param_space

    if algorithm != "random":
        pytest.importorskip(algorithm)
    config = load_config(SearchConfig, ROOT / "configs" / "tune.yaml", [f"algorithm={algorithm}"])
    tune_config = _tune_config(config, concurrency=2)
    assert tune_config.scheduler._max_t == 4  # 200 steps at most, a report every 50
    if algorithm == "random":  # Tune ignores max_concurrent_trials for a variant generator: it holds the limit
        assert tune_config.max_concurrent_trials is None and tune_config.search_alg.max_concurrent == 2
        return
    assert tune_config.max_concurrent_trials == 2
    searcher = tune_config.search_alg
    assert searcher.set_search_properties("objective", "max", param_space(config.ranges))
    first = searcher.suggest("trial-1")
    assert first == {"objective.beta": 0.3, "objective.weighting": "raw", "objective.threshold": 0.5,
                     "objective.temperature": 1.0, "train.lr": config.finetune.train.lr, "train.steps": 200}
    params = searcher.suggest("trial-2")
    assert set(params) == set(config.ranges)
    assert 0.03 <= params["objective.beta"] <= 1.0 and params["train.steps"] in (100, 200)
    assert params["objective.weighting"] in ("raw", "threshold", "class_normalized")


def test_results_tables_plot_and_best_config_from_trial_rows(tmp_path):
    """write_results on rows as trial_rows makes them: a failed trial is listed, never best, never on the front."""
    from pathalign_ray.tune_report import write_results

    config = load_config(SearchConfig, ROOT / "configs" / "tune.yaml", [
        f"out_dir={tmp_path}", f"best_config={tmp_path / 'best.yaml'}", f"finetune.run_dir={tmp_path / 'run'}",
        f"finetune.base_model={Path.cwd() / 'runs' / 'base'}",  # as the search resolves it for its trials
    ])
    params = [(0.1, "raw", 1e-5, 100), (0.5, "threshold", 3e-5, 200), (0.9, "class_normalized", 1e-4, 200)]
    scores = [(0.30, 9.0, 0.05, "stopped early", 50), (0.45, 11.0, 0.10, "done", 200), (0.40, 8.0, 0.02, "done", 200)]
    rows = []
    for i, ((beta, weighting, lr, steps), (plausibility, fid, objective, status, step)) in enumerate(zip(params, scores)):
        rows.append({
            "trial": f"t{i}", "status": status, "step": step, "objective": objective, "gain": objective,
            "plausibility": plausibility, "fid": fid, "coverage": 0.5, "fid_penalty": 0.0, "coverage_penalty": 0.0,
            "objective.beta": beta, "objective.weighting": weighting, "objective.threshold": 0.5,
            "objective.temperature": 1.0, "train.lr": lr, "train.steps": steps, "as_written": i == 0, "error": "",
        })
    nan = float("nan")
    rows.append({**rows[0], "trial": "t3", "status": "error", "as_written": False, "step": None, "error": "TimeoutError: stuck",
                 **dict.fromkeys(("objective", "gain", "plausibility", "fid", "coverage"), nan)})
    for row, on_front in zip(rows, [False, True, True, False]):  # t0 is beaten by t2 on both
        row["pareto"] = on_front
    written = write_results(rows, config, base={"plausibility": 0.3, "fid": 9.0, "coverage": 0.5})

    assert written["best"]["trial"] == "t1" and written["as_written"]["trial"] == "t0"
    best = load_config(FinetuneConfig, written["best_config"])
    assert (best.objective.beta, best.objective.weighting, best.train.lr, best.train.steps) == (0.5, "threshold", 3e-5, 200)
    assert best.name == "tuned" and best.run_dir == str(tmp_path / "run")
    assert best.base_model == "runs/base", "inputs under the working directory go back to relative"
    assert best.data.real_dataset == "runs/pretrain32/data"
    pareto = (tmp_path / "pareto.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in pareto[2:]] == ["| t2", "| t1"]  # by FID
    assert len(list(csv.DictReader((tmp_path / "trials.csv").open()))) == 4
    assert (tmp_path / "objective_vs_beta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
