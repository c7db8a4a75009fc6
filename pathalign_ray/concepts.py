"""A new clinical concept from feedback alone (the paper's Algorithm 4).

The pretrained model never saw the concept: no image of it, no class id for it. `add_class` gives
the exported model one more row in its class embedding, started from the classes the concept is
closest to (a band neutrophil between a metamyelocyte and a segmented neutrophil, say). From then
on the concept is an ordinary declared class: the align loop samples it, experts judge its samples
against what the concept should look like, the reward model learns their verdicts, and finetuning
teaches the model the concept, with no real image of it anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DModel

from pathalign_ray.diffusion import export_model, load_model


def extend_class_embedding(unet: UNet2DModel, init_rows: Sequence[int]) -> UNet2DModel:
    """A copy of `unet` with one more class, whose embedding is the mean of the rows `init_rows`.

    Every existing class keeps its embedding, so the model draws exactly the same images for them.
    """
    if not init_rows:
        raise ValueError("init_rows must name at least one existing class")
    config = dict(unet.config)
    config["num_class_embeds"] = unet.config.num_class_embeds + 1
    extended = UNet2DModel.from_config(config)
    state = unet.state_dict()
    old = state["class_embedding.weight"]
    new_row = old[list(init_rows)].mean(dim=0, keepdim=True)
    state["class_embedding.weight"] = torch.cat([old, new_row])
    extended.load_state_dict(state, strict=True)
    return extended.eval()


def add_class(model_dir: str | Path, new_class: str, out_dir: str | Path, init_from: Sequence[str] = ()) -> Path:
    """Export model_dir with `new_class` appended to its classes; its embedding starts as the mean of
    `init_from`'s (empty: of every class). Returns out_dir."""
    unet, scheduler, class_names, info = load_model(model_dir)
    if new_class in class_names:
        raise ValueError(f"{model_dir} already has class {new_class!r}: a new concept must be new")
    unknown = sorted(set(init_from) - set(class_names))
    if unknown:
        raise ValueError(f"init_from class {unknown[0]!r} is not among the model's classes {class_names}")
    rows = [class_names.index(name) for name in init_from] or list(range(len(class_names)))
    extended = extend_class_embedding(unet, rows)
    info = {
        **info,
        "model_id": f"{info.get('model_id', Path(model_dir).name)}+{new_class}",
        "new_class": new_class,
        "new_class_init_from": list(init_from),
    }
    return export_model(extended, scheduler, [*class_names, new_class], out_dir, info)
