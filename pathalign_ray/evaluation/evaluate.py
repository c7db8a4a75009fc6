"""Evaluate models the paper's four ways, the same way for each, on a Ray cluster; write report/.

For each model (an exported model folder, sampled here, or a sample folder) and for the real
held-out images as the reference:
- fidelity: Frechet distance to the real training split, in each feature space;
- diversity: precision, recall, density and coverage (Naeem et al. 2020) against the same;
- utility: a classifier trained on the model's images with their declared classes, tested on the
  real test split, beside the same classifier trained on the real training split (train-on-real);
- plausibility: the simulated pathologist's verdicts per class and per criterion, and the experts'
  consensus where the run's feedback store judged these very images; Wilson intervals throughout.

Where the work runs: sampling through `sampling.sample` (Ray tasks); the domain encoder's training
and every utility classifier in Ray tasks (one per training set, `workers` at a time); decoding,
features and the pathologist's verdicts in one Ray Data pass (`map_batches` over an actor pool,
one actor holding the encoder per worker). The metrics themselves are computed on the driver from
the gathered features (they need all of them at once; see metrics.py).

Models, the real data set and out_dir may be URIs (pathalign_ray.storage): the inputs are read
through the driver node's download cache, the report is written in a scratch folder and uploaded
to out_dir at the end. A model read from a bucket has no run folder beside it, so neither its
run's feedback nor the noise its run drew is looked up there.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import ray
from pydantic import Field

from pathalign_ray import storage
from pathalign_ray.cluster import init_ray
from pathalign_ray.config import Location, PositiveInt, config_dataclass, config_to_dict
from pathalign_ray.data.shards import read_dataset_info
from pathalign_ray.evaluation import report
from pathalign_ray.evaluation.classifier import ClassifierConfig, predict_proba, train_classifier
from pathalign_ray.evaluation.features import (
    check_inception_available,
    encoder_cache_key,
    encoder_from_state,
    features_and_verdicts,
    load_cached_encoder,
    load_inception,
    save_encoder,
)
from pathalign_ray.evaluation.metrics import classification_metrics, confusion_counts, fidelity_and_diversity
from pathalign_ray.evaluation.plausibility import plausibility_per_round, summarize_consensus, summarize_verdicts
from pathalign_ray.evaluation.samples import EvalSamplingConfig, check_noise_held_out, sample_model
from pathalign_ray.evaluation.sources import (
    MODEL,
    REAL,
    ImageSet,
    model_kind,
    model_names,
    read_feedback,
    read_real_split,
    read_rounds,
    read_sample_folder,
    run_dir_of,
)
from pathalign_ray.experts.checklist import SPECS
from pathalign_ray.images import contact_sheet, decode_image, decode_images
from pathalign_ray.progress import bar

SPACES = ("domain", "inception")  # feature spaces, in report order


@config_dataclass
class EvalScaleConfig:
    workers: PositiveInt = 2  # Ray Data actors (features, verdicts) and classifier trainings at once
    threads_per_worker: PositiveInt = 1  # torch threads and Ray CPUs per actor and per sampling task
    batch_size: PositiveInt = 256  # images per Ray Data block and batch
    device: Literal["cpu", "cuda"] = "cpu"  # for sampling and the feature actors (one GPU each with cuda)


@config_dataclass
class EvaluateConfig:
    models: tuple[Location, ...] = ()  # exported model folders and/or sample folders (or URIs); one report column each
    real: Location = "runs/pretrain32/data"  # the real data set: train split = reference set, test split = held out
    out_dir: Location = "runs/pretrain32/report"  # report.md, report.html, metrics.json, PNGs, samples/
    seed: int = 0  # the classifiers' initial weights, batches and augmentation
    sampling: EvalSamplingConfig = dataclasses.field(default_factory=EvalSamplingConfig)
    encoder: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)  # the domain encoder's recipe
    utility: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)  # the utility classifier's recipe
    cache_encoder: bool = True  # keep the domain encoder in REAL/.cache, keyed by dataset.json and recipe
    inception_weights: str = ""  # local InceptionV3 FID weights (torch-fidelity's .pth); empty: space skipped
    prdc_k: PositiveInt = 5  # nearest neighbours of precision/recall/density/coverage (Naeem et al. use 5)
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95  # of the Wilson intervals
    # the simulated pathologist's (1 the reference)
    strictness: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    grid_per_class: PositiveInt = 8  # images per class in each sample grid
    scale: EvalScaleConfig = dataclasses.field(default_factory=EvalScaleConfig)


def evaluate(config: EvaluateConfig) -> str | Path:
    """Evaluate config.models against config.real; returns the report folder (out_dir: a path or a URI)."""
    local = dataclasses.replace(config, models=tuple(map(_local, config.models)), real=_local(config.real))
    if not storage.is_uri(config.out_dir):
        return _evaluate(local)
    with storage.output_dir(config.out_dir) as scratch:
        _evaluate(dataclasses.replace(local, out_dir=str(scratch)))
    return config.out_dir


def _local(location: str) -> str:
    """A URI's folder in the download cache; a path as it is."""
    return str(storage.download_dir(location)) if storage.is_uri(location) else location


def _evaluate(config: EvaluateConfig) -> Path:
    """evaluate() on local folders."""
    # Everything that can be wrong with the inputs fails here, before Ray starts.
    if not config.models:
        raise ValueError("name at least one model: an exported model folder or a sample folder (--models ...)")
    info = read_dataset_info(config.real)
    class_names, size = list(info["class_names"]), int(info["image_size"])
    kinds = [model_kind(path) for path in config.models]
    names = model_names(list(config.models))
    if config.inception_weights:
        check_inception_available(config.inception_weights)
    train, test = read_real_split(config.real, "train", class_names), read_real_split(config.real, "test", class_names)
    if len(train) < 2 or len(test) < 1:
        raise ValueError(f"{config.real} needs >= 2 train and >= 1 test images, has {len(train)} and {len(test)}")
    out_dir = Path(config.out_dir)
    for path, kind in zip(config.models, kinds):
        if kind == MODEL:
            check_noise_held_out(Path(path), class_names, config.sampling, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings, notes, started = {}, [], time.perf_counter()

    init_ray(device=config.scale.device)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # progress is printed per stage instead

    clock = time.perf_counter()
    sets: list[ImageSet] = []
    for path, kind, name in zip(config.models, kinds, names):
        if kind == MODEL:
            scale = config.scale
            folder = sample_model(
                Path(path),
                out_dir / "samples" / name,
                class_names,
                config.sampling,
                scale.threads_per_worker,
                scale.device,
            )
            sets.append(read_sample_folder(folder, name, class_names, kind=MODEL))
            sets[-1].info["model"] = str(path)
        else:
            sets.append(read_sample_folder(path, name, class_names))
    timings["samples_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    encoder_state, encoder_info = domain_encoder(
        config.real, config.encoder, config.seed, train, test, config.cache_encoder
    )
    timings["domain_encoder_s"] = time.perf_counter() - clock
    print(
        f"domain encoder: {'cached' if encoder_info['cached'] else 'trained'}, real test accuracy "
        f"{encoder_info['test_metrics']['accuracy']:.3f} ({timings['domain_encoder_s']:.1f} s)"
    )

    judged = all(name in SPECS for name in class_names)
    if not judged:
        notes.append("simulated pathologist skipped: the data set's classes are not all cell types it knows")
    clock = time.perf_counter()
    outputs = _features_and_verdicts(
        config, encoder_state, encoder_info, size, class_names, [train, test, *sets], judged
    )
    timings["features_and_verdicts_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    spaces = ["domain"] + (["inception"] if config.inception_weights else [])
    if not config.inception_weights:
        notes.append("InceptionV3 space skipped: no inception_weights file given (it is never downloaded)")
    fidelity, diversity = _fidelity_and_diversity(outputs, spaces, [test, *sets], train.name, config.prdc_k, notes)
    timings["fidelity_and_diversity_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    utility = _utility(config, size, class_names, train, test, sets)
    timings["utility_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    plausibility, runs = _plausibility(config, class_names, [test, *sets], outputs, judged, notes)
    timings["plausibility_s"] = time.perf_counter() - clock

    columns = [s.name for s in sets] + [test.name]
    metrics = {
        "config": config_to_dict(config),
        "dataset": {"path": str(config.real), "class_names": class_names, "image_size": size, "counts": info["counts"]},
        "columns": columns,
        "sets": {
            s.name: {
                "kind": s.kind,
                "path": str(s.path),
                "n_images": len(s),
                **s.info,
                "per_class": dict(zip(class_names, np.bincount(s.labels, minlength=len(class_names)).tolist())),
            }
            for s in [*sets, test, train]
        },
        "domain_encoder": {k: v for k, v in encoder_info.items() if k != "state"},
        "fidelity": fidelity,
        "diversity": diversity,
        "utility": utility,
        "plausibility": plausibility,
        "runs": runs,
        "notes": notes,
        "timings": timings,
    }
    clock = time.perf_counter()
    grids = _grids(config, size, class_names, [*sets, test], out_dir)
    report.write_report(metrics, grids, out_dir)
    timings["report_s"] = time.perf_counter() - clock
    timings["total_s"] = time.perf_counter() - started
    report.write_metrics(metrics, out_dir)
    print(f"evaluation done in {timings['total_s']:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return out_dir


# ---------------------------------------------------------------- classifiers (Ray tasks)


@ray.remote
def _train_and_test(
    train: tuple[list[bytes], np.ndarray],
    test: tuple[list[bytes], np.ndarray],
    size: int,
    num_classes: int,
    config: ClassifierConfig,
    seed: int,
    keep_weights: bool,
) -> dict:
    """Train a classifier on `train` (PNG bytes, labels), score it on `test`: {"metrics", "final_loss", "state"?}."""
    import torch

    torch.set_num_threads(config.threads)
    model, losses = train_classifier(decode_images(train[0], size, "train"), train[1], num_classes, config, seed)
    probabilities = predict_proba(model, decode_images(test[0], size, "test"))
    out = {
        "metrics": classification_metrics(test[1], probabilities),
        "confusion": confusion_counts(test[1], probabilities),
        "final_loss": float(np.mean(losses[-10:])),
        "n_train": len(train[0]),
    }
    if keep_weights:
        out["state"] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return out


def domain_encoder(
    real: str | Path, encoder: ClassifierConfig, seed: int, train: ImageSet, test: ImageSet, cache: bool = True
) -> tuple[dict, dict]:
    """(state dict, info) of a data set's domain encoder, the one cache of it that the evaluation and the Tune
    probe share: from REAL/.cache when the key (dataset.json, recipe, seed) matches, else trained on `train`
    and scored on `test` (the real splits) in a Ray task, then cached unless `cache` is False.
    info is the cache record plus "cached": whether it came from the cache."""
    key = encoder_cache_key(real, encoder, seed)
    cached = load_cached_encoder(real, key) if cache else None
    if cached is not None:
        model, info = cached
        return model.state_dict(), {**info, "cached": True}
    dataset = read_dataset_info(real)
    class_names, size = list(dataset["class_names"]), int(dataset["image_size"])
    print(f"domain encoder: training on {len(train)} real images ({encoder.steps} steps)")
    result = ray.get(
        _train_and_test.options(num_cpus=encoder.threads).remote(
            (train.png, train.labels), (test.png, test.labels), size, len(class_names), encoder, seed, True
        )
    )
    info = {
        "key": key,
        "config": config_to_dict(encoder),
        "seed": seed,
        "class_names": class_names,
        "image_size": size,
        "feature_dim": int(encoder.channels[-1]),
        "test_metrics": result["metrics"],
        "final_loss": result["final_loss"],
        "n_train": result["n_train"],
    }
    if cache:
        model = encoder_from_state(tuple(encoder.channels), len(class_names), result["state"])
        if save_encoder(model, info, real) is None:
            print(f"domain encoder: {real} is read-only; not cached")
    return result["state"], {**info, "cached": False}


def _utility(
    config: EvaluateConfig, size: int, class_names: list[str], train: ImageSet, test: ImageSet, sets: list[ImageSet]
) -> dict:
    """{set name: metrics} of a classifier trained on each set, plus "train_on_real"; all tested on real test images.
    Each also holds `confusion` (rows: true class, columns: predicted, in class_names order), which shows the
    classes a model's images teach the classifier to mistake."""
    test_ref = ray.put((test.png, test.labels))
    remote = _train_and_test.options(num_cpus=config.utility.threads)
    jobs = {"train_on_real": train, **{s.name: s for s in sets}}
    pending = {
        remote.remote(
            ray.put((s.png, s.labels)), test_ref, size, len(class_names), config.utility, config.seed, False
        ): name
        for name, s in jobs.items()
    }
    results = {}
    with bar(len(jobs), "utility classifiers", "model") as progress:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            results[name] = ray.get(done[0])
            progress.set_postfix_str(f"{name}: accuracy {results[name]['metrics']['accuracy']:.3f}", refresh=False)
            progress.update()
    return {
        name: {**results[name]["metrics"], "n_train": results[name]["n_train"], "confusion": results[name]["confusion"]}
        for name in jobs
    }


# ---------------------------------------------------------------- features and verdicts (Ray Data)


class _Featurizer:
    """A Ray Data actor: decodes a batch of PNGs, makes its features in every space, judges the rows asked for."""

    def __init__(
        self,
        encoder_state: dict,
        channels: tuple[int, ...],
        num_classes: int,
        size: int,
        inception_weights: str,
        threads: int,
        strictness: float,
    ):
        import torch

        torch.set_num_threads(threads)
        self.encoder = encoder_from_state(channels, num_classes, encoder_state)
        self.inception = load_inception(inception_weights) if inception_weights else None
        self.size, self.strictness = size, strictness

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [f"{s} image {i}" for s, i in zip(batch["set"], batch["index"])]
        images = np.stack([decode_image(data, self.size, name) for data, name in zip(batch["image"], names)])
        outputs = features_and_verdicts(
            images, batch["declared_class"], batch["judge"], self.encoder, self.inception, self.strictness
        )
        return {"set": batch["set"], "index": batch["index"], **outputs}


def _features_and_verdicts(
    config, encoder_state, encoder_info, size, class_names, sets: list[ImageSet], judged: bool
) -> dict:
    """{set name: {"domain": (N, D), "inception"?: (N, 2048), "plausible": (N,), "found_cell": (N,), "failed": (N, 6)}},
    rows in each set's order. Real training images are not judged (nothing reads their verdicts)."""
    import ray.data

    rows = {"set": [], "index": [], "image": [], "declared_class": [], "judge": []}
    for s in sets:
        rows["set"] += [s.name] * len(s)
        rows["index"] += list(range(len(s)))
        rows["image"] += s.png
        rows["declared_class"] += [class_names[label] for label in s.labels]
        rows["judge"] += [judged and s.name != "real_train"] * len(s)
    table = pa.table({**rows, "image": pa.array(rows["image"], pa.binary())})
    step = config.scale.batch_size
    blocks = [table.slice(start, step) for start in range(0, table.num_rows, step)]
    dataset = ray.data.from_arrow(blocks).map_batches(
        _Featurizer,
        fn_constructor_kwargs={
            "encoder_state": encoder_state,
            "channels": tuple(encoder_info["config"]["channels"]),
            "num_classes": len(class_names),
            "size": size,
            "inception_weights": config.inception_weights,
            "threads": config.scale.threads_per_worker,
            "strictness": config.strictness,
        },
        batch_size=step,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.scale.workers),
        num_cpus=config.scale.threads_per_worker,
        num_gpus=int(config.scale.device == "cuda"),
    )
    parts = []
    with bar(table.num_rows, "features and verdicts", "img") as progress:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            parts.append(batch)
            progress.update(len(batch["index"]))
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    out = {}
    for s in sets:
        mine = np.flatnonzero(merged["set"] == s.name)
        mine = mine[np.argsort(merged["index"][mine])]
        out[s.name] = {key: merged[key][mine] for key in merged if key not in ("set", "index")}
    return out


# ---------------------------------------------------------------- metrics on the driver


def _fidelity_and_diversity(outputs, spaces, sets: list[ImageSet], reference: str, k: int, notes: list[str]):
    """Per space and set: {"frechet_distance"} and {precision, recall, density, coverage} against `reference`."""
    fidelity, diversity = {}, {}
    for space in spaces:
        real = outputs[reference][space]
        fidelity[space], diversity[space] = {}, {}
        for s in sets:
            fake = outputs[s.name][space]
            distance, diversity[space][s.name] = fidelity_and_diversity(real, fake, k)
            fidelity[space][s.name] = {"frechet_distance": distance}
            if min(len(real), len(fake)) < k + 2:
                notes.append(f"{space} diversity of {s.name}: NaN, a set has fewer than prdc_k + 2 = {k + 2} images")
    return fidelity, diversity


def _plausibility(config, class_names, sets: list[ImageSet], outputs, judged: bool, notes: list[str]):
    """({"simulated": {set: summary}, "experts": {set: summary}}, {run name: rounds}) ."""
    simulated, experts, runs = {}, {}, {}
    for s in sets:
        if judged:
            o = outputs[s.name]
            simulated[s.name] = summarize_verdicts(
                [class_names[label] for label in s.labels],
                o["plausible"],
                o["failed"],
                o["found_cell"],
                class_names,
                config.confidence,
            )
        if s.kind == REAL:
            continue
        run_dir = run_dir_of(s.info.get("model", s.path))
        feedback = read_feedback(run_dir, s)
        if feedback is not None and feedback[0]:
            experts[s.name] = summarize_consensus(feedback[0], class_names, config.confidence)
        rounds, round_notes = read_rounds(run_dir)
        notes += round_notes
        per_round = plausibility_per_round(feedback[1], config.confidence) if feedback is not None else []
        if rounds or per_round:
            runs.setdefault(run_dir.name, {"run_dir": str(run_dir), "rounds": rounds, "feedback_rounds": per_round})
    return {"simulated": simulated, "experts": experts}, runs


def _grids(config, size, class_names, sets: list[ImageSet], out_dir: Path) -> dict[str, Path]:
    """One contact sheet per set (rows: classes, grid_per_class images each): {set name: PNG path}."""
    grids = {}
    for s in sets:
        chosen = np.concatenate(
            [np.flatnonzero(s.labels == c)[: config.grid_per_class] for c in range(len(class_names))]
        )
        chosen = np.sort(chosen).astype(np.int64)
        images = decode_images([s.png[i] for i in chosen], size, s.name)
        grids[s.name] = contact_sheet(
            images, s.labels[chosen], class_names, out_dir / "grids" / f"{s.name}.png", per_class=config.grid_per_class
        )
    return grids
