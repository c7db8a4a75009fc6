"""The reward model r(x, c): shapes, the class branch, save/load without pickle, its loss, active selection.

Pure: no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from safetensors import safe_open

from pathalign_ray.experts.checklist import CRITERIA
from pathalign_ray.generator.sampling import SampleConfig
from pathalign_ray.reward.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    RewardModel,
    RewardModelConfig,
    load_reward_model,
    save_reward_model,
    score_images,
)
from pathalign_ray.reward.selection import most_uncertain
from pathalign_ray.reward.train import _Heads, reward_loss

CLASSES = ["myeloblast", "lymphocyte", "band_neutrophil"]


def _model(seed: int = 0, **config) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(RewardModelConfig(image_size=16, channels=(8, 16), hidden=16, **config), CLASSES).eval()


def _images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_shapes_and_score_range():
    model = _model()
    images, class_ids = _images(), torch.tensor([0, 1, 2, 0])
    assert model(images, class_ids).shape == (4,)
    assert model.criteria_logits(images, class_ids).shape == (4, len(CRITERIA))
    scores = model.score(images, class_ids)
    assert scores.shape == (4,) and bool(((scores > 0) & (scores < 1)).all())
    assert torch.allclose(scores, torch.sigmoid(model(images, class_ids)))


def test_the_declared_class_changes_the_score():
    model = _model()
    images = _images(1).repeat(len(CLASSES), 1, 1, 1)
    scores = model.score(images, torch.arange(len(CLASSES)))
    assert len(set(scores.tolist())) == len(CLASSES), "the same image scores differently per declared class"


def test_class_ids_and_unknown_class():
    model = _model()
    assert model.class_ids(["lymphocyte", "myeloblast"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="unknown class 'eosinophil'"):
        model.class_ids(["myeloblast", "eosinophil"])


def test_without_criteria_heads():
    model = _model(criteria_heads=False)
    with pytest.raises(ValueError, match="no criteria heads"):
        model.criteria_logits(_images(), torch.zeros(4, dtype=torch.int64))


def test_config_rules():
    with pytest.raises(ValueError, match=r"channels\n\s+Tuple should have at least 1 item"):
        RewardModelConfig(channels=())
    with pytest.raises(ValueError, match="too small"):
        RewardModelConfig(image_size=4, channels=(8, 8, 8))


def test_save_load_round_trip_gives_equal_outputs(tmp_path):
    model = _model(seed=3)
    out = save_reward_model(model, tmp_path / "reward", {"model_id": "m1", "version": 2, "metrics": {"auc": 0.9}})
    loaded, meta = load_reward_model(out)
    assert not loaded.training
    assert meta["model_id"] == "m1" and meta["version"] == 2 and meta["metrics"] == {"auc": 0.9}
    assert meta["class_names"] == CLASSES and loaded.config == model.config
    images, class_ids = _images(), torch.tensor([2, 1, 0, 2])
    assert torch.equal(loaded.score(images, class_ids), model.score(images, class_ids))
    assert torch.equal(loaded.criteria_logits(images, class_ids), model.criteria_logits(images, class_ids))


def test_weights_are_safetensors_not_pickle(tmp_path):
    out = save_reward_model(_model(), tmp_path / "reward", {})
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])
    data = (out / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, then a JSON header
    header = json.loads(data[8 : 8 + header_len])
    assert "encoder.0.weight" in header
    assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4], "not a pickle or a torch zip"
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as weights:
        assert set(weights.keys()) == set(_model().state_dict())
    json.loads((out / CONFIG_FILE).read_text())


def test_load_refuses_a_folder_without_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward.safetensors is missing"):
        load_reward_model(tmp_path)


def _unet_folder(path: Path) -> Path:
    """A small class-conditional UNet2DModel written as diffusers writes one (safetensors)."""
    torch.manual_seed(5)
    unet = UNet2DModel(
        sample_size=16,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        num_class_embeds=3,
    )
    unet.save_pretrained(path)
    return path


def test_backbone_is_the_unets_encoder_half_with_its_weights(tmp_path):
    folder = _unet_folder(tmp_path / "model" / "unet")
    unet = UNet2DModel.from_pretrained(folder)
    for path in (folder, tmp_path / "model"):  # the UNet's own folder, or a model folder holding unet/
        model = RewardModel(RewardModelConfig(image_size=16, hidden=16, backbone=str(path)), CLASSES).eval()
        assert torch.equal(model.encoder.conv_in.weight, unet.conv_in.weight)
        assert torch.equal(model.encoder.mid_block.resnets[0].conv1.weight, unet.mid_block.resnets[0].conv1.weight)
        assert not any(name.startswith("encoder.up_blocks") for name in model.state_dict()), "no decoder half"
        images, class_ids = _images(), torch.tensor([0, 1, 2, 0])
        assert model(images, class_ids).shape == (4,) and model.criteria_logits(images, class_ids).shape == (4, 6)


def test_backbone_model_saves_and_loads_without_the_backbone_folder(tmp_path):
    folder = _unet_folder(tmp_path / "unet")
    model = RewardModel(RewardModelConfig(image_size=16, hidden=16, backbone=str(folder)), CLASSES).eval()
    out = save_reward_model(model, tmp_path / "reward", {"model_id": "b1"})
    for weights in folder.iterdir():
        weights.unlink()
    loaded, meta = load_reward_model(out)
    assert meta["backbone_config"]["block_out_channels"] == [8, 16]
    images, class_ids = _images(), torch.tensor([2, 1, 0, 2])
    assert torch.equal(loaded.score(images, class_ids), model.score(images, class_ids))


def test_a_missing_backbone_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"backbone {tmp_path / 'nowhere'} is not a diffusers UNet2DModel"):
        RewardModel(RewardModelConfig(backbone=str(tmp_path / "nowhere")), CLASSES)


# ---- the objective


def test_mse_loss_by_hand():
    logits = torch.tensor([0.0, 2.0])  # sigmoid: 0.5, 0.8808
    labels = torch.tensor([1.0, 0.0])
    no_criteria = torch.zeros(2, 0)
    loss, parts = reward_loss(logits, no_criteria, labels, torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.bool))
    expected = (0.5**2 + torch.sigmoid(torch.tensor(2.0)).item() ** 2) / 2
    assert float(loss) == pytest.approx(expected) and parts["criteria_loss"] == 0.0
    bce, _ = reward_loss(logits, no_criteria, labels, torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.bool), "bce")
    assert float(bce) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, labels)))
    unknown = torch.zeros(1, 6, dtype=torch.bool)
    soft, _ = reward_loss(torch.zeros(1), torch.zeros(1, 0), torch.tensor([2 / 3]), torch.zeros(1, 6), unknown)
    assert float(soft) == pytest.approx((0.5 - 2 / 3) ** 2), "a consensus label is a soft target"
    with pytest.raises(ValueError, match="mse"):
        reward_loss(logits, no_criteria, labels, torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.bool), "hinge")


def test_criteria_loss_averages_known_entries_only():
    criteria_logits = torch.zeros(2, 6)  # P(fail) = 0.5 everywhere: cross-entropy log 2 per entry
    criteria_logits[1] = 100.0  # confidently "fails" on row 1, which is all unknown
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :3] = True
    loss, parts = reward_loss(
        torch.zeros(2), criteria_logits, torch.full((2,), 0.5), torch.ones(2, 6), mask, "mse", criteria_weight=2.0
    )
    assert parts["criteria_loss"] == pytest.approx(np.log(2))
    assert float(loss) == pytest.approx(0.0 + 2.0 * np.log(2))
    _none_known, parts = reward_loss(
        torch.zeros(1), torch.zeros(1, 6), torch.ones(1), torch.ones(1, 6), torch.zeros(1, 6, dtype=torch.bool)
    )
    assert parts["criteria_loss"] == 0.0


def test_heads_wrapper_gives_the_models_outputs():
    model = _model()
    images, class_ids = _images(), torch.tensor([0, 1, 2, 1])
    logits, criteria = _Heads(model)(images, class_ids)
    assert torch.equal(logits, model(images, class_ids))
    assert torch.equal(criteria, model.criteria_logits(images, class_ids))
    assert _Heads(_model(criteria_heads=False))(images, class_ids)[1].shape == (4, 0)


# ---- active selection
def test_most_uncertain():
    scores = np.array([0.75, 0.5, 0.625, 0.375, 0.25, 0.5625])  # exact in binary: real ties
    # distances .25 0 .125 .125 .25 .0625: ties (2, 3) and (0, 4) keep index order
    assert most_uncertain(scores, 4).tolist() == [1, 5, 2, 3]
    assert most_uncertain(scores, 10).tolist() == [1, 5, 2, 3, 0, 4]
    assert most_uncertain(scores, 0).tolist() == []
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        most_uncertain(scores, -1)


def test_score_images_resizes_and_matches_score():
    model = _model()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    scores = score_images(model, pixels, ["lymphocyte", "myeloblast", "lymphocyte"], batch_size=2)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert scores == pytest.approx(model.score(images, torch.tensor([1, 0, 1])).double().numpy(), abs=1e-6)
    big = np.repeat(np.repeat(pixels, 2, axis=1), 2, axis=2)
    assert score_images(model, big, ["lymphocyte"] * 3).shape == (3,)
    with pytest.raises(ValueError, match="unknown class"):
        score_images(model, pixels, ["eosinophil"] * 3)


def test_sample_config_select_rules():
    assert SampleConfig(select="uncertain", k=4, reward_model="runs/x/reward").k == 4
    with pytest.raises(ValueError, match="needs k >= 1 and a reward_model"):
        SampleConfig(select="uncertain", k=0, reward_model="runs/x/reward")
    with pytest.raises(ValueError, match="needs k >= 1 and a reward_model"):
        SampleConfig(select="uncertain", k=3)
    with pytest.raises(ValueError, match="applies to select=uncertain only"):
        SampleConfig(k=3)


def test_sample_job_accepts_select_and_k_flags():
    from pathalign_ray.config import parse_job_args

    argv = ["--config", "configs/sample.yaml", "--select", "uncertain", "--k=32", "reward_model=r", "n_per_class=2"]
    config = parse_job_args(SampleConfig, argv, "configs/sample.yaml", "jobs/sample.py")
    assert (config.select, config.k, config.reward_model, config.n_per_class) == ("uncertain", 32, "r", 2)
