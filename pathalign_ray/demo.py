"""The demo (`make demo`): one round of the feedback loop on the shipped 32 px generator, judged before
and after on held-out noise, with a report a person can look at.

Stages: the procedural data set (the real images: weak feedback, the beta term, the evaluation's
reference); the generator (`model`: configs/demo.yaml ships models/cells32-artefacts15; or pretrained here
with a `pretrain` section); the loop (pool sampled, simulated pathologists' verdicts, reward model on Ray
Train, served on Ray Serve, finetuning on Ray Train with DeepSpeed, scored over HTTP); the evaluation of both models on noise no
round drew; RUN_DIR/demo.json and RUN_DIR/report.html. Every path comes from run_dir, which may be a
URI (s3://bucket/run: everything then lives on the bucket). A rerun reuses the data set, skips
finished rounds and (on a local run_dir) reuses the evaluation's samples.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from pathalign_ray import storage
from pathalign_ray.align import AlignConfig, align
from pathalign_ray.cluster import RAY_TEMP_DIR, init_ray
from pathalign_ray.config import Location, config_dataclass, refuse_overwritten
from pathalign_ray.data.make import MakeDatasetConfig, make_dataset
from pathalign_ray.demo_report import demo_summary, write_demo_report
from pathalign_ray.evaluation.evaluate import EvaluateConfig, evaluate
from pathalign_ray.generator.pretrain import PretrainConfig, pretrain

SUMMARY_FILE = "demo.json"
REPORT_FILE = "report.html"
# Keys of the sections below that the demo sets from run_dir (RUN_DIR/data, RUN_DIR/model, RUN_DIR/evaluation)
SET_FROM_RUN_DIR = (
    "pretrain.run_dir", "pretrain.data.dataset", "dataset.out_dir", "align.run_dir", "align.reward.data.dataset",
    "evaluate.models", "evaluate.real", "evaluate.out_dir",
)  # fmt: skip


@config_dataclass
class DemoConfig:
    # a path or URI: data/, model/, rounds/, feedback/, reward/, evaluation/, demo.json, report.html
    run_dir: Location = "runs/demo"
    model: Location = "models/cells32"  # the exported generator the loop starts from (unused when pretrain is set)
    # the keys in SET_FROM_RUN_DIR are the demo's, refused in these sections
    pretrain: PretrainConfig | None = None  # set: pretrain a generator in run_dir first and start from it
    dataset: MakeDatasetConfig = dataclasses.field(default_factory=MakeDatasetConfig)
    align: AlignConfig = dataclasses.field(default_factory=AlignConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)  # the models before and after
    # logical CPUs of the local Ray cluster the demo starts (not under `ray job submit`): the reward
    # endpoint's replica, 2 training workers and their data tasks at once on a 2-core machine
    ray_cpus: int = 4
    verbose: bool = False  # true: every Ray worker's log lines on the console too (always in RUN_DIR/ray_logs)

    def __post_init__(self) -> None:
        refuse_overwritten(self, SET_FROM_RUN_DIR, "set from run_dir")
        if self.pretrain is None and not storage.exists(storage.join(self.model, "unet", "config.json")):
            raise ValueError(f"model: {self.model} is not an exported generator (no unet/ folder in it)")


@dataclasses.dataclass
class DemoResult:
    summary: dict  # the figures of demo.json
    report: str | Path  # report.html


def run_demo(config: DemoConfig) -> DemoResult:
    """Run every stage not yet done; return the before/after figures and the report's path."""
    started = time.perf_counter()
    run_dir = storage.absolute(config.run_dir)
    _start_ray(config, run_dir)
    data_dir = _dataset(config, run_dir)
    model_dir = _generator(config, run_dir, data_dir)
    data = dataclasses.replace(config.align.reward.data, dataset=data_dir)
    reward = dataclasses.replace(config.align.reward, data=data)
    rows = align(dataclasses.replace(config.align, run_dir=run_dir, reward=reward))
    finetuned = storage.join(run_dir, f"round{len(rows) - 1}-model")
    print(f"[demo] evaluating {Path(model_dir).name} and {Path(finetuned).name} on held-out noise")
    report_dir = evaluate(
        dataclasses.replace(
            config.evaluate, models=(model_dir, finetuned), real=data_dir, out_dir=storage.join(run_dir, "evaluation")
        )
    )
    metrics = _read_json(storage.join(report_dir, "metrics.json"))
    history_text = storage.read_bytes(storage.join(run_dir, f"round{len(rows) - 1}_metrics.jsonl")).decode()
    history = [json.loads(line) for line in history_text.splitlines()]
    reward_info = _read_json(storage.join(run_dir, "reward", "reward.json"))
    summary = demo_summary(metrics, rows, reward_info, wall_s=time.perf_counter() - started)
    storage.write_bytes(storage.join(run_dir, SUMMARY_FILE), (json.dumps(summary, indent=2) + "\n").encode())
    grids = storage.download_dir(storage.join(report_dir, "grids"))
    report = write_demo_report(summary, metrics, history, grids, storage.location(storage.join(run_dir, REPORT_FILE)))
    return DemoResult(summary=summary, report=report)


def _read_json(location: str) -> dict:
    return json.loads(storage.read_bytes(location))


def _start_ray(config: DemoConfig, run_dir: str) -> None:
    """Join or start the cluster; on a local one, a local RUN_DIR/ray_logs points at its session's logs."""
    init_ray(num_cpus=config.ray_cpus, log_to_driver=config.verbose)
    logs = (Path(RAY_TEMP_DIR) / "session_latest" / "logs").resolve()
    where = "on the head node"
    if logs.is_dir() and not storage.is_uri(run_dir):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        link = Path(run_dir) / "ray_logs"
        link.unlink(missing_ok=True)
        link.symlink_to(logs)
        where = f"in {link}"
    print(f"[demo] Ray dashboard: http://127.0.0.1:8265; the workers' logs are {where}")


def _dataset(config: DemoConfig, run_dir: str) -> str:
    data_dir = storage.join(run_dir, "data")
    if storage.exists(storage.join(data_dir, "dataset.json")):
        print(f"[demo] reusing the data set in {data_dir}")
    else:
        make_dataset(dataclasses.replace(config.dataset, out_dir=data_dir))
        print(f"[demo] data set written to {data_dir}")
    return data_dir


def _generator(config: DemoConfig, run_dir: str, data_dir: str) -> str:
    """RUN_DIR/model: pretrained here when config.pretrain is set, else a copy of config.model."""
    if config.pretrain is not None:
        data = dataclasses.replace(config.pretrain.data, dataset=data_dir)
        return str(pretrain(dataclasses.replace(config.pretrain, run_dir=run_dir, data=data)).model_dir)
    model_dir = storage.join(run_dir, "model")
    if not storage.exists(storage.join(model_dir, "unet", "config.json")):
        storage.upload_dir(storage.download_dir(config.model), model_dir)
        print(f"[demo] starting from the shipped generator {config.model}")
    return model_dir
