"""The Tune search's probe: a model's plausibility, domain FID and coverage on fresh samples, after each report.

Fresh samples from fixed seeds (the "probe" seed namespace: every trial sees the same noise, which no
pool, finetuning check or evaluation draws; `probe_seeds`) under the sampler the evaluation judges with
(ddim_steps, eta), judged and compared with the real training split by the evaluation's own
code: the same domain encoder and its cache (`evaluate.domain_encoder`), the same features and
verdicts (`features.features_and_verdicts`), plausibility rate (`summarize_verdicts`) and Frechet
distance and coverage (`metrics.fidelity_and_diversity`). Sampling and scoring run in the calling
process (a Tune trial's, after its Ray Train run); the encoder, when it is not cached, in a Ray task.
Models and the real data set may be URIs (`pathalign_ray.storage`): a trial's model is downloaded to a
scratch folder for its probe, the base model and the data set once per node into the download cache
(where a data set on a bucket keeps its domain encoder's cache).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from pathalign_ray import storage
from pathalign_ray.config import NonNegativeFloat, PositiveInt, config_dataclass
from pathalign_ray.data.shards import read_dataset_info
from pathalign_ray.evaluation.classifier import ClassifierConfig, extract_features
from pathalign_ray.evaluation.features import encoder_from_state, features_and_verdicts
from pathalign_ray.evaluation.metrics import fidelity_and_diversity
from pathalign_ray.evaluation.plausibility import summarize_verdicts
from pathalign_ray.evaluation.sources import read_real_split
from pathalign_ray.generator import load_generator
from pathalign_ray.images import decode_images

BATCH = 64  # probe images sampled at once


@config_dataclass
class ProbeConfig:
    # fresh samples per class at each report (fixed seeds: every trial sees the same noise)
    n_per_class: PositiveInt = 16
    ddim_steps: PositiveInt = 20  # DDIM steps per probe sample
    eta: NonNegativeFloat = 0.0  # DDIM stochasticity (match the sampler the evaluation judges with)
    # base seed of the probe samples, in the "probe" seed namespace (never a pool's or the evaluation's noise)
    seed: int = 2000
    prdc_k: PositiveInt = 5  # nearest neighbours of coverage (Naeem et al. use 5)
    strictness: float = 1.0  # the simulated pathologist's (1 the reference)
    threads: int = 1  # torch threads of the probe (in the trial's process, after its Ray Train run)
    # the domain encoder's recipe; cached with the data set, shared with jobs/evaluate.py for the same recipe
    encoder: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    encoder_seed: int = 0  # the encoder's seed (jobs/evaluate.py's `seed`: the same recipe shares its cache)


@dataclasses.dataclass
class Reference:
    """What every probe compares with: the domain encoder, the real training set's features, the base model's scores."""

    encoder_channels: tuple[int, ...]
    encoder_state: dict
    num_classes: int
    real_features: np.ndarray  # (N, D) domain features of the real training split
    base: dict  # the base model's probe metrics


def probe(model_dir: str | Path, reference: Reference, config: ProbeConfig) -> dict:
    """Sample n_per_class images per class from fixed seeds; score plausibility, FID and PRDC against the real set.

    model_dir: an exported model folder, or a URI (downloaded to a scratch folder, removed afterwards)."""
    import torch

    if storage.is_uri(model_dir):
        with tempfile.TemporaryDirectory(prefix="pathalign-probe-") as scratch:
            return probe(storage.download_dir(model_dir, scratch), reference, config)

    torch.set_num_threads(config.threads)
    generator = load_generator(model_dir)  # a LoRA export with its adapter
    class_names = generator.class_names
    labels = torch.arange(len(class_names)).repeat_interleave(config.n_per_class)
    seeds = probe_seeds(len(class_names), config)
    batches = [
        generator.sample_uint8(labels[i : i + BATCH], seeds[i : i + BATCH], config.ddim_steps, config.eta)
        for i in range(0, len(labels), BATCH)
    ]
    images = np.concatenate(batches)
    classes = [class_names[c] for c in labels.tolist()]
    encoder = encoder_from_state(reference.encoder_channels, reference.num_classes, reference.encoder_state)
    outputs = features_and_verdicts(images, classes, np.ones(len(images), bool), encoder, None, config.strictness)
    verdicts = summarize_verdicts(classes, outputs["plausible"], outputs["failed"], outputs["found_cell"], class_names)
    fid, diversity = fidelity_and_diversity(reference.real_features, outputs["domain"], config.prdc_k)
    return {"plausibility": float(verdicts["plausible"]["rate"]), "fid": fid, **diversity}


def probe_seeds(num_classes: int, config: ProbeConfig) -> list[int]:
    """The probe's noise seeds, class by class: (class c, index j) draws namespaced_seed("probe", seed, c, j)."""
    from pathalign_ray.generator.diffusion import namespaced_seed  # heavy: diffusion imports diffusers

    return [namespaced_seed("probe", config.seed, c, j) for c in range(num_classes) for j in range(config.n_per_class)]


def build_reference(real_dir: str, base_model: str, config: ProbeConfig) -> Reference:
    """The domain encoder (cached with the data set, else trained and cached), real features, the base model's probe.

    real_dir and base_model: folders or URIs."""
    import torch

    from pathalign_ray.evaluation.evaluate import domain_encoder  # heavy: evaluate imports ray and diffusers

    if not real_dir:
        raise ValueError("the search needs finetune.data.real_dataset: FID and coverage are measured against it")
    if storage.is_uri(real_dir):  # read, and its encoder cached, in this node's download cache
        real_dir = str(storage.download_dir(real_dir))
    if storage.is_uri(base_model):
        base_model = str(storage.download_dir(base_model))  # the copy finetuning on this node uses too
    torch.set_num_threads(config.encoder.threads)
    dataset = read_dataset_info(real_dir)
    class_names, size = list(dataset["class_names"]), int(dataset["image_size"])
    train, test = read_real_split(real_dir, "train", class_names), read_real_split(real_dir, "test", class_names)
    state, info = domain_encoder(real_dir, config.encoder, config.encoder_seed, train, test)
    channels, num_classes = tuple(info["config"]["channels"]), len(info["class_names"])
    encoder = encoder_from_state(channels, num_classes, state)
    reference = Reference(
        encoder_channels=channels,
        encoder_state={k: v.clone() for k, v in encoder.state_dict().items()},
        num_classes=num_classes,
        real_features=extract_features(encoder, decode_images(train.png, size, train.name)),
        base={},
    )
    reference.base = probe(base_model, reference, config)
    print("base model: " + ", ".join(f"{k} {v:.4g}" for k, v in reference.base.items()))
    return reference
