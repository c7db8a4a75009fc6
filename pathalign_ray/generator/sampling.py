"""Sampling a model into a folder of PNGs, a parquet manifest and a contact sheet, spread over Ray tasks.

Any generator (pathalign_ray.generator: a pixel UNet, or a latent model with its VAE) samples through its
own `sample_uint8`. It travels through Ray's object store, so workers on other nodes need no shared storage;
the model and the output folder may be URIs (pathalign_ray.storage).
Each image's noise comes from its own seed (base seed, class, index), so the same seed gives the
same image whatever the batching or the number of workers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pathalign_ray import storage
from pathalign_ray.cluster import init_ray
from pathalign_ray.config import Location, NonNegativeFloat, PositiveInt, config_dataclass
from pathalign_ray.generator import load_generator
from pathalign_ray.generator.diffusion import SeedNamespace, namespaced_seed
from pathalign_ray.images import contact_sheet, encode_png
from pathalign_ray.progress import bar
from pathalign_ray.reward.model import load_reward_model, score_images
from pathalign_ray.reward.selection import most_uncertain

MANIFEST_FILE = "manifest.parquet"


@config_dataclass
class SampleConfig:
    model: Location = "runs/demo/model"  # an exported model folder or URI (jobs/pretrain.py writes RUN_DIR/model)
    out_dir: Location = "runs/demo/samples/pretrained"  # PNGs under images/, manifest.parquet, contact_sheet.png
    n_per_class: PositiveInt = 8  # images per declared class
    class_counts: dict[str, int] = dataclasses.field(default_factory=dict)  # a class's images where not n_per_class
    classes: tuple[str, ...] = ()  # declared classes to sample; empty means all of the model's classes
    ddim_steps: PositiveInt = 50  # DDIM denoising steps per image
    eta: NonNegativeFloat = 0.0  # DDIM stochasticity: 0 is deterministic given the initial noise
    seed: int = 0  # base seed; image (class c, index j) uses namespaced_seed(namespace, seed, c, j)
    namespace: SeedNamespace = "sample"  # whose noise: sample, pool (feedback rounds), evaluation, check, probe
    batch_size: PositiveInt = 32  # images per Ray task
    threads_per_worker: int = 1  # torch threads and Ray CPUs per task
    device: Literal["cpu", "cuda"] = "cpu"
    overwrite: bool = False  # replace an existing out_dir; otherwise refuse, so no samples are lost
    select: Literal["all", "uncertain"] = "all"  # uncertain: keep the k the reward model is least sure of
    k: int = 0  # samples kept with select=uncertain, over all classes
    reward_model: Location = ""  # a reward model folder (RUN_DIR/reward); scores go to the manifest's reward column

    def __post_init__(self) -> None:
        if any(count < 0 for count in self.class_counts.values()):
            raise ValueError(f"class_counts: a class's image count must be >= 0, got {self.class_counts}")
        if self.select == "uncertain" and (self.k < 1 or not self.reward_model):
            raise ValueError("select=uncertain needs k >= 1 and a reward_model to score the samples")
        if self.select == "all" and self.k:
            raise ValueError(f"k={self.k} applies to select=uncertain only")


def sample(config: SampleConfig) -> str | Path:
    """Sample, write the folder (a path or a URI), return it."""
    out_dir = storage.location(config.out_dir)
    if not config.overwrite and not storage.is_empty(out_dir):
        raise FileExistsError(f"{out_dir} already holds samples; choose another out_dir or set overwrite=true")
    generator = load_generator(storage.download_dir(config.model))
    class_names, info = generator.class_names, generator.info
    plan = plan_samples(config, class_names)
    reward = _load_reward_model(config, plan)  # before sampling: a wrong path or class fails at once

    init_ray(device=config.device)
    model_ref = ray.put(generator)
    remote = _sample_batch.options(num_cpus=config.threads_per_worker, num_gpus=int(config.device == "cuda"))
    batches = [plan[i : i + config.batch_size] for i in range(0, len(plan), config.batch_size)]
    pending = {
        remote.remote(model_ref, [p["class_index"] for p in batch], [p["seed"] for p in batch], config): i
        for i, batch in enumerate(batches)
    }
    results: dict[int, np.ndarray] = {}
    with bar(len(plan), f"sampling ({config.namespace} noise)", "img") as progress:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            results[index] = ray.get(done[0])
            progress.update(len(batches[index]))
    images = np.concatenate([results[i] for i in range(len(batches))])
    if reward is not None:
        plan, images = _score_and_select(reward, config, plan, images)

    model_id, model_step = str(info.get("model_id", Path(config.model).name)), int(info.get("step", -1))
    with storage.output_dir(out_dir) as staging:
        (staging / "images").mkdir()
        for row, image in zip(plan, images):
            row.update(model_id=model_id, model_step=model_step, path=f"images/{row['sample_id']}.png")
            (staging / row["path"]).write_bytes(encode_png(image))
        _write_manifest(plan, staging / MANIFEST_FILE, config)
        labels = np.array([row["class_index"] for row in plan])
        contact_sheet(images, labels, class_names, staging / "contact_sheet.png", per_class=min(8, config.n_per_class))
    return out_dir


def read_manifest(sample_dir: str | Path) -> pa.Table:
    """The manifest of a sample folder (a path or a URI)."""
    try:
        data = storage.read_bytes(storage.join(sample_dir, MANIFEST_FILE))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{sample_dir} holds no {MANIFEST_FILE}: not a sample folder") from None
    return pq.read_table(pa.BufferReader(data))


def sample_id(namespace: str, seed: int, declared_class: str, index: int) -> str:
    """The id of image `index` of a class in a sample plan, e.g. pool1000-myeloblast-00003."""
    return f"{namespace}{seed}-{declared_class}-{index:05d}"


def plan_samples(config: SampleConfig, class_names: list[str]) -> list[dict]:
    """One row per image to draw (sample_id, declared_class, class_index, seed), in class order."""
    unknown = [name for name in (*config.classes, *config.class_counts) if name not in class_names]
    if unknown:
        raise ValueError(f"unknown class {unknown[0]!r}; the model knows {', '.join(class_names)}")
    wanted = config.classes or tuple(class_names)
    return [
        {
            "sample_id": sample_id(config.namespace, config.seed, name, j),
            "declared_class": name,
            "class_index": class_names.index(name),
            "seed": namespaced_seed(config.namespace, config.seed, class_names.index(name), j),
        }
        for name in wanted
        for j in range(config.class_counts.get(name, config.n_per_class))
    ]


def seeds_drawn_under(run_dir: str | Path, seeds: set[int], skip: str | Path | None = None) -> dict[Path, int]:
    """{manifest: how many of `seeds` it drew} for each sample folder under run_dir that shares any.

    Folders drawn for an evaluation (namespace evaluation) and those under `skip` are left out:
    what this finds is noise that pools, checks or probes of the run used.
    """
    skip = Path(skip).resolve() if skip is not None else None
    shared = {}
    for path in sorted(Path(run_dir).resolve().rglob(MANIFEST_FILE)):
        if skip is not None and path.is_relative_to(skip):
            continue
        manifest = pq.read_table(path)
        if "namespace" in manifest.column_names and set(manifest.column("namespace").to_pylist()) == {"evaluation"}:
            continue
        count = len(seeds.intersection(manifest.column("seed").to_pylist()))
        if count:
            shared[path] = count
    return shared


def _load_reward_model(config: SampleConfig, plan: list[dict]):
    if not config.reward_model:
        return None
    model, _ = load_reward_model(config.reward_model)
    model.class_ids(sorted({row["declared_class"] for row in plan}))  # an unknown class is a ValueError naming it
    return model


def _score_and_select(reward, config: SampleConfig, plan: list[dict], images: np.ndarray) -> tuple[list, np.ndarray]:
    """Score every image with the reward model; with select=uncertain keep the k most uncertain, in plan order."""
    scores = score_images(reward, images, [row["declared_class"] for row in plan])
    for row, score in zip(plan, scores):
        row["reward"] = float(score)
    keep = np.sort(most_uncertain(scores, config.k)) if config.select == "uncertain" else np.arange(len(plan))
    return [plan[i] for i in keep], images[keep]


def _write_manifest(plan: list[dict], path: Path, config: SampleConfig) -> None:
    rewards = {"reward": pa.array([row["reward"] for row in plan], pa.float32())} if "reward" in plan[0] else {}
    table = pa.table(
        {
            "sample_id": pa.array([row["sample_id"] for row in plan], pa.string()),
            "declared_class": pa.array([row["declared_class"] for row in plan], pa.string()),
            "seed": pa.array([row["seed"] for row in plan], pa.int64()),
            "model_id": pa.array([row["model_id"] for row in plan], pa.string()),
            "model_step": pa.array([row["model_step"] for row in plan], pa.int64()),
            "path": pa.array([row["path"] for row in plan], pa.string()),
            "ddim_steps": pa.array([config.ddim_steps] * len(plan), pa.int32()),
            "eta": pa.array([config.eta] * len(plan), pa.float32()),
            "namespace": pa.array([config.namespace] * len(plan), pa.string()),
            **rewards,  # P(plausible) by config.reward_model
        }
    )
    pq.write_table(table, path)


@ray.remote
def _sample_batch(generator, class_indices: list[int], seeds: list[int], config: SampleConfig) -> np.ndarray:
    torch.set_num_threads(config.threads_per_worker)
    device = torch.device("cuda" if config.device == "cuda" else "cpu")
    labels = torch.tensor(class_indices, device=device)
    return generator.to(device).sample_uint8(labels, seeds, config.ddim_steps, config.eta)
