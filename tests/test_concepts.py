"""A new concept: one more class embedding row, the old classes untouched (pure), and the loop teaching it (Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_ALIGN_OVERRIDES

from pathalign_ray.concepts import add_class, extend_class_embedding
from pathalign_ray.diffusion import ddim_sample, export_model, load_model

def test_the_new_row_is_the_mean_of_its_init_classes_and_old_classes_draw_the_same_images(unet):
    from diffusers import DDIMScheduler

    extended = extend_class_embedding(unet, [0, 2])
    old, new = unet.class_embedding.weight, extended.class_embedding.weight
    assert new.shape == (4, old.shape[1]) and extended.config.num_class_embeds == 4
    torch.testing.assert_close(new[:3], old)
    torch.testing.assert_close(new[3], (old[0] + old[2]) / 2)
    scheduler = DDIMScheduler(num_train_timesteps=100)
    labels = torch.tensor([0, 1, 2])
    before = ddim_sample(unet, scheduler, labels, [1, 2, 3], 3)
    after = ddim_sample(extended, scheduler, labels, [1, 2, 3], 3)
    torch.testing.assert_close(after, before)


def test_add_class_exports_a_model_with_the_concept_last(unet, tmp_path):
    from diffusers import DDIMScheduler

    base = export_model(unet, DDIMScheduler(num_train_timesteps=100), ["a", "b", "c"], tmp_path / "base", {"model_id": "m"})
    out = add_class(base, "d", tmp_path / "with-d", init_from=["b"])
    extended, _, class_names, info = load_model(out)
    assert class_names == ["a", "b", "c", "d"] and info["new_class"] == "d" and info["model_id"] == "m+d"
    torch.testing.assert_close(extended.class_embedding.weight[3], unet.class_embedding.weight[1])
    with pytest.raises(ValueError, match="already has class 'b'"):
        add_class(base, "b", tmp_path / "x")
    with pytest.raises(ValueError, match="init_from class 'z' is not among"):
        add_class(base, "e", tmp_path / "y", init_from=["z"])


@pytest.mark.ray
def test_one_round_of_the_loop_finetunes_a_new_class_with_no_real_image(tiny_pretrained, tiny_dataset, tmp_path):
    """The loop samples the concept, judges it, trains a reward model that knows it, and finetunes on it."""
    from pathalign_ray.align import AlignConfig, align
    from pathalign_ray.config import load_config
    from pathalign_ray.reward.model import load_reward_model

    _, _, model_dir = tiny_pretrained
    add_class(model_dir, "eosinophil", tmp_path / "model", init_from=["myelocyte"])
    config = load_config(
        AlignConfig,
        None,
        [
            f"run_dir={tmp_path}", "rounds=1", "sample.n_per_class=6", "sample.ddim_steps=2", "sample.classes=[eosinophil]",
            "simulate.experts=2", f"reward.data.dataset={tiny_dataset}", *TINY_ALIGN_OVERRIDES,
        ],
    )
    rows = align(config)
    assert len(rows) == 1 and rows[0]["labels"] == 12
    reward, _ = load_reward_model(tmp_path / "reward")
    assert reward.class_names[-1] == "eosinophil"
    finetuned, _, class_names, _ = load_model(tmp_path / "round0-model")
    assert class_names[-1] == "eosinophil"
    base, _, _, _ = load_model(tmp_path / "model")
    assert not torch.equal(finetuned.class_embedding.weight[-1], base.class_embedding.weight[-1])
    assert np.isfinite(rows[0]["plausibility"])
