"""What every Ray Train worker of a diffusion job does around its objective: the DeepSpeed engine,
EMA weights, and checkpoints that resume.

A checkpoint holds each rank's DeepSpeed shard, the EMA weights (rank 0) and a JSON train state
(step, metric history, and whatever the job adds). Only ray.train and deepspeed wiring lives here;
the objectives are in pathalign_ray.objectives and pathalign_ray.diffusion.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from pathalign_ray.cluster import ScaleConfig, deepspeed_config

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
    """A DeepSpeed engine with a torch AdamW and linear warm-up. Returns (engine, lr scheduler).

    With accumulation_steps > 1, engine.step() applies the optimizer every that many micro-steps.
    """
    import deepspeed

    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=warmup, config=deepspeed_config(scale, batch_size, grad_clip, accumulation_steps)
    )
    return engine, warmup


def init_ema(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in module.named_parameters()}


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


def mean_over_workers(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.detach().float().clone()
        torch.distributed.all_reduce(value)
        value /= world_size
    return float(value)


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
            batch_size=batch_size, drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS, local_shuffle_seed=(seed + epoch) % 2**32,
        )
        epoch += 1


def restore_checkpoint(engine, ema: dict[str, torch.Tensor]) -> dict | None:
    """Load this run's latest checkpoint into the engine and EMA; return its train state, or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as checkpoint_dir:
        checkpoint_dir = Path(checkpoint_dir)
        engine.load_checkpoint(str(checkpoint_dir), tag=DEEPSPEED_TAG)
        for name, tensor in load_file(checkpoint_dir / EMA_FILE).items():
            ema[name].copy_(tensor)
        return json.loads((checkpoint_dir / TRAIN_STATE_FILE).read_text())


def report_checkpoint(engine, ema: dict[str, torch.Tensor], state: dict, rank: int, metrics: dict) -> None:
    """Every rank saves its DeepSpeed shard; rank 0 adds the EMA weights and the train state."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG)
        if rank == 0:
            save_file({name: tensor.contiguous() for name, tensor in ema.items()}, str(Path(tmp) / EMA_FILE))
            (Path(tmp) / TRAIN_STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def read_checkpoint(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(EMA weights, train state) of a checkpoint folder, on the driver."""
    return load_file(checkpoint_dir / EMA_FILE), json.loads((checkpoint_dir / TRAIN_STATE_FILE).read_text())
