"""The Ray Tune driver of the feedback-weight search: the objective's form and weights, lr and steps.

Each trial is a Tune function trial that finetunes with `generator.finetune.finetune` (a Ray Train V2
TorchTrainer, the supported way to tune Train V2 runs) in chunks of `report_every` steps: a rerun
of the same run with more steps resumes from its checkpoint. After each chunk it probes the model
(`evaluation.probe`: plausibility, domain FID and coverage of fresh samples) and reports the
objective of tune/objective.py, so ASHA can stop poor trials early. The trial process reserves no
CPU; its Ray Train workers reserve theirs, and no more trials run at once than their CPUs fit, so a
small cluster never deadlocks. A chunk that does not finish within `report_timeout_s` fails its
trial with a message. Rerunning the same search resumes it (`Tuner.restore`).

The config is `SearchConfig` (tune/config.py), whose conditional space Optuna draws define-by-run (random or
TPE); what the search writes when its trials end, tune/report.py.
Writes under OUT_DIR: search/ (Tune's experiment), trials/ID/ (each trial's finetuning run), and the
tables, plot and best config of `write_results` (tune/report.py). OUT_DIR and the finetune section's inputs
may be URIs (`pathalign_ray.storage`): Tune then keeps its experiment and checkpoints on the bucket
(`RunConfig(storage_path=..., storage_filesystem=...)`, as Ray Train's runs), restores from there,
and every trial's run and the result files go there too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from pathalign_ray import storage
from pathalign_ray.cluster import init_ray
from pathalign_ray.evaluation.probe import Reference, build_reference, probe
from pathalign_ray.generator.finetune import FinetuneConfig, finetune
from pathalign_ray.tune.config import (
    TRIAL_NAME,
    SearchConfig,
    as_written_params,
    branch_params,
    define_by_run,
    longest_steps,
    map_input_paths,
    searcher_point,
    trial_config,
    trial_run_dir,
)
from pathalign_ray.tune.objective import objective_terms, report_steps, trial_concurrency
from pathalign_ray.tune.report import trial_rows, write_results

if TYPE_CHECKING:
    import pyarrow.fs as pafs

EXPERIMENT = "search"  # Tune's experiment folder inside out_dir


# ---------------------------------------------------------------- the driver


def search(config: SearchConfig) -> dict:
    """Run (or resume) the search; write the tables, the plot and the best config. Returns where they went."""
    import ray
    from ray import tune

    config = _resolved(config)
    _check_optuna()
    storage_path, filesystem, experiment = _tune_storage(config.out_dir)  # the bucket is checked before Ray starts
    init_ray(device=config.finetune.scale.device)
    scale = config.finetune.scale
    concurrency = trial_concurrency(
        ray.cluster_resources().get("CPU", 0),
        scale.num_workers * scale.threads_per_worker,
        config.max_concurrent_trials,
    )
    reference = build_reference(config.finetune.data.real_dataset, config.finetune.base_model, config.probe)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, search=config, reference=reference), {"cpu": 0, "memory": 64 * 2**20}
    )
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        where = storage.join(config.out_dir, EXPERIMENT)
        print(f"resuming the search in {where}: its space, algorithm, trial count and concurrency stay as started")
        tuner = tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            restart_errored=config.restart_errored,
            storage_filesystem=filesystem,
        )
    else:
        print(f"searching {config.num_trials} trials, {concurrency} at a time")
        tuner = tune.Tuner(
            trainable,
            tune_config=_tune_config(config, concurrency),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=1,
            ),
        )
    rows = trial_rows(tuner.fit(), config)
    return write_results(rows, config, reference.base)


def _resolved(config: SearchConfig) -> SearchConfig:
    """Absolute paths, URIs as they are: Tune runs trials in their own working directories."""
    resolved = map_input_paths(config.finetune, storage.absolute)
    return dataclasses.replace(config, finetune=resolved, out_dir=storage.absolute(config.out_dir))


def _tune_storage(out_dir: str) -> tuple[str, pafs.FileSystem | None, str]:
    """(storage_path, storage_filesystem, the experiment's folder) for Tune's RunConfig and Tuner.restore.

    As Ray Train's runs take theirs (storage.ray_storage): a plain path absolute and no filesystem; a URI
    the path on the bucket and storage.py's filesystem, which carries the endpoint to every trial."""
    storage_path, filesystem = storage.ray_storage(out_dir)
    return storage_path, filesystem, f"{storage_path.rstrip('/')}/{EXPERIMENT}"


def _check_optuna() -> None:
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ModuleNotFoundError("the search draws its conditional space with Optuna: pip install -e '.[tune]'")


def _tune_config(config: SearchConfig, concurrency: int):
    """Optuna draws the space define-by-run (random or TPE); ASHA stops poor trials; Tune caps the concurrency."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    if config.algorithm == "tpe":  # multivariate, grouped: each branch's fields are modelled together
        sampler = optuna.samplers.TPESampler(seed=config.seed, multivariate=True, group=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=config.seed)
    first = [searcher_point(config, as_written_params(config))] if config.as_written_trial else []
    if config.every_branch_first:  # Optuna draws the rest of a point that fixes only the branch
        first += [{"branch": name} for name in config.space if name not in {point["branch"] for point in first}]
    searcher = OptunaSearch(
        space=functools.partial(define_by_run, space=config.space),
        metric="objective",
        mode="max",
        sampler=sampler,
        points_to_evaluate=first or None,
    )
    scheduler = None
    if config.asha.enabled:
        max_t = len(report_steps(longest_steps(config), config.report_every))
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=min(config.asha.grace_period, max_t),
            reduction_factor=config.asha.reduction_factor,
        )
    return tune.TuneConfig(
        metric="objective",
        mode="max",
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=config.num_trials,
        max_concurrent_trials=concurrency,
        time_budget_s=config.time_budget_s or None,
        reuse_actors=False,
        trial_dirname_creator=_trial_dirname,
    )


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default name holds every param and gets long


# ---------------------------------------------------------------- one trial (runs in a Tune trial actor)


def run_trial(params: dict, search: SearchConfig, reference: Reference) -> None:
    """Finetune in chunks; after each, probe and tune.report the objective (with a checkpoint: the chunk done)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = trial_run_dir(search.out_dir, trial_id)
    config = trial_config(search, branch_params(search, params), run_dir, TRIAL_NAME)
    targets = report_steps(config.train.steps, search.report_every)
    done = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            done = json.loads((Path(folder) / "progress.json").read_text())["reports"]
    else:
        storage.delete_dir(run_dir)  # a restarted trial starts from the base model
    for index in range(done, len(targets)):
        chunk = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=targets[index]))
        what = f"trial {trial_id}: finetuning to step {targets[index]} and probing"
        metrics = _within(search.report_timeout_s, what, functools.partial(_chunk, chunk, search, reference))
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "progress.json").write_text(json.dumps({"reports": index + 1}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _chunk(config: FinetuneConfig, search: SearchConfig, reference: Reference) -> dict:
    finetuned = finetune(config)
    scores = probe(finetuned.model_dir, reference, search.probe)
    base, penalties = reference.base, search.penalties
    terms = objective_terms(
        scores["plausibility"],
        scores["fid"],
        scores["coverage"],
        base["plausibility"],
        base["fid"],
        base["coverage"],
        penalties.fid_weight,
        penalties.coverage_weight,
    )
    kept = ("loss", "reward_mean", "kl_to_base", "fresh_plausibility")  # finetuning's own last log line
    trained = {f"train_{k}": v for k, v in finetuned.final.items() if k in kept}
    return {**scores, **{k: float(v) for k, v in terms.items()}, "step": config.train.steps, **trained}


def _within(timeout_s: float, what: str, work):
    """work() in a thread; TimeoutError if it runs past timeout_s (the trial then fails, and its actor and the
    Ray Train run it owns are torn down with it)."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = work()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, name="tune-chunk", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(
            f"{what} did not finish within report_timeout_s={timeout_s:g} s: a Ray Train run waiting for CPUs "
            "the cluster cannot give (scale.num_workers x scale.threads_per_worker per trial), or a stuck "
            "worker; raise report_timeout_s if the chunk is just slow"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
