"""The pixel-space generator: this project's class-conditional UNet2DModel (pathalign_ray.generator.diffusion).

Sampling and DDPO trajectories delegate to `diffusion.ddim_sample` and `objectives.ddim_trajectories`,
so the same seeds give the same images bit for bit. Model space is pixel space: encode and decode
are the identity (decode clamps to [-1, 1]).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pathalign_ray.generator import lora as _lora
from pathalign_ray.generator.base import UNetGenerator
from pathalign_ray.generator.objectives import ddim_trajectories


class PixelGenerator(UNetGenerator):
    """A UNet2DModel whose class embedding is added to the timestep embedding; images (B, 3, H, W) in [-1, 1]."""

    kind = "pixel"

    def _forward(self, model, latents, timesteps, labels):
        return model(latents, timesteps, class_labels=labels).sample

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (int(self.unet.config.in_channels), self.image_size, self.image_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] are already in model space."""
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)

    def sample(
        self, labels: torch.Tensor, seeds: list[int], num_inference_steps: int, eta: float = 0.0
    ) -> torch.Tensor:
        """`diffusion.ddim_sample`: labels (B,) on the model's device -> images (B, 3, H, W) in [-1, 1]."""
        from pathalign_ray.generator.diffusion import ddim_sample  # heavy: diffusion imports diffusers

        return ddim_sample(self.unet, self.ddim, labels, seeds, num_inference_steps, eta)

    def trajectories(self, labels: torch.Tensor, ddim_steps: int, eta: float, generator: torch.Generator) -> dict:
        """`objectives.ddim_trajectories`: x_T..x_0 (B, 3, H, W) on the CPU, x_0 clamped, and step log-probs (B,)."""
        return ddim_trajectories(self.unet, self.ddim, labels, ddim_steps, eta, generator, self.dtype)

    def save(self, out_dir: str | Path, info: dict | None = None, merged: bool = False) -> Path:
        """`diffusion.export_model`'s folder, with the base weights; plus the adapter file when the UNet holds
        one (merged=True: the adapter folded into the weights instead, a plain model)."""
        from pathalign_ray.generator.diffusion import export_model  # heavy: diffusion imports diffusers

        unet = _lora.plain_copy(self.unet, merged) if self.has_lora else self.unet
        out_dir = export_model(unet, self.ddim, self.class_names, out_dir, self._save_info(info, merged))
        (out_dir / _lora.LORA_WEIGHT_NAME).unlink(missing_ok=True)  # an earlier export's adapter
        if self.has_lora and not merged:
            _lora.save_lora(self.unet, out_dir)
        return out_dir

    @classmethod
    def load(cls, model_dir: str | Path) -> PixelGenerator:
        """What `save` (or `diffusion.export_model`) wrote; the adapter too when the folder holds one."""
        from pathalign_ray.generator.diffusion import load_model  # heavy: diffusion imports diffusers

        unet, ddim, class_names, info = load_model(model_dir)
        generator = cls(unet, ddim, class_names, info)
        if (Path(model_dir) / _lora.LORA_WEIGHT_NAME).is_file():
            _lora.load_lora(unet, model_dir)
        return generator
