"""The class-conditional pixel-space diffusion model: a diffusers UNet2DModel, DDPM training, DDIM sampling.

Pure torch + diffusers: no Ray, no DeepSpeed. Images are (B, 3, H, W) float in [-1, 1] inside the
model and (B, H, W, 3) uint8 outside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

from pathalign_ray.config import config_dataclass

CLASS_NAMES_FILE = "class_names.json"
MODEL_INFO_FILE = "pathalign.json"


@config_dataclass
class ModelConfig:
    sample_size: int = 32  # image side in pixels; must match the data set
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # channels per UNet resolution level
    layers_per_block: int = 1  # ResNet blocks per level
    attention: bool = False  # self-attention at the lowest resolution (slower on CPU)
    norm_num_groups: int = 8  # GroupNorm groups; must divide every channel count
    num_train_timesteps: int = 1000  # DDPM steps the noise schedule is defined over
    # squaredcos_cap_v2: the cosine schedule (Nichol & Dhariwal 2021), as improved-diffusion
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"

    def __post_init__(self) -> None:
        if self.sample_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(
                f"sample_size {self.sample_size} must be divisible by 2^{len(self.block_out_channels) - 1} "
                f"for {len(self.block_out_channels)} resolution levels"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels entry")


def build_unet(config: ModelConfig, num_classes: int) -> UNet2DModel:
    """A UNet whose class embedding is added to the timestep embedding (as improved-diffusion)."""
    levels = len(config.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if config.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=config.sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=config.norm_num_groups,
        num_class_embeds=num_classes,
    )


def build_noise_scheduler(config: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def diffusion_loss_per_sample(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """L_diff per sample: mean squared error of the predicted noise (Ho et al. 2020, eq. 14).

    images, noise: (B, 3, H, W); labels, timesteps: (B,) int64. Returns (B,) float32.
    """
    _, predicted = predict_noise(unet, scheduler, images, labels, noise, timesteps)
    return noise_prediction_loss(predicted, noise)


def predict_noise(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised images x_t and the model's prediction of their noise, both (B, 3, H, W)."""
    noisy = scheduler.add_noise(images, noise, timesteps)
    return noisy, unet(noisy, timesteps, class_labels=labels).sample


def noise_prediction_loss(predicted: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of a noise prediction, (B,) float32."""
    return F.mse_loss(predicted.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))


def draw_noise_and_timesteps(
    batch: int, sample_shape: tuple[int, ...], num_train_timesteps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise (B, *sample_shape), e.g. (B, 3, H, W) pixels or (B, C, h, w) latents, and uniform
    timesteps (B,) from one generator."""
    noise = torch.randn(batch, *sample_shape, generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    return noise, timesteps


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends on the keys only (e.g. base seed, class, index), never on batching."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


# Every purpose that draws noise has its own seed space, so that the noise an evaluation draws can
# never be the noise a feedback pool was drawn from, a finetuning check looked at or a Tune probe
# ranked trials by: judging a model on the trajectories its reward pulled it towards flatters it.
# The ids are part of every seed: never renumber them.
SEED_NAMESPACES = {
    "sample": 1,  # jobs/sample.py
    "pool": 2,  # the samples of a feedback round, which experts judge and finetuning weights
    "evaluation": 3,  # jobs/evaluate.py: held-out noise
    "check": 4,  # finetuning's own fresh-sample check
    "probe": 5,  # a Tune trial's score
    "train": 6,  # training noise, timesteps and batches (DDPO's trajectories too)
}
SeedNamespace = Literal["sample", "pool", "evaluation", "check", "probe", "train"]


def namespaced_seed(namespace: str, base: int, *keys: int) -> int:
    """derive_seed inside one purpose's seed space: the same base and keys in two namespaces give unrelated seeds."""
    if namespace not in SEED_NAMESPACES:
        raise ValueError(f"unknown seed namespace {namespace!r}; known: {', '.join(SEED_NAMESPACES)}")
    return derive_seed(SEED_NAMESPACES[namespace], base, *keys)


@torch.no_grad()
def ddim_sample(
    unet: UNet2DModel,
    scheduler: DDIMScheduler,
    labels: torch.Tensor,
    seeds: list[int],
    num_inference_steps: int,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021) with one generator per sample, so a seed fixes its image.

    labels: (B,) int64. Returns (B, 3, H, W) float in [-1, 1].
    """
    size = unet.config.sample_size
    dtype = next(unet.parameters()).dtype
    device = labels.device
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    images = torch.stack([torch.randn(3, size, size, generator=g) for g in generators]).to(device, dtype)
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        noise_prediction = unet(images, t, class_labels=labels).sample
        variance_noise = None
        if eta > 0:
            variance_noise = torch.stack([torch.randn(3, size, size, generator=g) for g in generators]).to(
                device, dtype
            )
        images = scheduler.step(noise_prediction, t, images, eta=eta, variance_noise=variance_noise).prev_sample
    return images.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    scaled = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def export_model(
    unet: UNet2DModel, scheduler: DDIMScheduler, class_names: list[str], out_dir: str | Path, info: dict
) -> Path:
    """Write a diffusers pipeline folder (unet/, scheduler/, model_index.json) plus class names.

    The result loads without this package: `UNet2DModel.from_pretrained(out_dir, subfolder="unet")`.
    """
    out_dir = Path(out_dir)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    (out_dir / CLASS_NAMES_FILE).write_text(json.dumps(list(class_names)))
    (out_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2))
    return out_dir


def load_model(model_dir: str | Path) -> tuple[UNet2DModel, DDIMScheduler, list[str], dict]:
    """Load what `export_model` wrote: (unet in eval mode, DDIM scheduler, class names, info)."""
    model_dir = Path(model_dir)
    for needed in ("unet/config.json", "scheduler/scheduler_config.json", CLASS_NAMES_FILE):
        if not (model_dir / needed).is_file():
            raise FileNotFoundError(f"{model_dir} is not an exported model: {needed} is missing")
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    class_names = json.loads((model_dir / CLASS_NAMES_FILE).read_text())
    info_path = model_dir / MODEL_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return unet, scheduler, class_names, info
