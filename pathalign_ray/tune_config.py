"""What the feedback-weight search searches: SearchConfig, and each trial's FinetuneConfig drawn from it.

The space names FinetuneConfig fields by dotted key ("objective.beta", "train.lr"), which are also
Tune's parameter names; `trial_config` applies a trial's params to the finetune section and
validates the result. Checked when the config loads, before Ray starts: every searched key names a
field, a drawn range only a float one, no field the objective's kind ignores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import TypeAdapter, ValidationError

from pathalign_ray.config import (
    ConfigError,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
    config_to_dict,
    field_type,
    get_dotted,
    set_dotted,
)
from pathalign_ray.evaluation.probe import ProbeConfig
from pathalign_ray.finetune import FinetuneConfig

DDPO_ONLY = ("objective.clip_range", "objective.kl_coef", "objective.eta", "objective.ddim_steps",
             "objective.trajectories_per_step", "objective.inner_epochs", "objective.advantage_clip")
RWL_ONLY = ("objective.beta", "objective.weighting", "objective.threshold", "objective.temperature")


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
    # every trial starts from this config (its run_dir and name are set per trial)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    # FinetuneConfig section -> field -> range, e.g. {"objective": {"beta": ...}, "train": {"lr": ...}}
    space: dict[str, dict[str, ParamRange]] = dataclasses.field(default_factory=dict)
    algorithm: Literal["random", "optuna", "hyperopt"] = "random"  # optuna and hyperopt: pip install -e '.[tune]'
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
    out_dir: str = "runs/pretrain32/tune"  # Tune's experiment, trial runs, tables and plot
    best_config: str = ""  # the best trial's FinetuneConfig, for jobs/finetune.py; "": OUT_DIR/best_feedback.yaml
    best_name: str = "tuned"  # `name` of the finetuning run the best config describes
    # the first trial runs the finetune section's own values of the searched fields (the paper's beta 0.3
    # and raw reward weights by default): the baseline the best trial is measured against
    as_written_trial: bool = True

    def __post_init__(self) -> None:
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
    return {key: get_dotted(data, key) for key in search.ranges}


def _check_key(dotted: str, kind: str) -> None:
    """A searched key must name a FinetuneConfig field; a drawn range (not a choice) only a float one."""
    annotation = field_type(FinetuneConfig, dotted)
    if annotation is None:
        raise ValueError(f"space.{dotted}: FinetuneConfig has no field {dotted}")
    if kind != "choice" and annotation is not float:
        raise ValueError(f"space.{dotted}: a {kind} range draws floats; give this field a choice of values")


def trial_config(search: SearchConfig, params: dict, run_dir: str | Path, name: str) -> FinetuneConfig:
    """The base FinetuneConfig with the trial's params (dotted keys) applied, validated."""
    data = config_to_dict(search.finetune)
    data.update(run_dir=str(run_dir), name=name)
    for key, value in params.items():
        set_dotted(data, key, value.item() if isinstance(value, np.generic) else value)  # searchers may hand numpy scalars
    try:
        return TypeAdapter(FinetuneConfig).validate_python(data)
    except ValidationError as error:
        raise ConfigError(f"params {params}: {error}") from None


def map_input_paths(finetune: FinetuneConfig, convert) -> FinetuneConfig:
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
