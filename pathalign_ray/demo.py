"""The demo (`make demo`): one round of the feedback loop on the shipped 32 px generator, judged before
and after on held-out noise, with a report a person can look at.

Stages: the procedural data set (the real images: weak feedback, the beta term, the evaluation's
reference); the generator (models/cells32, or pretrained here with a `pretrain` section); the loop
(pool sampled, simulated pathologists' verdicts, reward model on Ray Train, served on Ray Serve,
finetuning on Ray Train with DeepSpeed, scored over HTTP); the evaluation of both models on noise no
round drew; RUN_DIR/demo.json and RUN_DIR/report.html. Every path comes from run_dir. A rerun
reuses the data set, skips finished rounds and reuses the evaluation's samples.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from pathalign_ray.align import AlignConfig, align
from pathalign_ray.cluster import RAY_TEMP_DIR, init_ray
from pathalign_ray.config import config_dataclass, refuse_overwritten
from pathalign_ray.data.make import MakeDatasetConfig, make_dataset
from pathalign_ray.evaluation.evaluate import EvaluateConfig, evaluate
from pathalign_ray.pretrain import PretrainConfig, pretrain

SUMMARY_FILE = "demo.json"
REPORT_FILE = "report.html"
# Keys of the sections below that the demo sets from run_dir (RUN_DIR/data, RUN_DIR/model, RUN_DIR/evaluation)
SET_FROM_RUN_DIR = (
    "pretrain.run_dir", "pretrain.data.dataset", "dataset.out_dir", "align.run_dir", "align.reward.data.dataset",
    "evaluate.models", "evaluate.real", "evaluate.out_dir",
)  # fmt: skip


@config_dataclass
class DemoConfig:
    run_dir: str = "runs/demo"  # data/, model/, rounds/, feedback/, reward/, evaluation/, demo.json, report.html
    model: str = "models/cells32"  # the exported generator the loop starts from (unused when pretrain is set)
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
        if self.pretrain is None and not (Path(self.model) / "unet").is_dir():
            raise ValueError(f"model: {self.model} is not an exported generator (no unet/ folder in it)")


@dataclasses.dataclass
class DemoResult:
    summary: dict  # the figures of demo.json
    report: Path  # report.html


def run_demo(config: DemoConfig) -> DemoResult:
    """Run every stage not yet done; return the before/after figures and the report's path."""
    from pathalign_ray.demo_report import demo_summary, write_demo_report

    started = time.perf_counter()
    run_dir = Path(config.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    _start_ray(config, run_dir)
    data_dir = _dataset(config, run_dir)
    model_dir = _generator(config, run_dir, data_dir)
    reward = dataclasses.replace(config.align.reward, data=dataclasses.replace(config.align.reward.data, dataset=str(data_dir)))
    rows = align(dataclasses.replace(config.align, run_dir=str(run_dir), reward=reward))
    finetuned = run_dir / f"round{len(rows) - 1}-model"
    print(f"[demo] evaluating {model_dir.name} and {finetuned.name} on held-out noise")
    report_dir = evaluate(
        dataclasses.replace(
            config.evaluate, models=(str(model_dir), str(finetuned)), real=str(data_dir), out_dir=str(run_dir / "evaluation")
        )
    )
    metrics = json.loads((report_dir / "metrics.json").read_text())
    history = [json.loads(line) for line in (run_dir / f"round{len(rows) - 1}_metrics.jsonl").read_text().splitlines()]
    reward_info = json.loads((run_dir / "reward" / "reward.json").read_text())
    summary = demo_summary(metrics, rows, reward_info, wall_s=time.perf_counter() - started)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    report = write_demo_report(summary, metrics, history, report_dir / "grids", run_dir / REPORT_FILE)
    return DemoResult(summary=summary, report=report)


def _start_ray(config: DemoConfig, run_dir: Path) -> None:
    """Join or start the cluster; on a local one RUN_DIR/ray_logs points at its session's logs (the workers' output)."""
    init_ray(num_cpus=config.ray_cpus, log_to_driver=config.verbose)
    logs = (Path(RAY_TEMP_DIR) / "session_latest" / "logs").resolve()
    where = "on the head node"
    if logs.is_dir():
        link = run_dir / "ray_logs"
        link.unlink(missing_ok=True)
        link.symlink_to(logs)
        where = f"in {link}"
    print(f"[demo] Ray dashboard: http://127.0.0.1:8265; the workers' logs are {where}")


def _dataset(config: DemoConfig, run_dir: Path) -> Path:
    data_dir = run_dir / "data"
    if (data_dir / "dataset.json").is_file():
        print(f"[demo] reusing the data set in {data_dir}")
    else:
        make_dataset(dataclasses.replace(config.dataset, out_dir=str(data_dir)))
        print(f"[demo] data set written to {data_dir}")
    return data_dir


def _generator(config: DemoConfig, run_dir: Path, data_dir: Path) -> Path:
    """RUN_DIR/model: pretrained here when config.pretrain is set, else a copy of config.model."""
    if config.pretrain is not None:
        data = dataclasses.replace(config.pretrain.data, dataset=str(data_dir))
        return pretrain(dataclasses.replace(config.pretrain, run_dir=str(run_dir), data=data)).model_dir
    model_dir = run_dir / "model"
    if not (model_dir / "unet").is_dir():
        shutil.copytree(config.model, model_dir)
        print(f"[demo] starting from the shipped generator {config.model}")
    return model_dir
