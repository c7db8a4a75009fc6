"""The latent generator: a VAE (AutoencoderKL) around a class-conditional UNet2DConditionModel (Rombach et al. 2022).

A model folder in diffusers layout (what `save` writes and `load` reads):
    vae/        AutoencoderKL: config.json, diffusion_pytorch_model.safetensors
    unet/       UNet2DConditionModel with num_class_embeds = len(class_names) (the declared class is a
                class embedding added to the timestep embedding; no text encoder)
    scheduler/  scheduler_config.json (any DDPM-family config; read as DDIM)
    class_names.json                    the declared classes, in class-embedding order
    pathalign.json                      {"generator": "latent", ...}
    model_index.json                    a StableDiffusionPipeline without text encoder, for plain diffusers
    pytorch_lora_weights.safetensors    a LoRA export only: the adapter, as save_lora_weights writes it
Plain diffusers reads it with `StableDiffusionPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None,
safety_checker=None, feature_extractor=None, image_encoder=None)` and `.load_lora_weights(folder)`, or
`UNet2DConditionModel.from_pretrained(folder, subfolder="unet")` and `.load_lora_adapter(folder, prefix="unet",
weight_name="pytorch_lora_weights.safetensors")`; the pipeline's __call__ needs a prompt, so sample with `sample` here.
Latents: z = (E(x) - shift_factor) * scaling_factor, (B, C, h, w) with h = H / 2^(VAE levels - 1).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from pathalign_ray.generator import ddim as _ddim
from pathalign_ray.generator import lora as _lora
from pathalign_ray.generator.base import UNetGenerator

_PIPELINE_CLASS = "StableDiffusionPipeline"
_ABSENT_COMPONENTS = ("text_encoder", "tokenizer", "safety_checker", "feature_extractor", "image_encoder")


class LatentGenerator(UNetGenerator):
    """vae: AutoencoderKL (frozen); unet: UNet2DConditionModel with a class embedding; ddim: DDIMScheduler."""

    kind = "latent"

    def __init__(self, vae, unet, ddim, class_names: list[str], info: dict | None = None):
        if any("CrossAttn" in block for block in unet.config.down_block_types):
            raise NotImplementedError(
                "this UNet conditions on text through cross-attention: prompts through a text "
                "encoder are not supported yet (#25); give it a class embedding"
            )
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} channels, the VAE makes {vae.config.latent_channels}"
            )
        super().__init__(unet, ddim, class_names, info)
        self.vae = vae.eval().requires_grad_(False)

    def _forward(self, model, latents, timesteps, labels):
        return model(latents, timesteps, encoder_hidden_states=None, class_labels=labels).sample

    def to(self, device: torch.device | str) -> LatentGenerator:
        super().to(device)
        self.vae.to(device)
        return self

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), size, size)

    # ------------------------------------------------------------------ the VAE

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, batch_size: int = 64
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w): the posterior's mean, or a draw from it with
        `generator` (as diffusers' training scripts); in batches of batch_size."""
        vae_dtype = next(self.vae.parameters()).dtype
        parts = []
        for start in range(0, len(images), batch_size):
            posterior = self.vae.encode(images[start : start + batch_size].to(self.vae.device, vae_dtype)).latent_dist
            parts.append(posterior.mode() if generator is None else posterior.sample(generator))
        shift = self.vae.config.shift_factor or 0.0
        return (torch.cat(parts) - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        vae_dtype = next(self.vae.parameters()).dtype
        shift = self.vae.config.shift_factor or 0.0
        parts = []
        for start in range(0, len(latents), batch_size):
            z = (
                latents[start : start + batch_size].to(self.vae.device, vae_dtype) / self.vae.config.scaling_factor
                + shift
            )
            parts.append(self.vae.decode(z).sample.float())
        return torch.cat(parts).clamp(-1, 1)

    def encode_cached(self, images: np.ndarray, cache_dir: str | Path, batch_size: int = 64) -> torch.Tensor:
        """Real images (N, H, W, 3) uint8 -> latents (N, C, h, w), encoded once: the file in cache_dir is named
        after the images' bytes and the VAE's config and weights, so a changed VAE never reads stale latents."""
        from pathalign_ray.generator.diffusion import to_model_input  # heavy: diffusion imports diffusers

        digest = hashlib.sha256(images.tobytes())
        digest.update(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        for value in self.vae.state_dict().values():  # every weight's bytes: about a second for an SD-sized VAE
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        path = Path(cache_dir) / f"latents-{digest.hexdigest()[:20]}.pt"
        if path.is_file():
            return torch.load(path)
        latents = self.encode(to_model_input(images), batch_size=batch_size).cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(latents, partial)
        partial.rename(path)
        return latents

    # ------------------------------------------------------------------ sampling

    def sample(
        self, labels: torch.Tensor, seeds: list[int], num_inference_steps: int, eta: float = 0.0
    ) -> torch.Tensor:
        """DDIM in latent space with one generator per seed (as diffusion.ddim_sample), then decoded.

        labels: (B,) int64 on the model's device. Returns images (B, 3, H, W) in [-1, 1].
        """
        latents = _ddim.ddim_sample_from(
            lambda x, t: self._forward(self.unet, x, t, labels),
            self.ddim,
            self.latent_shape,
            seeds,
            num_inference_steps,
            eta,
            labels.device,
            self.dtype,
        )
        return self.decode(latents)

    def trajectories(self, labels: torch.Tensor, ddim_steps: int, eta: float, generator: torch.Generator) -> dict:
        """DDPO trajectories in latent space (`ddim.ddim_trajectory`); decode(latents[-1]) are the images to score."""
        return _ddim.ddim_trajectory(
            lambda x, t: self._forward(self.unet, x, t, labels),
            self.ddim,
            len(labels),
            self.latent_shape,
            ddim_steps,
            eta,
            generator,
            labels.device,
            self.dtype,
        )

    # ------------------------------------------------------------------ files

    def save(self, out_dir: str | Path, info: dict | None = None, merged: bool = False) -> Path:
        """Write the folder of the module docstring. With an adapter: the base UNet plus the adapter file, or
        (merged=True) the adapter folded into the UNet's weights."""
        from safetensors.torch import save_file

        from pathalign_ray.generator.diffusion import (  # heavy: diffusion imports diffusers
            CLASS_NAMES_FILE,
            MODEL_INFO_FILE,
        )

        out_dir = Path(out_dir)
        self.vae.save_pretrained(out_dir / "vae", safe_serialization=True)
        (out_dir / "unet").mkdir(parents=True, exist_ok=True)
        self.unet.save_config(out_dir / "unet")
        save_file(
            _lora.plain_state_dict(self.unet, merged),
            out_dir / "unet" / "diffusion_pytorch_model.safetensors",
            metadata={"format": "pt"},
        )
        self.ddim.save_pretrained(out_dir / "scheduler")
        (out_dir / "model_index.json").write_text(json.dumps(_model_index(), indent=2))
        (out_dir / CLASS_NAMES_FILE).write_text(json.dumps(self.class_names))
        (out_dir / MODEL_INFO_FILE).write_text(json.dumps(self._save_info(info, merged), indent=2))
        (out_dir / _lora.LORA_WEIGHT_NAME).unlink(missing_ok=True)
        if self.has_lora and not merged:
            _lora.save_lora(self.unet, out_dir)
        return out_dir

    @classmethod
    def load(cls, model_dir: str | Path) -> LatentGenerator:
        """A diffusers folder with vae/, unet/, scheduler/ and class_names.json; its adapter too, if it has one."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        from pathalign_ray.generator.diffusion import (  # heavy: diffusion imports diffusers
            CLASS_NAMES_FILE,
            MODEL_INFO_FILE,
        )

        model_dir = Path(model_dir)
        for needed in ("vae/config.json", "unet/config.json", "scheduler/scheduler_config.json", CLASS_NAMES_FILE):
            if not (model_dir / needed).is_file():
                raise FileNotFoundError(f"{model_dir} is not a latent model folder: {needed} is missing")
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
        ddim = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        class_names = json.loads((model_dir / CLASS_NAMES_FILE).read_text())
        info_path = model_dir / MODEL_INFO_FILE
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        generator = cls(vae, unet, ddim, class_names, info)
        if (model_dir / _lora.LORA_WEIGHT_NAME).is_file():
            _lora.load_lora(unet, model_dir)
        return generator


def _model_index() -> dict:
    """model_index.json of a StableDiffusionPipeline whose text encoder, tokenizer and safety checker are absent."""
    import diffusers

    return {
        "_class_name": _PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        **{name: [None, None] for name in _ABSENT_COMPONENTS},
    }
