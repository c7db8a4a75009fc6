"""Finetuning on a real local Ray cluster: 2 Ray Train workers, DeepSpeed ZeRO-2, a tiny model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from pathalign_ray.config import ConfigError, load_config
from pathalign_ray.finetune import FinetuneConfig, finetune

pytestmark = pytest.mark.ray


def _config(run_dir, model_dir, samples, dataset, *overrides):
    return load_config(
        FinetuneConfig,
        None,
        [
            f"run_dir={run_dir}",
            f"base_model={model_dir}",
            f"data.samples=[{samples}]",
            f"data.real_dataset={dataset}",
            "train.batch_size=4",
            "train.log_every=1",
            "train.eval_per_class=1",
            "train.eval_ddim_steps=2",
            "scale.num_workers=2",
            "scale.zero_stage=2",
            *overrides,
        ],
    )


def _history(run_dir, name):
    return [json.loads(line) for line in (run_dir / f"{name}_metrics.jsonl").read_text().splitlines()]


def test_a_killed_worker_is_replaced_and_the_run_resumes(tiny_pretrained, tiny_samples, tiny_dataset, tmp_path):
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # explicit: other Ray clusters may share this machine
    _, _, model_dir = tiny_pretrained
    config = _config(
        tmp_path, model_dir, tiny_samples, tiny_dataset,
        "name=faulty", "reward.kind=pathologist", "train.steps=14", "train.checkpoint_every=2", "train.eval_every=0",
    )
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("model", finetune(config)))
    runner.start()
    deadline = time.time() + 240
    while not list((tmp_path / "faulty").glob("checkpoint_*")) and time.time() < deadline:
        time.sleep(0.2)
    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2, workers
    os.kill(workers[1].pid, signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive() and "model" in outcome
    steps = [row["step"] for row in _history(tmp_path, "faulty")]
    assert steps == list(range(1, 15)), "the restored run continues the step count from its checkpoint"
    assert json.loads((outcome["model"] / "pathalign.json").read_text())["step"] == 14
    all_workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")])
    assert len(all_workers) >= 4, "a new worker group replaced the one that lost a worker"


def test_config_errors_before_ray_starts(tmp_path):
    with pytest.raises(ConfigError, match="objective rwl needs data.samples"):
        load_config(FinetuneConfig, None, ["data.samples=[]"])
    with pytest.raises(ConfigError, match="ddpo needs eta > 0"):
        load_config(FinetuneConfig, None, ["objective.kind=ddpo", "objective.eta=0", "data.real_dataset=x"])
    with pytest.raises(ConfigError, match="beta > 0 needs data.real_dataset"):
        load_config(FinetuneConfig, None, ["data.samples=[x]"])
