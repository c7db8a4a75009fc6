"""The evaluation end to end: sanity checks in the domain encoder's space, the cache, the job's flags, and a
CI-sized report on a real local Ray cluster for the tiny pretrained model, its sample folder and real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pathalign_ray.evaluation.classifier import ClassifierConfig, extract_features, train_classifier
from pathalign_ray.evaluation.metrics import frechet_distance_of, precision_recall_density_coverage
from pathalign_ray.experts.checklist import CRITERIA

TINY_CLASSIFIER = ["steps=30", "batch_size=16", "channels=[8,16]"]


@pytest.fixture(scope="module")
def encoder_and_real():
    """A domain encoder trained on one procedural set, and a second, independent set of the same 4 types."""
    from pathalign_ray.data import procedural

    classes = procedural.DEFAULT_CELL_TYPES[:4]
    train = procedural.generate(16, 16, seed=0, classes=classes)
    real = procedural.generate(100, 16, seed=1, classes=classes)
    model, _ = train_classifier(train.images, train.labels, 4, ClassifierConfig(steps=60, batch_size=32), seed=0)
    return model, real


def test_fid_of_two_real_halves_is_near_zero_and_far_below_noise(encoder_and_real):
    model, real = encoder_and_real
    order = np.random.default_rng(0).permutation(len(real))  # both halves hold every class
    first, second = real.images[order[:200]], real.images[order[200:]]
    noise = np.random.default_rng(1).integers(0, 256, size=first.shape, dtype=np.uint8)
    halves = frechet_distance_of(extract_features(model, first), extract_features(model, second))
    against_noise = frechet_distance_of(extract_features(model, first), extract_features(model, noise))
    assert halves < 0.05 * against_noise, (halves, against_noise)


def test_prdc_of_a_real_set_against_itself_is_one(encoder_and_real):
    model, real = encoder_and_real
    features = extract_features(model, real.images)
    values = precision_recall_density_coverage(features, features, k=5)
    assert (values["precision"], values["recall"], values["coverage"]) == (1.0, 1.0, 1.0)
    assert values["density"] == pytest.approx(1.0, abs=0.02)  # exactly 1 but for tied distances


def test_training_is_deterministic_per_seed(encoder_and_real):
    _, real = encoder_and_real
    config = ClassifierConfig(steps=5, batch_size=16)
    a, losses_a = train_classifier(real.images, real.labels, 4, config, seed=3)
    b, losses_b = train_classifier(real.images, real.labels, 4, config, seed=3)
    c, _ = train_classifier(real.images, real.labels, 4, config, seed=4)
    assert losses_a == losses_b
    assert all(np.array_equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not np.array_equal(a.head.weight.detach(), c.head.weight.detach())


def test_encoder_cache_round_trip_and_key(tiny_dataset, tmp_path):
    from pathalign_ray.data.shards import read_dataset
    from pathalign_ray.evaluation.features import encoder_cache_key, load_cached_encoder, save_encoder

    dataset = tmp_path / "data"
    shutil.copytree(tiny_dataset, dataset)
    train = read_dataset(dataset, "train")
    config = ClassifierConfig(steps=2, batch_size=8, channels=(8, 16))
    model, _ = train_classifier(train.images, train.labels, 4, config, seed=0)
    key = encoder_cache_key(dataset, config, 0)
    assert key != encoder_cache_key(dataset, config, 1)
    assert key != encoder_cache_key(dataset, ClassifierConfig(steps=3, batch_size=8, channels=(8, 16)), 0)
    assert load_cached_encoder(dataset, key) is None
    info = {"key": key, "config": {"channels": [8, 16]}, "class_names": list(train.class_names)}
    assert save_encoder(model, info, dataset) == dataset / ".cache"
    loaded, _loaded_info = load_cached_encoder(dataset, key)
    assert np.array_equal(extract_features(loaded, train.images), extract_features(model, train.images))
    assert load_cached_encoder(dataset, "another key") is None


def test_rounds_table_is_read_and_bad_lines_skipped(tmp_path):
    from pathalign_ray.evaluation.sources import read_rounds

    assert read_rounds(tmp_path) == ([], [])
    (tmp_path / "rounds.jsonl").write_text(
        '{"round": 1, "plausibility": 0.5, "reward_mean": 0.4}\n\n{"round": 0, "plausibility": 0.3}\n'
        'not json\n{"round": "x"}\n'
    )
    rows, notes = read_rounds(tmp_path)
    assert [row["round"] for row in rows] == [0, 1] and len(notes) == 2 and "rounds.jsonl:4" in notes[0]


def test_model_names_are_short_and_unique():
    from pathalign_ray.evaluation.sources import model_names

    names = model_names(["runs/a/model", "runs/a/samples/round1", "x/real_test", "y/real_test", "runs/b/model"])
    assert names == ["a", "a-round1", "real_test-2", "real_test-3", "b"]


def test_samples_of_a_model_exported_again_are_not_reused(tmp_path):
    import os

    from pathalign_ray.evaluation.samples import written_after

    model, manifest = tmp_path / "round0-model", tmp_path / "manifest.parquet"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "weights.safetensors").write_bytes(b"old")
    manifest.write_bytes(b"samples")
    os.utime(model / "unet" / "weights.safetensors", (1000, 1000))
    os.utime(manifest, (2000, 2000))
    assert written_after(manifest, model)
    os.utime(model / "unet" / "weights.safetensors", (3000, 3000))  # finetuned and exported again, same name and step
    assert not written_after(manifest, model)


def test_job_flags_become_overrides():
    from pathalign_ray.config import parse_job_args
    from pathalign_ray.evaluation.evaluate import EvaluateConfig

    argv = ["--models", "runs/a/model", "runs/b", "prdc_k=3", "--real", "runs/x/data", "seed=1"]
    config = parse_job_args(EvaluateConfig, argv, "configs/evaluate.yaml", "jobs/evaluate.py")
    assert (config.models, config.real, config.prdc_k, config.seed) == (("runs/a/model", "runs/b"), "runs/x/data", 3, 1)
    config = parse_job_args(EvaluateConfig, ["--models=a", "--real=b"], "configs/evaluate.yaml", "jobs/evaluate.py")
    assert (config.models, config.real) == (("a",), "b")


def test_inputs_are_checked_before_ray_starts(tiny_dataset, tmp_path):
    from pathalign_ray.evaluation.evaluate import EvaluateConfig, evaluate
    from pathalign_ray.evaluation.features import check_inception_available

    with pytest.raises(ValueError, match="at least one model"):
        evaluate(EvaluateConfig(real=str(tiny_dataset), out_dir=str(tmp_path / "r")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(
            EvaluateConfig(models=(str(tmp_path / "nothing"),), real=str(tiny_dataset), out_dir=str(tmp_path / "r"))
        )
    with pytest.raises(ValueError, match="neither an exported model"):
        evaluate(EvaluateConfig(models=(str(tmp_path),), real=str(tiny_dataset), out_dir=str(tmp_path / "r")))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        check_inception_available(str(tmp_path / "inception.pth"))


def _real_as_samples(dataset: Path, out: Path) -> Path:
    """A sample folder whose images are the data set's training split, in order, declared as their true class."""
    from pathalign_ray.data.shards import read_dataset
    from pathalign_ray.images import encode_png

    train = read_dataset(dataset, "train")
    (out / "images").mkdir(parents=True)
    rows = []
    for i, (image, label) in enumerate(zip(train.images, train.labels)):
        rows.append(
            {
                "sample_id": f"real-{i:04d}",
                "declared_class": train.class_names[label],
                "seed": i,
                "model_id": "real",
                "model_step": 0,
                "path": f"images/real-{i:04d}.png",
                "ddim_steps": 0,
                "eta": 0.0,
            }
        )
        (out / rows[-1]["path"]).write_bytes(encode_png(image))
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    return out


@pytest.mark.ray
def test_report_for_the_tiny_model_its_samples_and_real_images(
    ray_cluster, tiny_dataset, tiny_pretrained, tiny_samples, tmp_path
):
    from pathalign_ray.config import load_config
    from pathalign_ray.evaluation.evaluate import EvaluateConfig, evaluate
    from pathalign_ray.experts.simulated_feedback import SimulateFeedbackConfig, simulate_feedback

    _, _, model_dir = tiny_pretrained
    dataset = tmp_path / "data"  # a copy: the encoder cache is written beside it
    shutil.copytree(tiny_dataset, dataset)
    run = tmp_path / "run"  # the sample folder in a run of its own, with expert verdicts and a round table
    shutil.copytree(tiny_samples, run / "samples" / "pretrained")
    simulate_feedback(SimulateFeedbackConfig(run_dir=str(run), experts=3))
    (run / "rounds.jsonl").write_text(
        '{"round": 0, "plausibility": 0.1, "reward_mean": 0.2}\n{"round": 1, "plausibility": 0.3, "reward_mean": 0.5}\n'
    )
    real_samples = _real_as_samples(dataset, tmp_path / "realcopy")

    overrides = [
        f"models=[{model_dir}, {run / 'samples' / 'pretrained'}, {real_samples}]",
        f"real={dataset}",
        f"out_dir={tmp_path / 'report'}",
        "sampling.n_per_class=3",
        "sampling.ddim_steps=2",
        "prdc_k=2",
        "grid_per_class=4",
        "scale.batch_size=16",
        *[f"encoder.{o}" for o in TINY_CLASSIFIER],
        *[f"utility.{o}" for o in TINY_CLASSIFIER],
    ]
    out = evaluate(load_config(EvaluateConfig, "configs/evaluate.yaml", overrides))

    metrics = json.loads(
        (out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json")
    )
    names = [model_dir.parent.name, "run-pretrained", "realcopy"]
    assert metrics["columns"] == [*names, "real_test"]
    for section in (
        "fidelity",
        "diversity",
        "utility",
        "plausibility",
        "domain_encoder",
        "runs",
        "timings",
        "sets",
        "notes",
    ):
        assert section in metrics
    assert set(metrics["utility"]) == {*names, "train_on_real"}
    assert metrics["sets"][names[0]]["n_images"] == 12 and (out / "samples" / names[0] / "manifest.parquet").is_file()
    assert {"precision", "recall", "density", "coverage"} <= set(metrics["diversity"]["domain"][names[0]])
    assert set(metrics["plausibility"]["simulated"]) == {*names, "real_test"}
    assert set(metrics["plausibility"]["experts"]) == {"run-pretrained"}  # the only images experts judged
    assert metrics["plausibility"]["experts"]["run-pretrained"]["samples"] == 12
    assert [r["round"] for r in metrics["runs"]["run"]["rounds"]] == [0, 1]
    assert any("InceptionV3 space skipped" in note for note in metrics["notes"])
    assert (
        metrics["domain_encoder"]["cached"] is False and (dataset / ".cache" / "domain_encoder.safetensors").is_file()
    )

    # Sanity: the real training images evaluated as if synthetic are the reference set itself.
    assert metrics["utility"]["realcopy"] == {**metrics["utility"]["train_on_real"]}
    assert metrics["fidelity"]["domain"]["realcopy"]["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["diversity"]["domain"]["realcopy"] == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}, abs=0.05
    )

    # The PNGs decode, with the shapes their layout gives: a grid row per class of 16 px images at 4x.
    for name in [*names, "real_test"]:
        grid = np.asarray(Image.open(out / "grids" / f"{name}.png"))
        assert grid.shape[0] == 4 * (64 + 2) + 2 and grid.shape[1] > 4 * (64 + 2) and grid.shape[2] == 3
    assert Image.open(out / "failed_criteria.png").size == (1280, 400)  # 6 criteria x 4 columns: 12.8 x 4 in at 100 dpi
    assert Image.open(out / "plausibility_per_class.png").size[1] == 400
    assert Image.open(out / "rounds.png").size == (1000, 360)
    report = (out / "report.md").read_text()
    for title in (
        "## Fidelity",
        "## Diversity",
        "## Utility",
        "## Plausibility: simulated pathologist",
        "## Plausibility: experts",
    ):
        assert title in report
    classes = json.loads((dataset / "dataset.json").read_text())["class_names"]
    for row in [*(f"| plausible: {name} |" for name in classes), *(f"| fails {c} |" for c in CRITERIA)]:
        assert report.count(row) == 2, row  # in the simulated pathologist's section and the experts'
    assert f"grids/{names[0]}.png" in report and "<table>" in (out / "report.html").read_text()
