"""The reward model: an image encoder and a class branch, concatenated, then a small MLP head.

As the paper's authors: r_phi(x, c) takes the image AND the declared class, so the same image can
be plausible as one cell type and implausible as another. Optional heads predict each checklist
criterion's failure where the feedback names them. The encoder is a small CNN trained from scratch,
or (`backbone`) the down path and mid block of a pretrained diffusers UNet2DModel read from a local
folder, such as the generator's own. Saved as safetensors plus a JSON config (the backbone's
architecture included, so a saved model loads without the backbone's folder): loading never
unpickles anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from diffusers import UNet2DModel
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from pathalign_ray import storage
from pathalign_ray.config import Location, config_dataclass, config_to_dict
from pathalign_ray.experts.checklist import CRITERIA
from pathalign_ray.images import normalise_array, to_model_range

WEIGHTS_FILE = "reward.safetensors"
CONFIG_FILE = "reward.json"


@config_dataclass
class RewardModelConfig:
    image_size: int = 32  # input side in pixels; other sizes are resized by the caller
    # conv channels per stage, each halving the side
    channels: Annotated[tuple[int, ...], Field(min_length=1)] = (32, 64, 128)
    class_embedding: int = 32  # width of the learned declared-class embedding
    hidden: int = 128  # MLP head width
    dropout: float = 0.1
    criteria_heads: bool = True  # also predict which checklist criteria fail
    backbone: Location = ""  # "": the CNN above; else a diffusers UNet2DModel folder or URI (or a model's unet/)

    def __post_init__(self) -> None:
        if self.image_size < 2 ** len(self.channels):
            raise ValueError(f"image_size {self.image_size} is too small for {len(self.channels)} stages")


class UNetEncoder(nn.Module):
    """A UNet2DModel's conv_in, down blocks and mid block, globally average-pooled: (B, C) features.

    Conditioned on timestep 0 (a clean image) and, where the UNet is class-conditional, on the mean
    of its class embeddings: the reward model's own class branch carries the declared class, and it
    may know classes the generator does not.
    """

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        if any(hasattr(block, "skip_conv") for block in unet.down_blocks):
            raise ValueError("a backbone UNet with skip down blocks is not supported")
        if unet.class_embedding is not None and not isinstance(unet.class_embedding, nn.Embedding):
            raise ValueError(f"backbone class_embed_type {unet.config.class_embed_type!r} is not supported")
        self.time_proj, self.time_embedding = unet.time_proj, unet.time_embedding
        self.class_embedding = unet.class_embedding
        self.conv_in, self.down_blocks, self.mid_block = unet.conv_in, unet.down_blocks, unet.mid_block
        self.out_channels = unet.config.block_out_channels[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        timesteps = torch.zeros(len(images), dtype=torch.long, device=images.device)
        emb = self.time_embedding(self.time_proj(timesteps).to(images.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding.weight.mean(0)
        sample = self.conv_in(images)
        for block in self.down_blocks:
            sample, _ = block(hidden_states=sample, temb=emb)
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)
        return sample.mean((2, 3))


def backbone_folder(path: str | Path) -> Path:
    """The local folder holding the backbone UNet's config.json: `path` itself, or a model folder's unet/
    (a URI is downloaded once per node)."""
    local = storage.download_dir(path) if storage.exists(path) else None
    for folder in (local, local / "unet") if local else ():
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"backbone {path} is not a diffusers UNet2DModel folder: no config.json or unet/config.json"
    )


def read_backbone(path: str | Path) -> UNet2DModel:
    """The UNet2DModel in a diffusers folder (its own, or a model folder's unet/), from safetensors."""
    return UNet2DModel.from_pretrained(backbone_folder(path), use_safetensors=True)


def _cnn(channels: tuple[int, ...]) -> nn.Sequential:
    layers, in_channels = [], 3
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(min(8, out_channels), out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, stride=2),
            nn.SiLU(),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class RewardModel(nn.Module):
    """forward(images (B, 3, H, W) in [-1, 1], class_ids (B,)) -> (B,) logits of P(plausible).

    `criteria_logits` gives (B, 6) logits of P(criterion fails), in CRITERIA order. With
    `config.backbone`, `backbone_config` (a UNet2DModel config) builds the backbone's architecture
    without reading its folder, as when loading saved weights; without it the folder is read.
    """

    def __init__(self, config: RewardModelConfig, class_names: list[str], backbone_config: dict | None = None):
        super().__init__()
        self.config = config
        self.class_names = list(class_names)
        self.backbone_config = None
        if config.backbone:
            unet = UNet2DModel.from_config(backbone_config) if backbone_config else read_backbone(config.backbone)
            self.backbone_config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
            self.encoder = UNetEncoder(unet)
            in_channels = self.encoder.out_channels
        else:
            self.encoder = _cnn(config.channels)
            in_channels = config.channels[-1]
        self.class_branch = nn.Embedding(len(class_names), config.class_embedding)
        self.trunk = nn.Sequential(
            nn.Linear(in_channels + config.class_embedding, config.hidden),
            nn.SiLU(),
            nn.Dropout(config.dropout),
        )
        self.plausible_head = nn.Linear(config.hidden, 1)
        self.criteria_head = nn.Linear(config.hidden, len(CRITERIA)) if config.criteria_heads else None

    def features(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self.trunk(torch.cat([self.encoder(images), self.class_branch(class_ids)], dim=1))

    def forward(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self.plausible_head(self.features(images, class_ids)).squeeze(1)

    def criteria_logits(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        if self.criteria_head is None:
            raise ValueError("this reward model has no criteria heads")
        return self.criteria_head(self.features(images, class_ids))

    @torch.no_grad()
    def score(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """(B,) P(plausible) in [0, 1], in eval mode."""
        return torch.sigmoid(self(images, class_ids))

    def class_ids(self, class_names: list[str]) -> torch.Tensor:
        """Declared class names -> (B,) int64; an unknown name is a ValueError that names it."""
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = [name for name in class_names if name not in index]
        if unknown:
            raise ValueError(f"unknown class {unknown[0]!r}; the reward model knows {', '.join(self.class_names)}")
        return torch.tensor([index[name] for name in class_names], dtype=torch.int64)


@torch.no_grad()
def score_images(
    model: RewardModel, images: np.ndarray, declared_classes: Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """P(plausible) of (N, H, W, 3) uint8 images as their declared classes: (N,) float64.

    The one in-process scorer (the finetuning's reward function, uncertainty selection). Images of another
    size than model.config.image_size are resized as every image entering the project is (normalise_array).
    """
    if len(images) != len(declared_classes):
        raise ValueError(f"{len(images)} images but {len(declared_classes)} declared classes")
    size = model.config.image_size
    if len(images) and images.shape[1] != size:
        images = np.stack([normalise_array(image, size) for image in images])
    class_ids = model.class_ids(list(declared_classes))
    model.eval()
    scores = [
        model.score(torch.from_numpy(to_model_range(images[i : i + batch_size])), class_ids[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(scores).double().numpy() if scores else np.zeros(0)


def save_reward_model(model: RewardModel, out_dir: str | Path, info: dict) -> Path:
    """Write reward.safetensors and reward.json (config, class names, and `info`: id, version, metrics)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))
    meta = {"config": config_to_dict(model.config), "class_names": model.class_names, **info}
    if model.backbone_config is not None:
        meta["backbone_config"] = model.backbone_config
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def reward_model_folder(model_dir: str | Path) -> Path:
    """The local folder of a reward model (a URI is downloaded once per node) if it holds what save_reward_model
    writes; else a FileNotFoundError naming what is missing."""
    local = storage.download_dir(model_dir)
    for needed in (WEIGHTS_FILE, CONFIG_FILE):
        if not (local / needed).is_file():
            raise FileNotFoundError(f"{model_dir} is not a reward model: {needed} is missing")
    return local


def load_reward_model(model_dir: str | Path) -> tuple[RewardModel, dict]:
    """Load what save_reward_model wrote, in eval mode: (model, metadata)."""
    model_dir = reward_model_folder(model_dir)
    meta = json.loads((model_dir / CONFIG_FILE).read_text())
    model = RewardModel(RewardModelConfig(**meta["config"]), meta["class_names"], meta.get("backbone_config"))
    model.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
    return model.eval(), meta
