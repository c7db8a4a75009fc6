"""Ray Tune searches the feedback-loss weights: beta, the reward weighting, lr, steps (and ddpo's clip range, KL).

Each trial is a Tune function trial that finetunes with `finetune.finetune` (a Ray Train V2
TorchTrainer, the supported way to tune Train V2 runs) in chunks of `report_every` steps: a rerun
of the same run with more steps resumes from its checkpoint. After each chunk it probes the model
(fresh samples from fixed seeds: the simulated pathologist's plausibility, the domain-feature FID
and coverage against the real training set, by the project's evaluation functions) and reports the
objective of `tune_objective`, so ASHA can stop poor trials early. The trial process reserves no
CPU; its Ray Train workers reserve theirs, and no more trials run at once than their CPUs fit, so a
small cluster never deadlocks. A chunk that does not finish within `report_timeout_s` fails its
trial with a message. Rerunning the same search resumes it (`Tuner.restore`).

Writes under OUT_DIR: search/ (Tune's experiment), trials/ID/ (each trial's finetuning run),
trials.csv and trials.md (one row per trial), pareto.md (plausibility against FID),
objective_vs_beta.png; and the best trial's FinetuneConfig to `best_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Literal, Union

import numpy as np
import yaml
from pydantic import TypeAdapter, ValidationError

from pathalign_ray.config import ConfigError, config_dataclass, config_to_dict
from pathalign_ray.evaluation.classifier import ClassifierConfig
from pathalign_ray.finetune import FinetuneConfig
from pathalign_ray.tune_objective import objective_terms, pareto_front, report_steps, trial_concurrency

EXPERIMENT = "search"  # Tune's experiment folder inside out_dir
DDPO_ONLY = ("objective.clip_range", "objective.kl_coef", "objective.eta", "objective.ddim_steps",
             "objective.trajectories_per_step", "objective.inner_epochs", "objective.advantage_clip")
RWL_ONLY = ("objective.beta", "objective.weighting", "objective.threshold", "objective.temperature")
METRICS = ("objective", "gain", "plausibility", "fid", "coverage", "fid_penalty", "coverage_penalty")


@config_dataclass
class ParamRange:
    kind: Literal["uniform", "loguniform", "choice"] = "choice"  # how the search draws this field
    low: float = 0.0  # uniform, loguniform: lower bound (loguniform: > 0)
    high: float = 1.0  # uniform, loguniform: upper bound
    values: tuple[Union[int, float, str], ...] = ()  # choice: the candidate values, of the field's type

    def __post_init__(self) -> None:
        if self.kind == "choice" and not self.values:
            raise ValueError("a choice needs values")
        if self.kind != "choice" and not (self.low < self.high and (self.kind == "uniform" or self.low > 0)):
            raise ValueError(f"{self.kind} needs low < high (and low > 0 for loguniform), got {self.low}, {self.high}")


@config_dataclass
class PenaltyConfig:
    fid_weight: float = 0.5  # objective lost per unit of relative FID increase over the base model (fid / base - 1)
    coverage_weight: float = 1.0  # objective lost per unit of coverage (0..1) lost against the base model


@config_dataclass
class ProbeConfig:
    n_per_class: int = 16  # fresh samples per class at each report (fixed seeds: every trial sees the same noise)
    ddim_steps: int = 20  # DDIM steps per probe sample
    seed: int = 2000  # base seed of the probe samples, in the "probe" seed namespace (never a pool's or the evaluation's noise)
    prdc_k: int = 5  # nearest neighbours of coverage (Naeem et al. use 5)
    strictness: float = 1.0  # the simulated pathologist's (1 the reference)
    threads: int = 1  # torch threads of the probe (in the trial's process, after its Ray Train run)
    # the domain encoder's recipe; cached with the data set, shared with jobs/evaluate.py for the same recipe
    encoder: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    encoder_seed: int = 0  # the encoder's seed (jobs/evaluate.py's `seed`: the same recipe shares its cache)


@config_dataclass
class AshaConfig:
    enabled: bool = True  # stop poor trials early (asynchronous successive halving)
    grace_period: int = 1  # reports every trial makes before it can be stopped
    reduction_factor: float = 2.0  # keep the best 1/reduction_factor at each rung


@config_dataclass
class SearchConfig:
    # every trial starts from this config (its run_dir and name are set per trial)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    # FinetuneConfig section -> field -> range, e.g. {"objective": {"beta": ...}, "train": {"lr": ...}}
    space: dict[str, dict[str, ParamRange]] = dataclasses.field(default_factory=dict)
    algorithm: Literal["random", "optuna", "hyperopt"] = "random"  # optuna and hyperopt: pip install -e '.[tune]'
    num_trials: int = 12  # trials in the whole search
    seed: int = 0  # the search algorithm's seed
    report_every: int = 50  # finetuning steps between reports; ASHA counts reports
    asha: AshaConfig = dataclasses.field(default_factory=AshaConfig)
    penalties: PenaltyConfig = dataclasses.field(default_factory=PenaltyConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    max_concurrent_trials: int = 1  # trials at once; 0: as many as the cluster's CPUs hold; capped by that anyway
    report_timeout_s: float = 1800.0  # a trial whose chunk (finetuning + probe) runs longer fails with a message
    time_budget_s: float = 0.0  # the whole search; 0: no limit
    restart_errored: bool = True  # on resume, rerun failed trials from scratch (a timeout may have been transient)
    out_dir: str = "runs/pretrain32/tune"  # Tune's experiment, trial runs, tables and plot
    best_config: str = ""  # the best trial's FinetuneConfig, for jobs/finetune.py; "": OUT_DIR/best_feedback.yaml
    best_name: str = "tuned"  # `name` of the finetuning run the best config describes
    # the first trial runs the finetune section's own values of the searched fields (the paper's beta 0.3
    # and raw reward weights by default): the baseline the best trial is measured against
    as_written_trial: bool = True

    def __post_init__(self) -> None:
        if self.num_trials < 1 or self.report_every < 1 or self.report_timeout_s <= 0 or self.time_budget_s < 0:
            raise ValueError("num_trials and report_every must be >= 1, report_timeout_s > 0, time_budget_s >= 0")
        if self.probe.n_per_class < 1 or self.probe.ddim_steps < 1 or self.probe.prdc_k < 1:
            raise ValueError("probe.n_per_class, ddim_steps and prdc_k must be >= 1")
        kind = self.finetune.objective.kind
        for key, value_range in self.ranges.items():
            _check_key(key, value_range.kind)
            if key.startswith("scale."):
                raise ValueError(f"space.{key}: scale sizes every trial alike (and fixes how many run at once)")
            if (kind == "rwl" and key in DDPO_ONLY) or (kind == "ddpo" and key in RWL_ONLY):
                raise ValueError(f"space.{key} has no effect with finetune.objective.kind={kind}")
        if self.as_written_trial:
            for key, value in as_written_params(self).items():
                value_range = self.ranges[key]
                if value_range.kind == "choice" and value not in value_range.values:
                    raise ValueError(
                        f"as_written_trial: finetune.{key}={value} is not among space.{key}'s values "
                        f"{list(value_range.values)}; add it, or set as_written_trial=false"
                    )

    @property
    def ranges(self) -> dict[str, ParamRange]:
        """The space as dotted FinetuneConfig keys ("objective.beta"): Tune's parameter names."""
        return {f"{section}.{name}": r for section, fields in self.space.items() for name, r in fields.items()}


def as_written_params(search: SearchConfig) -> dict:
    """The searched fields' values in the finetune section itself, as Tune params (dotted keys)."""
    data = config_to_dict(search.finetune)
    params = {}
    for key in search.ranges:
        node = data
        for part in key.split("."):
            node = node[part]
        params[key] = node
    return params


def _check_key(dotted: str, kind: str) -> None:
    """A searched key must name a FinetuneConfig field; a drawn range (not a choice) only a float one."""
    import typing

    node = FinetuneConfig
    for part in dotted.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            raise ValueError(f"space.{dotted}: FinetuneConfig has no field {dotted}")
        node = hints[part]
    if kind != "choice" and node is not float:
        raise ValueError(f"space.{dotted}: a {kind} range draws floats; give this field a choice of values")


def trial_config(search: SearchConfig, params: dict, run_dir: str | Path, name: str) -> FinetuneConfig:
    """The base FinetuneConfig with the trial's params (dotted keys) applied, validated."""
    data = config_to_dict(search.finetune)
    data.update(run_dir=str(run_dir), name=name)
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value.item() if isinstance(value, np.generic) else value  # searchers may hand numpy scalars
    try:
        return TypeAdapter(FinetuneConfig).validate_python(data)
    except ValidationError as error:
        raise ConfigError(f"params {params}: {error}") from None


# ---------------------------------------------------------------- the probe: plausibility, FID, coverage


@dataclasses.dataclass
class Reference:
    """What every probe compares with: the domain encoder, the real training set's features, the base model's scores."""

    encoder_channels: tuple[int, ...]
    encoder_state: dict
    num_classes: int
    real_features: np.ndarray  # (N, D) domain features of the real training split
    base: dict  # the base model's probe metrics


def probe(model_dir: str | Path, reference: Reference, config: ProbeConfig) -> dict:
    """Sample n_per_class images per class from fixed seeds; score plausibility, FID and PRDC against the real set."""
    import torch

    from pathalign_ray.diffusion import ddim_sample, load_model, namespaced_seed, to_uint8
    from pathalign_ray.evaluation.classifier import extract_features
    from pathalign_ray.evaluation.features import encoder_from_state
    from pathalign_ray.evaluation.metrics import frechet_distance_of, precision_recall_density_coverage
    from pathalign_ray.pathologist import judge

    torch.set_num_threads(config.threads)
    unet, ddim, class_names, _ = load_model(model_dir)
    labels = torch.arange(len(class_names)).repeat_interleave(config.n_per_class)
    seeds = [namespaced_seed("probe", config.seed, int(c), j % config.n_per_class) for j, c in enumerate(labels.tolist())]
    batches = [
        to_uint8(ddim_sample(unet, ddim, labels[i : i + 64], seeds[i : i + 64], config.ddim_steps))
        for i in range(0, len(labels), 64)
    ]
    images = np.concatenate(batches)
    classes = [class_names[c] for c in labels.tolist()]
    plausible = [judge(image, name, config.strictness).plausible for image, name in zip(images, classes)]
    encoder = encoder_from_state(reference.encoder_channels, reference.num_classes, reference.encoder_state)
    features = extract_features(encoder, images)
    diversity = precision_recall_density_coverage(reference.real_features, features, config.prdc_k)
    return {
        "plausibility": float(np.mean(plausible)),
        "fid": frechet_distance_of(reference.real_features, features),
        **diversity,
    }


def build_reference(search: SearchConfig) -> Reference:
    """The domain encoder (cached with the data set, else trained and cached), real features, the base model's probe."""
    import torch

    from pathalign_ray.data.shards import read_dataset
    from pathalign_ray.evaluation.classifier import extract_features

    real_dir = search.finetune.data.real_dataset
    if not real_dir:
        raise ValueError("the search needs finetune.data.real_dataset: FID and coverage are measured against it")
    torch.set_num_threads(search.probe.encoder.threads)
    train = read_dataset(real_dir, "train")
    encoder, info = _domain_encoder(real_dir, search.probe, train)
    reference = Reference(
        encoder_channels=tuple(info["config"]["channels"]),
        encoder_state={k: v.clone() for k, v in encoder.state_dict().items()},
        num_classes=len(info["class_names"]),
        real_features=extract_features(encoder, train.images),
        base={},
    )
    reference.base = probe(search.finetune.base_model, reference, search.probe)
    print("base model: " + ", ".join(f"{k} {v:.4g}" for k, v in reference.base.items()))
    return reference


def _domain_encoder(real_dir: str, config: ProbeConfig, train):
    """jobs/evaluate.py's domain encoder, from the same cache (same recipe, same key), trained here when missing."""
    from pathalign_ray.data.shards import read_dataset
    from pathalign_ray.evaluation.classifier import predict_proba, train_classifier
    from pathalign_ray.evaluation.features import encoder_cache_key, load_cached_encoder, save_encoder
    from pathalign_ray.evaluation.metrics import classification_metrics

    key = encoder_cache_key(real_dir, config.encoder, config.encoder_seed)
    cached = load_cached_encoder(real_dir, key)
    if cached is not None:
        return cached
    print(f"domain encoder: training on {len(train.images)} real images ({config.encoder.steps} steps)")
    classes = len(train.class_names)
    model, losses = train_classifier(train.images, train.labels, classes, config.encoder, config.encoder_seed)
    test = read_dataset(real_dir, "test")
    info = {
        "key": key,
        "config": config_to_dict(config.encoder),
        "seed": config.encoder_seed,
        "class_names": list(train.class_names),
        "image_size": int(train.images.shape[1]),
        "feature_dim": int(config.encoder.channels[-1]),
        "test_metrics": classification_metrics(test.labels, predict_proba(model, test.images)),
        "final_loss": float(np.mean(losses[-10:])),
        "n_train": len(train.images),
    }
    save_encoder(model, info, real_dir)
    return model, info


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

    model_dir = finetune(config)
    scores = probe(model_dir, reference, search.probe)
    base, penalties = reference.base, search.penalties
    terms = objective_terms(
        scores["plausibility"], scores["fid"], scores["coverage"], base["plausibility"], base["fid"], base["coverage"],
        penalties.fid_weight, penalties.coverage_weight,
    )
    history = Path(config.run_dir) / f"{config.name}_metrics.jsonl"
    last = json.loads(history.read_text().splitlines()[-1])
    kept = ("loss", "reward_mean", "kl_to_base", "fresh_plausibility")  # finetuning's own last log line
    trained = {f"train_{k}": v for k, v in last.items() if k in kept}
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
    reference = build_reference(config)
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
    finetune = _map_input_paths(config.finetune, lambda path: str(Path(path).resolve()))
    return dataclasses.replace(config, finetune=finetune, out_dir=str(Path(config.out_dir).resolve()))


def _map_input_paths(finetune: FinetuneConfig, convert) -> FinetuneConfig:
    """The finetune section with convert(path) applied to each input path that is set."""

    def each(path: str) -> str:
        return convert(path) if path else path

    return dataclasses.replace(
        finetune,
        base_model=each(finetune.base_model),
        data=dataclasses.replace(
            finetune.data, samples=tuple(map(each, finetune.data.samples)), real_dataset=each(finetune.data.real_dataset)
        ),
        reward=dataclasses.replace(finetune.reward, model=each(finetune.reward.model)),
    )


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


# ---------------------------------------------------------------- results


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
    """_resolved made the input paths absolute for the trials; those under the working directory go back to
    relative, so the best config stays usable from another checkout of the project."""
    cwd = Path.cwd()
    return _map_input_paths(config, lambda path: str(Path(path).relative_to(cwd)) if Path(path).is_relative_to(cwd) else path)


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
