"""What every Ray Train worker does around its objective: the learning-rate schedule, metrics averaged
over workers, the log and checkpoint window, Ray Train checkpoints that resume, and, for the diffusion
jobs, the DeepSpeed engine and EMA weights.

The three training loops (pretrain, finetune: DeepSpeed; the reward model: DDP) and the evaluation's
classifiers all take their schedule and reduction from here. A diffusion checkpoint holds each rank's
DeepSpeed shard, the EMA weights (rank 0) and a JSON train state (step, metric history, and whatever
the job adds). Only ray.train and deepspeed wiring lives here; the objectives are in
pathalign_ray.generator.objectives and pathalign_ray.generator.diffusion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from pathalign_ray.cluster import ScaleConfig, deepspeed_config
from pathalign_ray.metrics import record_train_metrics

T = TypeVar("T")

EMA_FILE = "ema.safetensors"
TRAIN_STATE_FILE = "train_state.json"
DEEPSPEED_TAG = "deepspeed"


def worker_setup(scale: ScaleConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker, with its torch thread count set."""
    import ray.train

    torch.set_num_threads(scale.threads_per_worker)
    context = ray.train.get_context()
    if scale.device == "cuda":
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    return context.get_world_rank(), context.get_world_size(), device


def build_engine(
    module: torch.nn.Module,
    scale: ScaleConfig,
    lr: float,
    batch_size: int,
    grad_clip: float,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    accumulation_steps: int = 1,
):
    """A DeepSpeed engine with a torch AdamW over the module's trainable parameters (a LoRA adapter's only, when
    the rest is frozen) and linear warm-up to a constant rate. Returns (engine, lr scheduler).

    With accumulation_steps > 1, engine.step() applies the optimizer every that many micro-steps.
    """
    import deepspeed

    optimizer = torch.optim.AdamW(_trainable(module), lr=lr, weight_decay=weight_decay)
    schedule = lr_schedule(optimizer, total_steps=0, schedule="constant", warmup_steps=warmup_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(scale, batch_size, grad_clip, accumulation_steps),
    )
    return engine, schedule


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def lr_factor(step: int, total_steps: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate of optimizer step `step` (0-based), as a fraction of the peak: a linear warm-up
    over the first `warmup_steps`, then constant, or half a cosine down to 0 at step `total_steps`."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def lr_schedule(optimizer, total_steps: int, schedule: str = "constant", warmup_steps: int = 0):
    """A torch scheduler that sets lr_factor for each optimizer step (call .step() after each)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, schedule, warmup_steps)
    )


def init_ema(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """EMA weights of the trainable parameters (with LoRA: the adapter's), by name; update_ema and ema_weights
    touch those names only, so frozen weights are never copied."""
    return {name: p.detach().float().clone() for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], module: torch.nn.Module, decay: float) -> None:
    params = dict(module.named_parameters())
    torch._foreach_lerp_(list(ema.values()), [params[n].detach().float() for n in ema], 1.0 - decay)


@contextlib.contextmanager
def ema_weights(module: torch.nn.Module, ema: dict[str, torch.Tensor]):
    """Run `module` with its EMA weights (the ones exported), then put the trained weights back."""
    params = dict(module.named_parameters())
    trained = {name: params[name].detach().clone() for name in ema}
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value)
    try:
        yield module
    finally:
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)


def mean_over_workers(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    """Each scalar (a float or a 0-d tensor) averaged over the Ray Train workers, who all call this
    together with the same keys. One all-reduce, on the device the process group runs on (nccl: the GPU)."""
    values = {key: float(value) for key, value in metrics.items()}
    if world_size == 1:
        return values
    keys = sorted(values)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    summed = torch.tensor([values[key] for key in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(summed)
    return {key: float(value) / world_size for key, value in zip(keys, summed.tolist())}


class MetricsWindow:
    """The steps and seconds since the last report, so each report gives its own window's step time."""

    def __init__(self):
        self.start, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    def close(self) -> float:
        """Seconds per step over the window; a new window starts."""
        step_time = (time.perf_counter() - self.start) / max(1, self.steps)
        self.start, self.steps = time.perf_counter(), 0
        return step_time


def checkpoint_due(step: int, every: int, total_steps: int) -> bool:
    return step % every == 0 or step == total_steps


def log_and_report(
    job: str, metrics: dict, state: dict, engine, ema: dict, rank: int, total_steps: int, checkpoint: bool
) -> None:
    """One report of a diffusion job: the metrics join the train state's history; rank 0 sets the
    training gauges and prints them; every rank reports to Ray Train, with a checkpoint when asked."""
    import ray.train

    state["history"].append(metrics)
    if rank == 0:
        record_train_metrics(job, metrics)
        shown = " ".join(f"{key} {value:.4g}" for key, value in metrics.items() if key != "step")
        print(f"{job} step {metrics['step']}/{total_steps} {shown}")
    if checkpoint:
        report_checkpoint(engine, ema, state, rank, metrics)
    else:
        ray.train.report(metrics)


# A shard up to this size is held in the worker's memory and reshuffled each epoch by an index
# permutation, which costs nothing per step. A larger one streams through Ray Data's local shuffle
# buffer of SHUFFLE_BUFFER_ROWS rows, which costs the training loop about a fifth of its speed on 2 cores.
IN_MEMORY_SHARD_BYTES = 2 * 2**30
SHUFFLE_BUFFER_ROWS = 4096


def cycle_batches(
    shard, batch_size: int, seed: int, max_in_memory_bytes: int = IN_MEMORY_SHARD_BYTES
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches of a Ray Data shard, epoch after epoch, for as long as the loop asks.

    Data sets are written sorted by class, so unshuffled batches hold one class each and the model
    would drift towards each class in turn. Each epoch has a new order, the same for the same seed.
    """
    columns = _shard_in_memory(shard, max_in_memory_bytes)
    if columns is None:
        yield from _streamed_shuffled_batches(shard, batch_size, seed)
        return
    rows = len(next(iter(columns.values())))
    if rows < batch_size:
        raise ValueError(f"this worker's shard holds {rows} rows, fewer than one batch of {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield {name: column[index] for name, column in columns.items()}


def _shard_in_memory(shard, max_bytes: int) -> dict[str, torch.Tensor] | None:
    """The whole shard as one tensor per column, or None once it passes max_bytes."""
    parts, size = [], 0
    for batch in shard.iter_torch_batches(batch_size=1024):
        parts.append(batch)
        size += sum(column.nbytes for column in batch.values())
        if size > max_bytes:
            return None
    if not parts:
        raise ValueError("this worker's data shard is empty")
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _streamed_shuffled_batches(shard, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        yield from shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
            local_shuffle_seed=(seed + epoch) % 2**32,
        )
        epoch += 1


def read_latest_checkpoint(read: Callable[[Path], T]) -> T | None:
    """read(folder) of this Ray Train run's latest checkpoint (after a worker failure or a rerun), or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as checkpoint_dir:
        return read(Path(checkpoint_dir))


def report_with_checkpoint(metrics: dict, write: Callable[[Path], None]) -> None:
    """ray.train.report the metrics with a checkpoint of what write(folder) puts in a fresh folder.

    The folder is written here, then uploaded to the run's storage_path in Ray Train's background thread
    (which deletes it once uploaded), so a bucket's upload overlaps the next training steps; Ray Train
    waits for the last upload before the run ends.
    """
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    folder = tempfile.mkdtemp(prefix="pathalign_checkpoint_")
    write(Path(folder))
    ray.train.report(
        metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_upload_mode=CheckpointUploadMode.ASYNC
    )


def restore_checkpoint(engine, ema: dict[str, torch.Tensor]) -> dict | None:
    """Load this run's latest checkpoint into the engine and EMA; return its train state, or None.

    A checkpoint holds the trainable parameters only (report_checkpoint): the frozen ones, if any, are
    the base model's, already in the engine, so only a model without frozen parameters loads strictly.
    """
    strict = len(_trainable(engine.module)) == len(list(engine.module.parameters()))

    def read(checkpoint_dir: Path) -> dict:
        engine.load_checkpoint(str(checkpoint_dir), tag=DEEPSPEED_TAG, load_module_strict=strict)
        for name, tensor in load_file(checkpoint_dir / EMA_FILE).items():
            ema[name].copy_(tensor)
        return json.loads((checkpoint_dir / TRAIN_STATE_FILE).read_text())

    return read_latest_checkpoint(read)


def report_checkpoint(engine, ema: dict[str, torch.Tensor], state: dict, rank: int, metrics: dict) -> None:
    """Every rank saves its DeepSpeed shard; rank 0 adds the EMA weights and the train state. Frozen parameters
    (a LoRA adapter's base model) are left out: the checkpoint holds what trains."""

    def write(folder: Path) -> None:
        engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            save_file({name: tensor.contiguous() for name, tensor in ema.items()}, str(folder / EMA_FILE))
            (folder / TRAIN_STATE_FILE).write_text(json.dumps(state))

    report_with_checkpoint(metrics, write)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a training job made: the exported model's folder and its metric history (one row per report;
    also written to RUN_DIR/NAME_metrics.jsonl for people and for resumed runs)."""

    model_dir: Path
    history: list[dict]

    @property
    def final(self) -> dict:
        """The last report's metrics (the fresh-sample check, when the job ran one, is in it)."""
        return self.history[-1] if self.history else {}


def read_checkpoint(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(EMA weights, train state) of a checkpoint folder, on the driver."""
    return load_file(checkpoint_dir / EMA_FILE), json.loads((checkpoint_dir / TRAIN_STATE_FILE).read_text())
