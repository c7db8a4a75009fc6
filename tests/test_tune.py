"""Ray Tune searches the feedback-loss weights: the conditional space, drawn as the search draws it; then
jobs/tune.py on the session's Ray cluster, a tiny model, CPU, with its inputs and out_dir on a bucket of
the session's S3 server (moto).

Each trial is a Tune function trial that runs Ray Train V2 finetuning (DeepSpeed, one worker here)
in chunks and reports the probe's objective after each; the best config then runs with jobs/finetune.py.
"""

from __future__ import annotations

import csv
import io
import json
import runpy
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from pathalign_ray import storage
from pathalign_ray.config import ConfigError, config_to_dict, get_dotted, load_config
from pathalign_ray.generator.finetune import FinetuneConfig, ObjectiveConfig
from pathalign_ray.tune.config import (
    KIND_FIELDS,
    WEIGHTING_FIELDS,
    ParamRange,
    SearchConfig,
    as_written_params,
    branch_params,
    flat_branch,
    trial_config,
)

ROOT = Path(__file__).resolve().parents[1]
TUNE_YAML = ROOT / "configs" / "tune.yaml"
TINY_LR = {"kind": "loguniform", "low": 1e-4, "high": 1e-3}
TINY_STEPS = {"kind": "choice", "values": [2, 4]}
# one branch of each form that has fields of its own; seed 3 draws each of them once in three trials
TINY_SPACE = {
    "rwl_raw": {
        "objective": {"kind": "rwl", "weighting": "raw", "beta": {"kind": "loguniform", "low": 0.1, "high": 1.0}},
        "train": {"lr": TINY_LR, "steps": TINY_STEPS},
    },
    "rwl_centred": {
        "objective": {"kind": "rwl", "weighting": "centred", "ratio_clip": {"kind": "uniform", "low": 0.1, "high": 0.5}},
        "train": {"lr": TINY_LR, "steps": TINY_STEPS},
    },
    "ddpo": {
        "objective": {"kind": "ddpo", "trajectories_per_step": 2, "ddim_steps": 2,
                      "kl_coef": {"kind": "choice", "values": [0.0, 0.1]}},
        "train": {"lr": TINY_LR, "steps": {"kind": "choice", "values": [2]}},
    },
}  # fmt: skip


def _job(name: str):
    return runpy.run_path(str(ROOT / "jobs" / f"{name}.py"), run_name="job")["main"]


def _search_args(out_dir: str, model_dir, samples, dataset, *overrides) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "tune.yaml"),
        f"out_dir={out_dir}",
        f"best_config={storage.join(out_dir, 'best_feedback.yaml')}",
        "num_trials=3",
        "report_every=4",  # one report per trial: each report is a Ray Train run (~30 s here)
        "max_concurrent_trials=0",  # as many as the cluster's CPUs hold
        "probe.n_per_class=4",
        "probe.ddim_steps=3",
        "probe.encoder.steps=20",
        "probe.encoder.batch_size=16",
        f"space={json.dumps(TINY_SPACE)}",  # JSON is YAML
        "seed=3",
        "finetune.train.lr=1.0e-4",  # the as-written trial's, with the paper's beta 0.3 and raw weights
        "finetune.train.steps=4",
        f"finetune.run_dir={storage.join(out_dir, 'best_run')}",
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


def _csv_rows(location: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(location).decode(), newline="")))


# what the search writes under OUT_DIR besides search/ and trials/: none of it may land on a local disk
RESULT_FILES = ("trials.csv", "trials.md", "pareto.md", "pareto.png", "best_feedback.yaml")


@pytest.mark.ray
def test_a_stuck_search_fails_with_a_message_then_resumes_three_trials_and_jobs_finetune_runs_the_best(
    tiny_pretrained, tiny_samples, tiny_dataset, ray_cluster, bucket, tmp_path, capsys, monkeypatch
):
    """Too short a report timeout stands in for a stuck Ray Train run: every trial fails with a message
    and the search says so. Rerunning the command restores the search (Tuner.restore), reruns the
    failed trials to the end (one of each branch: rwl raw, rwl centred, ddpo), writes the tables, the
    plot and the best config; jobs/finetune.py runs it. Everything is on the bucket: the model, samples
    and data set the search reads, Tune's experiment (restored from there), each trial's finetuning run,
    the result files and the best config's run; no local folder gets any of them."""
    _, _, model_dir = tiny_pretrained
    inputs = f"{bucket}/inputs"
    model = storage.upload_dir(model_dir, f"{inputs}/model")
    samples = storage.upload_dir(tiny_samples, f"{inputs}/samples")
    dataset = storage.upload_dir(tiny_dataset, f"{inputs}/data")
    out_dir = f"{bucket}/tune"
    monkeypatch.chdir(tmp_path)  # where the driver would write a URI taken for a relative path
    args = _search_args(out_dir, model, samples, dataset)
    search_job = _job("tune")
    with pytest.raises(RuntimeError, match="no trial of the search reported an objective"):
        search_job([*args, "report_timeout_s=2"])
    rows = _csv_rows(f"{out_dir}/trials.csv")
    assert len(rows) == 3 and all(row["status"] == "error" for row in rows), rows
    assert all("did not finish within report_timeout_s=2 s" in row["error"] for row in rows), rows

    capsys.readouterr()
    written = search_job([*args, "report_timeout_s=600"])
    assert f"resuming the search in {out_dir}/search" in capsys.readouterr().out
    assert len(_csv_rows(f"{out_dir}/trials.csv")) == 3
    rows = written["rows"]
    assert all(row["status"] == "done" and row["error"] == "" for row in rows), rows
    assert sorted(row["branch"] for row in rows) == ["ddpo", "rwl_centred", "rwl_raw"]
    (as_written,) = [row for row in rows if row["as_written"]]
    assert as_written["branch"] == "rwl_raw" and as_written["objective.weighting"] == "raw"
    assert as_written["objective.beta"] == 0.3
    assert written["as_written"]["trial"] == as_written["trial"]
    (centred,) = [row for row in rows if row["branch"] == "rwl_centred"]
    assert 0.1 <= centred["objective.ratio_clip"] <= 0.5
    (ddpo,) = [row for row in rows if row["branch"] == "ddpo"]
    assert ddpo["objective.ratio_clip"] is None and ddpo["objective.kl_coef"] in (0.0, 0.1)
    for row in rows:
        assert row["step"] == row["train.steps"]
        assert 0.0 <= row["plausibility"] <= 1.0 and row["fid"] > 0.0
        assert row["objective"] == pytest.approx(row["gain"] - row["fid_penalty"] - row["coverage_penalty"])
        assert row["model"] == f"{out_dir}/trials/{row['trial']}/finetune-model"  # the model its last report probed
    assert any(row["pareto"] for row in rows)
    assert written["pareto"] == f"{out_dir}/pareto.md" and written["plot"] == f"{out_dir}/pareto.png"
    assert storage.read_bytes(written["pareto"]).decode().count("\n") >= 3  # header, rule, at least one trial
    assert storage.read_bytes(written["plot"])[:8] == b"\x89PNG\r\n\x1a\n"

    best_path = written["best_config"]
    assert best_path == f"{out_dir}/best_feedback.yaml"
    best = load_config(FinetuneConfig, best_path)  # read from the bucket
    assert (best.base_model, best.data.samples, best.data.real_dataset) == (model, (samples,), dataset)
    best_row = max(rows, key=lambda row: row["objective"])
    space = load_config(SearchConfig, TUNE_YAML, args[2:]).space
    for key in flat_branch(space[best_row["branch"]]):
        assert get_dotted(config_to_dict(best), key) == pytest.approx(best_row[key]), key
    assert best.train.steps == best_row["step"] and best.name == "tuned"

    _job("finetune")(["--config", best_path])
    model_info = json.loads(storage.read_bytes(f"{out_dir}/best_run/tuned-model/pathalign.json"))
    assert model_info["step"] == best.train.steps

    files = storage.list_files(out_dir, recursive=True)  # the bucket holds the search
    assert {*RESULT_FILES, "search/tuner.pkl"} <= set(files)
    assert any(f.startswith("search/experiment_state") for f in files)
    for row in rows:
        trial = row["trial"]
        assert any(f.startswith(f"search/trial_{trial}/checkpoint_") and f.endswith("progress.json") for f in files)
        assert f"trials/{trial}/finetune-model/unet/config.json" in files
        assert any(f.startswith(f"trials/{trial}/finetune/checkpoint_") for f in files), f"no checkpoint of {trial}"
    assert "best_run/tuned-model/unet/config.json" in files
    # a URI taken for a path would make an "s3:" folder in the driver's working folder or a trial's (in Ray's
    # session folder, beside Tune's staging of its experiment)
    session = Path(ray_cluster._private.worker._global_node.get_session_dir_path())
    local = [p for folder in (tmp_path, session) for p in folder.rglob("*") if p.name in (*RESULT_FILES, "s3:")]
    assert not local and not (ROOT / "s3:").exists(), f"search files on the local disk: {local}"


@pytest.mark.parametrize("algorithm, draws", [("random", 500), ("tpe", 60)])
def test_every_draw_of_the_conditional_space_is_a_valid_config_with_only_its_branch_fields(algorithm, draws):
    """The searcher the search builds (Optuna, define-by-run), asked as Tune asks it, draws only valid
    FinetuneConfigs, and a field exists only in its branch: no ratio_clip without centred weights, no
    ddpo field without kind ddpo, no rwl field with it. The first draw is the as-written trial, the next
    ones try every other branch once (every_branch_first). TPE is told a result after each draw, so its
    draws after the first 10 come from its model."""
    config = load_config(SearchConfig, TUNE_YAML, [f"algorithm={algorithm}"])
    from pathalign_ray.tune.search import _tune_config

    tune_config = _tune_config(config, concurrency=1)
    assert tune_config.scheduler._max_t == 3  # 600 steps at most, a report every 200
    searcher, defaults = tune_config.search_alg, ObjectiveConfig()
    rng = np.random.default_rng(0)
    drawn = []
    for i in range(draws):
        params = branch_params(config, searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {"objective": float(rng.normal()), "training_iteration": 1})
        if i == 0:
            assert params == as_written_params(config)
        fields = flat_branch(config.space[params["branch"]])
        assert set(params) == {"branch", *fields}
        for key, value in fields.items():
            assert value.holds(params[key]) if isinstance(value, ParamRange) else params[key] == value, (key, params)
        objective = trial_config(config, params, "runs/x", "draw").objective
        unread = [key for kind, keys in KIND_FIELDS.items() if kind != objective.kind for key in keys]
        unread += [key for key, weighting in WEIGHTING_FIELDS.items() if objective.weighting != weighting]
        for key in unread:
            name = key.removeprefix("objective.")
            assert getattr(objective, name) == getattr(defaults, name), (key, params)
        assert (objective.ratio_clip > 0) == (objective.kind == "rwl" and objective.weighting == "centred")
        drawn.append(params["branch"])
    assert sorted(drawn[: len(config.space)]) == sorted(config.space), "every branch once, first"


def test_every_objective_field_belongs_to_one_kind():
    """A new ObjectiveConfig field must be placed in KIND_FIELDS, or the space could not tell where it acts."""
    fields = [f"objective.{name}" for name in ObjectiveConfig.__dataclass_fields__ if name != "kind"]
    assert sorted(fields) == sorted(key for keys in KIND_FIELDS.values() for key in keys)


def test_the_probe_draws_noise_no_pool_check_or_evaluation_draws():
    from pathalign_ray.evaluation.probe import probe_seeds
    from pathalign_ray.generator.diffusion import namespaced_seed

    config = load_config(SearchConfig, TUNE_YAML)
    probe = set(probe_seeds(8, config.probe))
    assert len(probe) == 8 * config.probe.n_per_class
    # the held-out evaluation of bench/align_benchmark.py (seed 1000, 32 a class), pools and checks of seeds 0-2
    others = {namespaced_seed("evaluation", 1000, c, j) for c in range(8) for j in range(32)}
    others |= {namespaced_seed(space, seed, c, j) for space in ("pool", "check", "sample") for seed in range(3)
               for c in range(8) for j in range(32)}  # fmt: skip
    assert not probe & others


REFUSED = [
    ("space.rwl_raw.objective.ratio_clip={kind: uniform, low: 0.1, high: 0.3}",
     "space.rwl_raw.objective.ratio_clip: acts with objective.weighting=centred only; this branch's weighting is raw"),
    ("space.rwl_centred.objective.weighting={kind: choice, values: [centred, raw]}",
     "space.rwl_centred.objective.ratio_clip: acts with objective.weighting=centred only; this branch's weighting is drawn"),
    ("space.rwl_raw.objective.kl_coef={kind: uniform, low: 0, high: 0.1}",
     "space.rwl_raw.objective.kl_coef: acts with objective.kind=ddpo only; this branch's kind is rwl"),
    ("space.ddpo.objective.beta=0", "space.ddpo.objective.beta: acts with objective.kind=rwl only"),
    ("space.extra.train.lr=1.0e-4", "space.extra.objective.kind: each branch fixes its objective's kind"),
    ("finetune.objective.ratio_clip=0.3", "finetune.objective.ratio_clip: the branches of space set the objective"),
    ("space.rwl_centred.objective.ratio_clip={kind: uniform, low: 0.0, high: 0.3}",
     "space.rwl_centred: params .* make an invalid FinetuneConfig: objective: weighting centred needs ratio_clip > 0"),
    ("space.rwl_raw.train.learning_rate={kind: choice, values: [1]}", "FinetuneConfig has no field train.learning_rate"),
    ("space.rwl_raw.train.steps={kind: uniform, low: 1, high: 9}", "give this field a choice"),
    ("space.rwl_raw.train.lr={kind: loguniform, low: 0, high: 1}", "loguniform needs low < high"),
    ("space.rwl_raw.train.steps={kind: choice, values: [50, 100]}",
     r"as_written_trial: finetune.train.steps=200 is outside space.rwl_raw.train.steps \[50, 100\]"),
    ("space.rwl_raw.objective.weighting=threshold", "as_written_trial: no branch of space fixes only the finetune"),
    ("space.rwl_raw.scale.num_workers={kind: choice, values: [1, 2]}", "scale sizes every trial alike"),
    ("space={}", "space: give at least one branch"),
]  # fmt: skip


@pytest.mark.parametrize("override, message", REFUSED)
def test_config_errors_before_ray_starts_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SearchConfig, TUNE_YAML, [override])


BAD_LOCATIONS = [
    ("out_dir=ftp://host/tune", "out_dir: ftp://host/tune: unknown scheme 'ftp'"),
    ("out_dir=s3:///tune", "out_dir: s3:///tune: no bucket"),
    ("out_dir=s3://no-such-bucket/tune", "out_dir: s3://no-such-bucket/tune: bucket 'no-such-bucket' does not exist"),
    ("best_config=gs:///best.yaml", "best_config: gs:///best.yaml: no bucket"),
    ("finetune.base_model=s3://no-such-bucket/model", "finetune.base_model: s3://no-such-bucket/model: bucket"),
]


@pytest.mark.parametrize("override, message", BAD_LOCATIONS)
def test_a_bad_uri_fails_naming_the_key_before_ray_starts(s3_server, override, message, monkeypatch, capsys):
    """jobs/tune.py with an unknown scheme, or a bucket missing on the S3 server: the job exits with the key
    and the URI, and neither the search nor Ray starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr("pathalign_ray.tune.search.search", refuse)
    monkeypatch.setattr("ray.init", refuse)
    with pytest.raises(SystemExit):
        _job("tune")(["--config", str(TUNE_YAML), override])
    assert message in capsys.readouterr().err


def test_the_search_keeps_uris_makes_paths_absolute_and_puts_tune_s_experiment_where_out_dir_says(
    bucket, tmp_path, monkeypatch
):
    """What the search hands Tune and its trials (no Ray run): plain paths made absolute as before, URIs as they
    are; Tune's storage an absolute local folder, or the path on the bucket with storage.py's filesystem."""
    from pathalign_ray.tune.search import _resolved, _tune_storage

    monkeypatch.chdir(tmp_path)
    local = _resolved(load_config(SearchConfig, TUNE_YAML, ["out_dir=runs/tune"]))
    assert local.out_dir == str(tmp_path / "runs" / "tune")
    assert local.finetune.base_model == str(tmp_path / "runs" / "pretrain32" / "model")
    assert local.finetune.data.samples == (str(tmp_path / "runs" / "pretrain32" / "samples" / "pretrained"),)
    assert _tune_storage(local.out_dir) == (local.out_dir, None, f"{local.out_dir}/search")

    uris = [f"out_dir={bucket}/tune", f"finetune.base_model={bucket}/model", "finetune.data.real_dataset=file:///d",
            f"finetune.data.samples=[{bucket}/samples, runs/samples]"]  # fmt: skip
    remote = _resolved(load_config(SearchConfig, TUNE_YAML, uris))
    assert (remote.out_dir, remote.finetune.base_model) == (f"{bucket}/tune", f"{bucket}/model")
    assert remote.finetune.data.real_dataset == "file:///d"
    assert remote.finetune.data.samples == (f"{bucket}/samples", str(tmp_path / "runs" / "samples"))
    path, filesystem, experiment = _tune_storage(remote.out_dir)
    name = bucket.removeprefix("s3://")
    assert (path, experiment) == (f"{name}/tune", f"{name}/tune/search")
    assert isinstance(filesystem, pafs.S3FileSystem)


def test_a_space_of_one_branch():
    config = load_config(SearchConfig, TUNE_YAML, ["space={ddpo: {objective: {kind: ddpo}}}", "as_written_trial=false"])
    assert list(config.space) == ["ddpo"]


def test_results_tables_plot_and_best_config_from_trial_rows(tmp_path):
    """write_results on rows as trial_rows makes them: a failed trial is listed, never best, never on the front."""
    from pathalign_ray.tune.report import param_keys, write_results

    config = load_config(SearchConfig, TUNE_YAML, [
        f"out_dir={tmp_path}", f"best_config={tmp_path / 'best.yaml'}", f"finetune.run_dir={tmp_path / 'run'}",
        f"finetune.base_model={Path.cwd() / 'runs' / 'base'}",  # as the search resolves it for its trials
    ])  # fmt: skip
    drawn = [
        {"branch": "rwl_raw", "objective.kind": "rwl", "objective.weighting": "raw", "objective.beta": 0.3,
         "train.lr": 1e-5, "train.steps": 200},
        {"branch": "rwl_centred", "objective.kind": "rwl", "objective.weighting": "centred", "objective.beta": 0.5,
         "objective.ratio_clip": 0.25, "train.lr": 1e-4, "train.steps": 600},
        {"branch": "ddpo", "objective.kind": "ddpo", "objective.trajectories_per_step": 32, "objective.ddim_steps": 10,
         "objective.clip_range": 1e-4, "objective.kl_coef": 0.1, "train.lr": 3e-5, "train.steps": 80,
         "train.warmup_steps": 5, "train.ema_decay": 0.9},
    ]  # fmt: skip
    scores = [(0.30, 9.0, 0.05, "stopped early", 200), (0.45, 11.0, 0.10, "done", 400), (0.40, 8.0, 0.02, "done", 80)]
    rows = []
    for i, (params, (plausibility, fid, objective, status, step)) in enumerate(zip(drawn, scores)):
        rows.append({
            "trial": f"t{i}", "status": status, "step": step, "objective": objective, "gain": objective,
            "plausibility": plausibility, "fid": fid, "coverage": 0.5, "fid_penalty": 0.0, "coverage_penalty": 0.0,
            **dict.fromkeys(param_keys(config)), **params, "as_written": i == 0, "model": f"trials/t{i}", "error": "",
        })  # fmt: skip
    nan = float("nan")
    rows.append({**rows[0], "trial": "t3", "status": "error", "as_written": False, "step": None, "error": "TimeoutError: stuck",
                 **dict.fromkeys(("objective", "gain", "plausibility", "fid", "coverage"), nan)})  # fmt: skip
    for row, on_front in zip(rows, [False, True, True, False]):  # t0 is beaten by t2 on both
        row["pareto"] = on_front
    written = write_results(rows, config, base={"plausibility": 0.3, "fid": 9.0, "coverage": 0.5})

    assert written["best"]["trial"] == "t1" and written["as_written"]["trial"] == "t0"
    best = load_config(FinetuneConfig, written["best_config"])
    assert (best.objective.kind, best.objective.weighting, best.objective.ratio_clip) == ("rwl", "centred", 0.25)
    assert (best.objective.beta, best.train.lr, best.train.steps) == (0.5, 1e-4, 400)  # the step it was measured at
    assert best.name == "tuned" and best.run_dir == str(tmp_path / "run")
    assert best.base_model == "runs/base", "inputs under the working directory go back to relative"
    assert best.data.real_dataset == "runs/pretrain32/data"
    assert "branch rwl_centred" in written["best_config"].read_text().splitlines()[0]
    pareto = (tmp_path / "pareto.md").read_text().splitlines()
    assert [line.split(" | ")[:2] for line in pareto[2:]] == [["| t2", "ddpo"], ["| t1", "rwl_centred"]]  # by FID
    assert "objective.kl_coef" in pareto[0] and "objective.threshold" not in pareto[0]  # the front's fields only
    assert len(list(csv.DictReader((tmp_path / "trials.csv").open()))) == 4
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
