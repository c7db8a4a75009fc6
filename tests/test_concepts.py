"""A new concept: a data set whose labels hide it in its parent, one more class embedding row with the old
classes untouched (pure), and the loop teaching it (Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_ALIGN_OVERRIDES

from pathalign_ray.data import procedural
from pathalign_ray.data.labeled import merge_classes
from pathalign_ray.generator.concepts import add_class, extend_class_embedding
from pathalign_ray.generator.diffusion import ddim_sample, export_model, load_model

# the tiny model's 4 classes, with band neutrophils drawn among the metamyelocytes under their label
MERGED = (*procedural.DEFAULT_CELL_TYPES[:4], "band_neutrophil")


def test_a_merged_concept_stays_in_the_images_and_leaves_the_labels():
    drawn = procedural.generate(3, 16, seed=0, classes=MERGED)
    merged = merge_classes(drawn, {"band_neutrophil": "metamyelocyte"})
    assert merged.class_names == procedural.DEFAULT_CELL_TYPES[:4]
    np.testing.assert_array_equal(merged.images, drawn.images)
    parent = merged.class_names.index("metamyelocyte")
    assert [f["cell_type"] for f, label in zip(merged.features, merged.labels) if label == parent] == (
        ["metamyelocyte"] * 3 + ["band_neutrophil"] * 3
    )
    assert merge_classes(drawn, {}).class_names == MERGED
    with pytest.raises(ValueError, match="merge: 'eosinophil' is not a class"):
        merge_classes(drawn, {"eosinophil": "myelocyte"})
    with pytest.raises(ValueError, match="the parent of 'band_neutrophil', 'eosinophil', must be a class"):
        merge_classes(drawn, {"band_neutrophil": "eosinophil"})


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

    base = export_model(
        unet, DDIMScheduler(num_train_timesteps=100), ["a", "b", "c"], tmp_path / "base", {"model_id": "m"}
    )
    out = add_class(base, "d", tmp_path / "with-d", init_from=["b"])
    extended, _, class_names, info = load_model(out)
    assert class_names == ["a", "b", "c", "d"] and info["new_class"] == "d" and info["model_id"] == "m+d"
    torch.testing.assert_close(extended.class_embedding.weight[3], unet.class_embedding.weight[1])
    with pytest.raises(ValueError, match="already has class 'b'"):
        add_class(base, "b", tmp_path / "x")
    with pytest.raises(ValueError, match="init_from class 'z' is not among"):
        add_class(base, "e", tmp_path / "y", init_from=["z"])


@pytest.mark.ray
def test_one_round_of_the_loop_teaches_a_concept_its_data_drew_under_the_parents_label(tiny_pretrained, tmp_path):
    """Algorithm 4: the real images hold band neutrophils labelled metamyelocyte; the model gets a band class,
    the loop samples it and its parent, the experts judge it, the reward model knows it, finetuning moves it."""
    from pathalign_ray.align import AlignConfig, align
    from pathalign_ray.config import load_config
    from pathalign_ray.data.make import MakeDatasetConfig, make_dataset
    from pathalign_ray.generator.sampling import read_manifest
    from pathalign_ray.reward.model import load_reward_model

    _, _, model_dir = tiny_pretrained
    data = make_dataset(MakeDatasetConfig(out_dir=str(tmp_path / "data"), image_size=16, n_per_class=8, classes=MERGED,
                                          merge={"band_neutrophil": "metamyelocyte"}, test_fraction=0.25))  # fmt: skip
    add_class(model_dir, "band_neutrophil", tmp_path / "run" / "model", init_from=["metamyelocyte"])
    config = load_config(
        AlignConfig,
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "rounds=1",
            "sample.n_per_class=3",
            "sample.ddim_steps=2",
            "sample.classes=[band_neutrophil, metamyelocyte]",
            "simulate.experts=2",
            f"reward.data.dataset={data}",
            "reward.data.concept_parents={band_neutrophil: metamyelocyte}",
            *TINY_ALIGN_OVERRIDES,
        ],
    )
    rows = align(config)
    assert len(rows) == 1 and rows[0]["labels"] == 12
    pool = read_manifest(tmp_path / "run" / "rounds/0/samples").to_pylist()
    assert sorted({row["declared_class"] for row in pool}) == ["band_neutrophil", "metamyelocyte"]
    reward, _ = load_reward_model(tmp_path / "run" / "reward")
    assert reward.class_names[-1] == "band_neutrophil"
    finetuned, _, class_names, _ = load_model(tmp_path / "run" / "round0-model")
    assert class_names[-1] == "band_neutrophil"
    base, _, _, _ = load_model(tmp_path / "run" / "model")
    assert not torch.equal(finetuned.class_embedding.weight[-1], base.class_embedding.weight[-1])
    assert np.isfinite(rows[0]["plausibility"])
