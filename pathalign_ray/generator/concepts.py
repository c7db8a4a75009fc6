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
from typing import TypeVar

import torch

from pathalign_ray.generator import load_generator

UNet = TypeVar("UNet", bound=torch.nn.Module)


def extend_class_embedding(unet: UNet, init_rows: Sequence[int]) -> UNet:
    """A copy of `unet` (a UNet2DModel or UNet2DConditionModel with a class embedding table) with one more
    class, whose embedding is the mean of the rows `init_rows`.

    Every existing class keeps its embedding, so the model draws exactly the same images for them.
    """
    if not init_rows:
        raise ValueError("init_rows must name at least one existing class")
    config = dict(unet.config)
    config["num_class_embeds"] = unet.config.num_class_embeds + 1
    extended = type(unet).from_config(config)
    state = unet.state_dict()
    old = state["class_embedding.weight"]
    new_row = old[list(init_rows)].mean(dim=0, keepdim=True)
    state["class_embedding.weight"] = torch.cat([old, new_row])
    extended.load_state_dict(state, strict=True)
    return extended.eval()


def add_class(model_dir: str | Path, new_class: str, out_dir: str | Path, init_from: Sequence[str] = ()) -> Path:
    """Export model_dir (a pixel or latent model, pathalign_ray.generator) with `new_class` appended to its
    classes; its embedding starts as the mean of `init_from`'s (empty: of every class). Returns out_dir."""
    generator = load_generator(model_dir)
    class_names = generator.class_names
    if generator.has_lora:
        raise ValueError(
            f"{model_dir} carries a LoRA adapter: add the class to its merged export (finetune.lora.merged_export)"
        )
    if new_class in class_names:
        raise ValueError(f"{model_dir} already has class {new_class!r}: a new concept must be new")
    unknown = sorted(set(init_from) - set(class_names))
    if unknown:
        raise ValueError(f"init_from class {unknown[0]!r} is not among the model's classes {class_names}")
    rows = [class_names.index(name) for name in init_from] or list(range(len(class_names)))
    generator.set_unet(extend_class_embedding(generator.unet, rows), [*class_names, new_class])
    info = {
        **generator.info,
        "model_id": f"{generator.info.get('model_id', Path(model_dir).name)}+{new_class}",
        "new_class": new_class,
        "new_class_init_from": list(init_from),
    }
    return generator.save(out_dir, info)
