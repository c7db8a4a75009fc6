"""A tiny latent diffusion model built from configs (no downloads), and a short trainer on procedural cells.

For tests and benchmarks of the latent path: an AutoencoderKL of a few thousand parameters per level and a
class-conditional UNet2DConditionModel with self-attention at its lowest resolution (where the LoRA
adapter goes, as on Stable Diffusion's attention projections). The trainer fits the VAE first, sets the
latents' scaling factor to 1 / their standard deviation (as Stable Diffusion's 0.18215 was chosen),
encodes the images once, then trains the UNet on the cached latents.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from pathalign_ray.config import config_dataclass
from pathalign_ray.data import procedural
from pathalign_ray.generator.latent import LatentGenerator


@config_dataclass
class TinyLatentConfig:
    image_size: int = 32  # px, the decoded image side
    vae_channels: tuple[int, ...] = (16, 32, 32)  # VAE channels per level; H / latent side = 2^(levels - 1)
    latent_channels: int = 4  # as Stable Diffusion's VAE
    unet_channels: tuple[int, ...] = (32, 64)  # UNet channels per level; self-attention on the last
    layers_per_block: int = 1
    norm_num_groups: int = 8  # must divide every channel count
    attention_head_dim: int = 8  # channels per attention head
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # Stable Diffusion's schedule (betas 0.00085..0.012)
    prediction_type: str = "epsilon"  # or v_prediction (Stable Diffusion 2)

    def __post_init__(self) -> None:
        scale = 2 ** (len(self.vae_channels) - 1)
        if self.image_size % scale or (self.image_size // scale) % 2 ** (len(self.unet_channels) - 1):
            raise ValueError(
                f"image_size {self.image_size} must divide down through {len(self.vae_channels)} VAE "
                f"and {len(self.unet_channels)} UNet levels"
            )
        if any(c % self.norm_num_groups for c in (*self.vae_channels, *self.unet_channels)):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every channel count")


@config_dataclass
class TinyTrainConfig:
    vae_steps: int = 200  # optimizer steps on the VAE (reconstruction + KL)
    unet_steps: int = 300  # optimizer steps on the UNet, on the cached latents
    batch_size: int = 16  # images per step
    vae_lr: float = 1e-3  # AdamW
    unet_lr: float = 1e-3  # AdamW; tiny models take large steps
    kl_weight: float = 1e-4  # weight of KL(q(z|x) || N(0, I)) in the VAE loss, small as in Stable Diffusion's VAE
    seed: int = 0  # batches, posterior draws, noise and timesteps


def build_tiny_latent(config: TinyLatentConfig, class_names: list[str], seed: int = 0) -> LatentGenerator:
    """A randomly initialised (seeded) latent generator of `config`'s size, on the CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=config.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.vae_channels),
        layers_per_block=1,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.image_size,
        scaling_factor=1.0,
    )
    down = ["DownBlock2D"] * len(config.unet_channels)
    up = ["UpBlock2D"] * len(config.unet_channels)
    down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    unet = UNet2DConditionModel(
        sample_size=config.image_size // 2 ** (levels - 1),
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=tuple(config.unet_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2D",
        norm_num_groups=config.norm_num_groups,
        attention_head_dim=config.attention_head_dim,
        cross_attention_dim=config.unet_channels[-1],
        num_class_embeds=len(class_names),
    )
    ddim = DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=config.prediction_type,
    )
    return LatentGenerator(
        vae, unet, ddim, class_names, {"model_id": "tiny-latent", "config": dataclasses.asdict(config)}
    )


def train_tiny_latent(
    generator: LatentGenerator, images: np.ndarray, labels: np.ndarray, config: TinyTrainConfig
) -> dict[str, list[float]]:
    """Fit the VAE, set its scaling factor, then the UNet on the encoded images, in place.

    images: (N, H, W, 3) uint8; labels: (N,) int64. Returns the loss per step of each stage.
    """
    from pathalign_ray.generator.diffusion import to_model_input  # heavy: diffusion imports diffusers

    rng = torch.Generator().manual_seed(config.seed)
    pixels = to_model_input(images)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    history = {"vae_loss": _train_vae(generator.vae, pixels, config, rng)}

    generator.vae.register_to_config(scaling_factor=1.0, shift_factor=None)
    latents = generator.encode(pixels)
    scaling_factor = float(1.0 / latents.std())
    generator.vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor  # the cache: encoded once

    unet = generator.unet.train()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=config.unet_lr)
    history["unet_loss"] = []
    for _ in range(config.unet_steps):
        index = torch.randint(0, len(latents), (config.batch_size,), generator=rng)
        noise = torch.randn(latents[index].shape, generator=rng)
        timesteps = torch.randint(0, generator.noise_scheduler.config.num_train_timesteps, (len(index),), generator=rng)
        loss = generator.loss_per_sample(latents[index], labels[index], noise, timesteps).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["unet_loss"].append(loss.item())
    unet.eval()
    return history


def _train_vae(vae, pixels: torch.Tensor, config: TinyTrainConfig, rng: torch.Generator) -> list[float]:
    """Reconstruction MSE + kl_weight * KL on random batches of pixels (N, 3, H, W) in [-1, 1]; leaves the VAE frozen."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    losses = []
    for _ in range(config.vae_steps):
        batch = pixels[torch.randint(0, len(pixels), (config.batch_size,), generator=rng)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(rng)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return losses


def make_tiny_latent_model(
    out_dir: str | Path,
    n_per_class: int = 16,
    classes: tuple[str, ...] | None = None,
    model: TinyLatentConfig | None = None,
    train: TinyTrainConfig | None = None,
) -> Path:
    """Procedural cells -> a trained tiny latent model folder at out_dir (LatentGenerator.load reads it)."""
    model = model or TinyLatentConfig()
    train = train or TinyTrainConfig()
    data = procedural.generate(
        n_per_class, model.image_size, seed=train.seed, classes=classes or procedural.DEFAULT_CELL_TYPES
    )
    generator = build_tiny_latent(model, list(data.class_names), seed=train.seed)
    history = train_tiny_latent(generator, data.images, data.labels, train)
    final = {key: float(np.mean(values[-20:])) for key, values in history.items() if values}
    return generator.save(out_dir, {"train": dataclasses.asdict(train), "final_losses": final})
