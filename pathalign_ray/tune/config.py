"""What the feedback-weight search searches: SearchConfig, its conditional space, and each trial's FinetuneConfig.

The space is a set of branches. Each names a form of the objective (rwl with raw weights, rwl with
centred weights and the ratio clip, ddpo, ...) and gives, by FinetuneConfig section and field, a
range to draw or a value to fix; a trial draws one branch, then that branch's ranges. So a field
exists only where it acts: ratio_clip only in a branch that fixes weighting centred, kl_coef only in
one that fixes kind ddpo. Optuna draws the space define-by-run (`define_by_run`), naming each draw
BRANCH:KEY ("rwl_centred:objective.ratio_clip"); `branch_params` turns a trial's draws back into
dotted FinetuneConfig keys, and `trial_config` applies them to the finetune section.

Checked when the config loads, before Ray starts, with errors that name the key: every field exists,
acts under its branch's kind and weighting, and every extreme of every range makes a valid config.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import TypeAdapter, ValidationError

from pathalign_ray import storage
from pathalign_ray.config import (
    ConfigError,
    Location,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
    config_to_dict,
    field_type,
    get_dotted,
    refuse_overwritten,
    set_dotted,
)
from pathalign_ray.evaluation.probe import ProbeConfig
from pathalign_ray.generator.finetune import FinetuneConfig, ObjectiveConfig

# The objective fields each kind reads (finetune.train_loop); in a trial of the other kind they keep their defaults.
KIND_FIELDS = {
    "rwl": ("objective.beta", "objective.weighting", "objective.threshold", "objective.temperature",
            "objective.ratio_clip"),
    "ddpo": ("objective.clip_range", "objective.kl_coef", "objective.eta", "objective.ddim_steps",
             "objective.trajectories_per_step", "objective.inner_epochs", "objective.advantage_clip"),
}  # fmt: skip
# rwl fields that act under one weighting only (objectives.reward_weights, reward_weighted_loss's ratio clip)
WEIGHTING_FIELDS = {"objective.threshold": "threshold", "objective.temperature": "class_normalized",
                    "objective.ratio_clip": "centred"}  # fmt: skip
SEPARATOR = ":"  # between a branch's name and a key in Optuna's parameter names (Ray splits nested names at "/")
TRIAL_NAME = "finetune"  # each trial's finetuning run: OUT_DIR/trials/ID/finetune, its model finetune-model
_BRANCH_NAME = re.compile(r"[A-Za-z_]\w*")
_FINETUNE = TypeAdapter(FinetuneConfig)


@config_dataclass
class ParamRange:
    kind: Literal["uniform", "loguniform", "choice"] = "choice"  # how the search draws this field
    low: float = 0.0  # uniform, loguniform: lower bound (loguniform: > 0)
    high: float = 1.0  # uniform, loguniform: upper bound
    values: tuple[int | float | str, ...] = ()  # choice: the candidate values, of the field's type

    def __post_init__(self) -> None:
        if self.kind == "choice" and not self.values:
            raise ValueError("a choice needs values")
        if self.kind != "choice" and not (self.low < self.high and (self.kind == "uniform" or self.low > 0)):
            raise ValueError(f"{self.kind} needs low < high (and low > 0 for loguniform), got {self.low}, {self.high}")

    def holds(self, value) -> bool:
        return value in self.values if self.kind == "choice" else self.low <= value <= self.high


# a branch's field: a range the search draws, or a value it fixes (bool before int: YAML's true stays a bool)
BranchField = ParamRange | bool | int | float | str


@config_dataclass
class PenaltyConfig:
    fid_weight: float = 0.5  # objective lost per unit of relative FID increase over the base model (fid / base - 1)
    coverage_weight: float = 1.0  # objective lost per unit of coverage (0..1) lost against the base model


@config_dataclass
class AshaConfig:
    enabled: bool = True  # stop poor trials early (asynchronous successive halving)
    grace_period: int = 1  # reports every trial makes before it can be stopped
    reduction_factor: float = 2.0  # keep the best 1/reduction_factor at each rung


@config_dataclass
class SearchConfig:
    # every trial starts from this config (its run_dir and name are set per trial); its objective section is
    # left out: the branches of `space` set the objective
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    # branch -> FinetuneConfig section -> field -> a range or a fixed value; every branch fixes objective.kind
    space: dict[str, dict[str, dict[str, BranchField]]] = dataclasses.field(default_factory=dict)
    # both through Optuna (pip install -e '.[tune]'): random draws; tpe models the results (its first 10 trials random)
    algorithm: Literal["random", "tpe"] = "random"
    num_trials: PositiveInt = 12  # trials in the whole search
    seed: int = 0  # the search algorithm's seed
    report_every: PositiveInt = 50  # finetuning steps between reports; ASHA counts reports
    asha: AshaConfig = dataclasses.field(default_factory=AshaConfig)
    penalties: PenaltyConfig = dataclasses.field(default_factory=PenaltyConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    max_concurrent_trials: int = 1  # trials at once; 0: as many as the cluster's CPUs hold; capped by that anyway
    # a trial whose chunk (finetuning + probe) runs longer fails with a message
    report_timeout_s: PositiveFloat = 1800.0
    time_budget_s: NonNegativeFloat = 0.0  # the whole search; 0: no limit
    restart_errored: bool = True  # on resume, rerun failed trials from scratch (a timeout may have been transient)
    # a path or URI (s3://, gs://, file://): Tune's experiment, trial runs, tables and plot
    out_dir: Location = "runs/pretrain32/tune"
    # the best trial's FinetuneConfig (a path or URI), for jobs/finetune.py; "": OUT_DIR/best_feedback.yaml
    best_config: Location = ""
    best_name: str = "tuned"  # `name` of the finetuning run the best config describes
    # the first trial runs the finetune section's own values (the paper's beta 0.3, raw reward weights, its lr
    # and steps) in the branch that fixes nothing else: the baseline the best trial is measured against
    as_written_trial: bool = True
    # then one trial in each other branch (its values drawn) before free draws: a dozen random draws over five
    # branches can miss one entirely (the 2026-12-07 search drew no centred trial in its first 9)
    every_branch_first: bool = True

    def __post_init__(self) -> None:
        if not self.space:
            raise ValueError("space: give at least one branch (name -> section -> field -> range or value)")
        objective_keys = [f"finetune.objective.{f.name}" for f in dataclasses.fields(ObjectiveConfig)]
        refuse_overwritten(self, objective_keys, "the branches of space set the objective (space.BRANCH.objective)")
        for name, branch in self.space.items():
            fields = flat_branch(branch)
            _check_branch(name, fields)
            for params in _corner_params(fields):  # every value a trial can draw must make a valid config
                try:
                    trial_config(self, params, self.out_dir, "check")
                except ConfigError as error:
                    raise ValueError(f"space.{name}: {error}") from None
        if self.as_written_trial:
            as_written_params(self)


def flat_branch(branch: dict[str, dict[str, BranchField]]) -> dict[str, BranchField]:
    """A branch's fields by dotted FinetuneConfig key ("objective.beta")."""
    return {f"{section}.{name}": value for section, fields in branch.items() for name, value in fields.items()}


def _check_branch(name: str, fields: dict[str, BranchField]) -> None:
    """Each key names a FinetuneConfig field that acts under the branch's kind and weighting; kind is fixed."""
    if not _BRANCH_NAME.fullmatch(name):
        raise ValueError(f"space.{name}: a branch's name is letters, digits and underscores")
    kind = fields.get("objective.kind")
    if kind not in KIND_FIELDS:
        raise ValueError(
            f"space.{name}.objective.kind: each branch fixes its objective's kind: one of {list(KIND_FIELDS)}"
        )
    weighting = fields.get("objective.weighting", ObjectiveConfig.weighting)
    for key, value in fields.items():
        where = f"space.{name}.{key}"
        annotation = field_type(FinetuneConfig, key)
        if annotation is None:
            raise ValueError(f"{where}: FinetuneConfig has no field {key}")
        if key.startswith("scale."):
            raise ValueError(f"{where}: scale sizes every trial alike (and fixes how many run at once)")
        other = [k for k, keys in KIND_FIELDS.items() if key in keys and k != kind]
        if other:
            raise ValueError(f"{where}: acts with objective.kind={other[0]} only; this branch's kind is {kind}")
        if key in WEIGHTING_FIELDS and weighting != WEIGHTING_FIELDS[key]:
            its = "drawn" if isinstance(weighting, ParamRange) else weighting
            raise ValueError(
                f"{where}: acts with objective.weighting={WEIGHTING_FIELDS[key]} only; this branch's weighting is "
                f"{its} (fix it to {WEIGHTING_FIELDS[key]} here, or give this field another branch)"
            )
        if isinstance(value, ParamRange) and value.kind != "choice" and annotation is not float:
            raise ValueError(f"{where}: a {value.kind} range draws floats; give this field a choice of values")


def _corner_params(fields: dict[str, BranchField]) -> list[dict]:
    """Dotted params at every extreme of each range (the other ranges at their first extreme), fixed values set."""
    options = {
        key: (list(value.values) if value.kind == "choice" else [value.low, value.high])
        for key, value in fields.items()
        if isinstance(value, ParamRange)
    }
    first = {key: value for key, value in fields.items() if not isinstance(value, ParamRange)}
    first |= {key: values[0] for key, values in options.items()}
    return [first] + [{**first, key: value} for key, values in options.items() for value in values[1:]]


def define_by_run(trial, space: dict[str, dict[str, dict[str, BranchField]]]) -> None:
    """Optuna's define-by-run of the space: the branch, then each of its ranges, named BRANCH:KEY."""
    name = trial.suggest_categorical("branch", list(space))
    for key, value in flat_branch(space[name]).items():
        if not isinstance(value, ParamRange):
            continue
        label = f"{name}{SEPARATOR}{key}"
        if value.kind == "choice":
            trial.suggest_categorical(label, list(value.values))
        else:
            trial.suggest_float(label, value.low, value.high, log=value.kind == "loguniform")


def branch_params(search: SearchConfig, drawn: dict) -> dict:
    """A trial's params as dotted FinetuneConfig keys, "branch" first: its branch's fixed values and its draws."""
    name = drawn["branch"]
    prefix = f"{name}{SEPARATOR}"
    fields = flat_branch(search.space[name])
    draws = {key.removeprefix(prefix): value for key, value in drawn.items() if key.startswith(prefix)}
    return {"branch": name, **{key: draws.get(key, value) for key, value in fields.items()}}


def searcher_point(search: SearchConfig, params: dict) -> dict:
    """branch_params' inverse for the drawn fields: the Optuna parameters that make `params` (points_to_evaluate)."""
    name = params["branch"]
    ranges = [key for key, value in flat_branch(search.space[name]).items() if isinstance(value, ParamRange)]
    return {"branch": name, **{f"{name}{SEPARATOR}{key}": params[key] for key in ranges}}


def as_written_params(search: SearchConfig) -> dict:
    """The finetune section's own values as a trial's params, in the first branch whose fixed values they match."""
    data = config_to_dict(search.finetune)
    for name, branch in search.space.items():
        fields = flat_branch(branch)
        fixed = {key: value for key, value in fields.items() if not isinstance(value, ParamRange)}
        if any(value != get_dotted(data, key) for key, value in fixed.items()):
            continue
        params = {"branch": name, **{key: get_dotted(data, key) for key in fields}}
        for key, value in fields.items():
            if isinstance(value, ParamRange) and not value.holds(params[key]):
                allowed = list(value.values) if value.kind == "choice" else f"[{value.low:g}, {value.high:g}]"
                raise ValueError(
                    f"as_written_trial: finetune.{key}={params[key]} is outside space.{name}.{key} {allowed}; "
                    "widen the range, or set as_written_trial=false"
                )
        return params
    raise ValueError(
        "as_written_trial: no branch of space fixes only the finetune section's own values (objective kind "
        f"{ObjectiveConfig.kind}, weighting {ObjectiveConfig.weighting}); add one, or set as_written_trial=false"
    )


def trial_config(search: SearchConfig, params: dict, run_dir: str | Path, name: str) -> FinetuneConfig:
    """The finetune section with the trial's params (dotted keys; "branch" names them) applied, validated."""
    data = config_to_dict(search.finetune)
    data.update(run_dir=str(run_dir), name=name)
    for key, value in params.items():
        if key != "branch":
            set_dotted(data, key, value.item() if isinstance(value, np.generic) else value)  # searchers may hand numpy
    try:
        return _FINETUNE.validate_python(data)
    except ValidationError as error:
        reasons = [
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        ]
        raise ConfigError(f"params {params} make an invalid FinetuneConfig: {'; '.join(reasons)}") from None


def trial_run_dir(out_dir: str | Path, trial_id: str) -> str:
    """A trial's finetuning run folder, OUT_DIR/trials/ID: a path, or a URI when out_dir is one."""
    return storage.join(out_dir, "trials", trial_id)


def longest_steps(search: SearchConfig) -> int:
    """The most finetuning steps any trial can run (ASHA's last rung)."""
    longest = 0
    for branch in search.space.values():
        steps = flat_branch(branch).get("train.steps", search.finetune.train.steps)
        longest = max(longest, max(steps.values) if isinstance(steps, ParamRange) else steps)
    return int(longest)


def map_input_paths(finetune: FinetuneConfig, convert) -> FinetuneConfig:
    """The finetune section with convert(location) applied to each input location (path or URI) that is set."""

    def each(path: str) -> str:
        return convert(path) if path else path

    return dataclasses.replace(
        finetune,
        base_model=each(finetune.base_model),
        data=dataclasses.replace(
            finetune.data,
            samples=tuple(map(each, finetune.data.samples)),
            real_dataset=each(finetune.data.real_dataset),
        ),
        reward=dataclasses.replace(finetune.reward, model=each(finetune.reward.model)),
    )
