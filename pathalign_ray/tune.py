"""The Ray Tune driver of the feedback-weight search (beta, the reward weighting, lr, steps; ddpo's clip range, KL).

Each trial is a Tune function trial that finetunes with `finetune.finetune` (a Ray Train V2
TorchTrainer, the supported way to tune Train V2 runs) in chunks of `report_every` steps: a rerun
of the same run with more steps resumes from its checkpoint. After each chunk it probes the model
(`evaluation.probe`: plausibility, domain FID and coverage of fresh samples) and reports the
objective of `tune_objective`, so ASHA can stop poor trials early. The trial process reserves no
CPU; its Ray Train workers reserve theirs, and no more trials run at once than their CPUs fit, so a
small cluster never deadlocks. A chunk that does not finish within `report_timeout_s` fails its
trial with a message. Rerunning the same search resumes it (`Tuner.restore`).

The config is `tune_config.SearchConfig`; what the search writes when its trials end, `tune_report`.
Writes under OUT_DIR: search/ (Tune's experiment), trials/ID/ (each trial's finetuning run), and the
tables, plot and best config of `tune_report.write_results`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import threading
from pathlib import Path

from pathalign_ray.evaluation.probe import Reference, build_reference, probe
from pathalign_ray.finetune import FinetuneConfig
from pathalign_ray.tune_config import ParamRange, SearchConfig, as_written_params, map_input_paths, trial_config
from pathalign_ray.tune_objective import objective_terms, report_steps, trial_concurrency
from pathalign_ray.tune_report import trial_rows, write_results

EXPERIMENT = "search"  # Tune's experiment folder inside out_dir


# ---------------------------------------------------------------- the driver


def search(config: SearchConfig) -> dict:
    """Run (or resume) the search; write the tables, the plot and the best config. Returns where they went."""
    import ray
    from ray import tune

    from pathalign_ray.cluster import init_ray

    config = _resolved(config)
    for params in _corner_params(config.ranges):  # every value a trial can draw must make a valid config
        trial_config(config, params, config.out_dir, "check")
    _check_algorithm(config.algorithm)
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
    path = Path(config.out_dir) / EXPERIMENT
    if tune.Tuner.can_restore(str(path)):
        print(f"resuming the search in {path}: its space, algorithm, trial count and concurrency stay as started")
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=config.restart_errored)
    else:
        print(f"searching {config.num_trials} trials, {concurrency} at a time")
        tuner = tune.Tuner(
            trainable, param_space=param_space(config.ranges), tune_config=_tune_config(config, concurrency),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=str(Path(config.out_dir).resolve()),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1,
            ),
        )
    rows = trial_rows(tuner.fit(), config)
    return write_results(rows, config, reference.base)


def _resolved(config: SearchConfig) -> SearchConfig:
    """Absolute paths: Tune runs trials in their own working directories."""
    finetune = map_input_paths(config.finetune, lambda path: str(Path(path).resolve()))
    return dataclasses.replace(config, finetune=finetune, out_dir=str(Path(config.out_dir).resolve()))


def _corner_params(space: dict[str, ParamRange]) -> list[dict]:
    """One params dict per extreme value of each range (the others at their first extreme)."""
    options = {k: list(r.values) if r.kind == "choice" else [r.low, r.high] for k, r in space.items()}
    first = {k: v[0] for k, v in options.items()}
    return [first] + [{**first, k: v} for k, values in options.items() for v in values[1:]]


def param_space(space: dict[str, ParamRange]) -> dict:
    from ray import tune

    draw = {"uniform": lambda r: tune.uniform(r.low, r.high), "loguniform": lambda r: tune.loguniform(r.low, r.high),
            "choice": lambda r: tune.choice(list(r.values))}
    return {key: draw[r.kind](r) for key, r in space.items()}


def _check_algorithm(algorithm: str) -> None:
    import importlib.util

    if algorithm != "random" and importlib.util.find_spec(algorithm) is None:
        raise ModuleNotFoundError(f"algorithm={algorithm} needs the {algorithm} package: pip install -e '.[tune]'")


def _tune_config(config: SearchConfig, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    first = [as_written_params(config)] if config.as_written_trial else None
    if config.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=config.seed, points_to_evaluate=first)
    elif config.algorithm == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=config.seed, points_to_evaluate=first)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a generator (it warns): the limit goes to the generator itself
        searcher = BasicVariantGenerator(random_state=config.seed, max_concurrent=concurrency, points_to_evaluate=first)
    scheduler = None
    if config.asha.enabled:
        steps = config.ranges.get("train.steps")
        longest = max(steps.values) if steps is not None else config.finetune.train.steps
        max_t = len(report_steps(int(longest), config.report_every))
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=max_t, grace_period=min(config.asha.grace_period, max_t),
            reduction_factor=config.asha.reduction_factor,
        )
    return tune.TuneConfig(
        metric="objective", mode="max", search_alg=searcher, scheduler=scheduler, num_samples=config.num_trials,
        max_concurrent_trials=None if config.algorithm == "random" else concurrency,
        time_budget_s=config.time_budget_s or None, reuse_actors=False,
        trial_dirname_creator=_trial_dirname,
    )


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default name holds every param and gets long


# ---------------------------------------------------------------- one trial (runs in a Tune trial actor)


def run_trial(params: dict, search: SearchConfig, reference: Reference) -> None:
    """Finetune in chunks; after each, probe and tune.report the objective (with a checkpoint: the chunk done)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(search.out_dir) / "trials" / trial_id
    config = trial_config(search, params, run_dir, "finetune")
    targets = report_steps(config.train.steps, search.report_every)
    done = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            done = json.loads((Path(folder) / "progress.json").read_text())["reports"]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a restarted trial starts from the base model
    for index in range(done, len(targets)):
        chunk = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=targets[index]))
        what = f"trial {trial_id}: finetuning to step {targets[index]} and probing"
        metrics = _within(search.report_timeout_s, what, lambda: _chunk(chunk, search, reference))
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "progress.json").write_text(json.dumps({"reports": index + 1}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _chunk(config: FinetuneConfig, search: SearchConfig, reference: Reference) -> dict:
    from pathalign_ray.finetune import finetune

    finetuned = finetune(config)
    scores = probe(finetuned.model_dir, reference, search.probe)
    base, penalties = reference.base, search.penalties
    terms = objective_terms(
        scores["plausibility"], scores["fid"], scores["coverage"], base["plausibility"], base["fid"], base["coverage"],
        penalties.fid_weight, penalties.coverage_weight,
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
        except BaseException as error:  # re-raised in the trial's thread below
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
