"""How jobs reach Ray and how Ray Train workers set up DeepSpeed: the settings every distributed job shares."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from pathalign_ray.config import PositiveInt, config_dataclass

RAY_TEMP_DIR = "/tmp/pathalign_ray"  # Ray's sockets and logs; short, since unix socket paths are limited to 107 bytes
TORCH_EXTENSIONS_DIR = str(Path.home() / ".cache" / "pathalign_ray" / "torch_extensions")


@config_dataclass
class ScaleConfig:
    num_workers: PositiveInt = 2  # Ray Train workers (one DeepSpeed rank each)
    threads_per_worker: PositiveInt = 1  # torch intra-op threads and Ray CPUs reserved per worker
    device: Literal["cpu", "cuda"] = "cpu"  # cuda: one GPU per worker, nccl; cpu: gloo
    # DeepSpeed ZeRO stage: 0 (plain DDP) to 2 (optimizer state and gradients sharded). Not 3: it shards the
    # parameters, and the EMA and reward-weighted terms here need them whole on every rank
    zero_stage: Annotated[int, Field(ge=0, le=2)] = 2
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 runs on CPU and GPU; fp16 is not supported on CPU
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails


def job_env(device: str = "cpu") -> dict[str, str]:
    """Environment for the driver and every Ray worker of a job."""
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR),
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # Train V2 otherwise prints every worker line twice
    }
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return env


def init_ray(
    address: str | None = None,
    device: str = "cpu",
    num_cpus: int | None = None,
    dashboard: bool = True,
    log_to_driver: bool = True,
) -> None:
    """Connect to the cluster a job was submitted to, or start a local one.

    `ray job submit` sets RAY_ADDRESS, so jobs join the cluster; run by hand they start a local
    cluster whose temp files stay under RAY_TEMP_DIR and whose dashboard listens on 127.0.0.1.
    log_to_driver=False keeps the workers' output in Ray's log files (its session folder's logs/),
    and Ray's own info lines off the console: progress then shows as bars (pathalign_ray.progress).
    """
    import ray

    if ray.is_initialized():
        return
    env = job_env(device)
    os.environ.update(env)
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env}
    if not log_to_driver:
        import ray.data  # it configures its loggers on import: quiet them after that

        for name in ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        ray.init(
            num_cpus=num_cpus,
            _temp_dir=RAY_TEMP_DIR,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=log_to_driver,
        )


def keep_serving(app_name: str) -> None:
    """After a Serve deployment: under `ray job submit` return, since the app outlives the job; on a
    local cluster, block until Ctrl-C and then delete the app."""
    import time

    from ray import serve

    if os.environ.get("RAY_ADDRESS"):
        return
    print("serving on a local Ray cluster; press Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(app_name)


def deepspeed_config(scale: ScaleConfig, micro_batch_size: int, grad_clip: float, accumulation_steps: int = 1) -> dict:
    """The DeepSpeed config of one Ray Train worker; the optimizer is a torch one, passed in."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": scale.zero_stage},
        "bf16": {"enabled": scale.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def trainer_settings(scale: ScaleConfig, run_name: str, storage_path: str | Path, keep_checkpoints: int) -> dict:
    """ScalingConfig, TorchConfig and RunConfig for a TorchTrainer, as keyword arguments.

    storage_path is a plain path (made absolute) or a URI (s3://bucket/prefix, gs://..., file://...);
    a URI goes to Ray Train as the path on the bucket plus storage.py's filesystem, which carries an
    endpoint override (AWS_ENDPOINT_URL) to every worker.  The bucket is checked here, before Ray runs.
    A rerun with the same run_name and storage_path resumes from that run's latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from pathalign_ray.storage import ray_storage  # heavy: storage imports pyarrow

    path, filesystem = ray_storage(storage_path)

    use_gpu = scale.device == "cuda"
    return {
        "scaling_config": ScalingConfig(
            num_workers=scale.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": scale.threads_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        "torch_config": TorchConfig(backend="nccl" if use_gpu else "gloo"),
        "run_config": RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            worker_runtime_env={"env_vars": job_env(scale.device)},
        ),
    }
