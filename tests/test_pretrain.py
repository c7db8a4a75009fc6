"""Integration: pretraining on a real local Ray cluster with 2 Ray Train workers and DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pathalign_ray.generator.sampling import SampleConfig, read_manifest, sample

pytestmark = pytest.mark.ray


def test_checkpoints_and_resume_continue_the_step_count(tiny_pretrained):
    run_dir, first_history, model_dir = tiny_pretrained
    assert [row["step"] for row in first_history] == [1, 2, 3]
    history = [json.loads(line) for line in (run_dir / "pretrain_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5]
    assert history[:3] == first_history
    assert all(row["loss"] > 0 and row["images_per_s"] > 0 for row in history)
    assert json.loads((model_dir / "pathalign.json").read_text())["step"] == 5
    checkpoints = sorted(p.name for p in (run_dir / "pretrain").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2, checkpoints


def test_export_loads_with_plain_diffusers(tiny_pretrained):
    model_dir = tiny_pretrained[2]
    script = (
        "import sys, json, torch\n"
        "from diffusers import UNet2DModel, DDIMScheduler\n"
        "assert 'pathalign_ray' not in sys.modules\n"
        f"unet = UNet2DModel.from_pretrained({str(model_dir)!r}, subfolder='unet')\n"
        f"DDIMScheduler.from_pretrained({str(model_dir)!r}, subfolder='scheduler')\n"
        "out = unet(torch.zeros(1, 3, 16, 16), 1, class_labels=torch.tensor([3])).sample\n"
        "print(tuple(out.shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3, 16, 16)"


def test_sampling_writes_manifest_and_is_reproducible(tiny_pretrained, tmp_path):
    model_dir = tiny_pretrained[2]
    base = {"model": str(model_dir), "n_per_class": 2, "ddim_steps": 3, "batch_size": 3, "seed": 7}
    first = sample(SampleConfig(**base, out_dir=str(tmp_path / "a")))
    second = sample(SampleConfig(**{**base, "batch_size": 8}, out_dir=str(tmp_path / "b"), classes=("myeloblast",)))
    manifest = read_manifest(first).to_pylist()
    assert len(manifest) == 8
    assert {row["declared_class"] for row in manifest} == {"myeloblast", "promyelocyte", "myelocyte", "metamyelocyte"}
    assert all((first / row["path"]).is_file() and row["model_step"] == 5 for row in manifest)
    assert (first / "contact_sheet.png").is_file()
    again = read_manifest(second).to_pylist()
    assert len(again) == 2
    for row in again:
        assert (second / row["path"]).read_bytes() == (first / row["path"]).read_bytes()


def test_sampling_refuses_to_overwrite_and_unknown_classes(tiny_pretrained, tmp_path):
    model_dir = tiny_pretrained[2]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already holds samples"):
        sample(SampleConfig(model=str(model_dir), out_dir=str(tmp_path / "taken")))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="unknown class 'basophil'"):
        sample(SampleConfig(model=str(model_dir), out_dir=str(tmp_path / "new"), classes=("basophil",)))


@pytest.mark.parametrize("max_in_memory_bytes", [2**20, 0], ids=["in_memory", "streamed"])
def test_training_batches_mix_classes_and_reshuffle_each_epoch(ray_cluster, max_in_memory_bytes):
    """Data sets are stored sorted by class: unshuffled, every batch of 8 would hold a single class."""
    import functools
    import itertools

    import ray.data

    from pathalign_ray.training import cycle_batches

    cycle = functools.partial(cycle_batches, max_in_memory_bytes=max_in_memory_bytes)
    dataset = ray.data.from_items([{"label": i // 16} for i in range(64)]).materialize()
    batches = [b["label"].tolist() for b in itertools.islice(cycle(dataset.iterator(), 8, seed=3), 16)]
    first_epoch, second_epoch = batches[:8], batches[8:]
    assert (
        sorted(itertools.chain(*first_epoch)) == sorted(itertools.chain(*second_epoch)) == [i // 16 for i in range(64)]
    )
    assert sum(len(set(b)) > 1 for b in first_epoch) >= 6
    assert first_epoch != second_epoch
    again = [b["label"].tolist() for b in itertools.islice(cycle(dataset.iterator(), 8, seed=3), 8)]
    assert again == first_epoch


def test_ema_weights_swap_in_and_restore_even_on_error():
    import torch

    from pathalign_ray.training import ema_weights, init_ema

    module = torch.nn.Linear(3, 2)
    trained = {name: p.detach().clone() for name, p in module.named_parameters()}
    ema = {name: torch.full_like(p, 0.5) for name, p in init_ema(module).items()}
    with ema_weights(module, ema) as swapped:
        assert torch.equal(swapped(torch.ones(1, 3)), torch.full((1, 2), 2.0))
    assert all(torch.equal(p, trained[name]) for name, p in module.named_parameters())
    with pytest.raises(RuntimeError), ema_weights(module, ema):
        raise RuntimeError("sampling failed")
    assert all(torch.equal(p, trained[name]) for name, p in module.named_parameters())
