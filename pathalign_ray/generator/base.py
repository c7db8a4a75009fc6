"""The generator interface the feedback loop talks to, and what both implementations share.

A generator denoises in its model space: pixels (B, 3, H, W) in [-1, 1] for `PixelGenerator`, VAE
latents (B, C, h, w) for `LatentGenerator`. `encode` maps images in [-1, 1] into that space (for
the noise-prediction loss on real images), `decode` maps it back; everything outside the generator
(reward model, endpoint, pathologists, store, evaluation) sees decoded images only.

Reference model: with a LoRA adapter, the same UNet with the adapter disabled; without one, a frozen
copy made by `keep_reference()` (full finetuning, as finetune.py does today).
DeepSpeed: set `generator.denoiser = engine` so that training forwards run through the engine;
sampling and the reference call `generator.unet` (the engine's module) or the engine alike.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from pathalign_ray.generator import ddim as _ddim
from pathalign_ray.generator import lora as _lora

GENERATOR_KINDS = ("pixel", "latent")


@runtime_checkable
class Generator(Protocol):
    """What the RWL and DDPO objectives, sampling and export need from a diffusion model."""

    class_names: list[str]
    unet: torch.nn.Module  # what an optimizer or a DeepSpeed engine wraps
    denoiser: torch.nn.Module  # what training forwards call: the unet, or the engine around it
    ddim: object  # DDIMScheduler: sampling and DDPO's steps
    noise_scheduler: object  # DDPMScheduler of the same schedule: q(x_t | x_0) for the loss

    @property
    def image_size(self) -> int: ...
    @property
    def latent_shape(self) -> tuple[int, int, int]: ...
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
    def sample(
        self, labels: torch.Tensor, seeds: list[int], num_inference_steps: int, eta: float = 0.0
    ) -> torch.Tensor: ...
    def sample_uint8(
        self, labels: torch.Tensor, seeds: list[int], num_inference_steps: int, eta: float = 0.0
    ) -> np.ndarray: ...
    def trajectories(self, labels: torch.Tensor, ddim_steps: int, eta: float, generator: torch.Generator) -> dict: ...
    def step_log_prob(
        self, latents, prev_latents, timestep: int, prev_timestep: int, labels, eta: float, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def denoise(self, noisy, timesteps, labels, reference: bool = False) -> torch.Tensor: ...
    def predict_noise(
        self, latents, labels, noise, timesteps, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def loss_per_sample(self, latents, labels, noise, timesteps, reference: bool = False) -> torch.Tensor: ...
    def add_lora(self, settings: _lora.LoraSettings) -> None: ...
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...
    def save(self, out_dir: str | Path, info: dict | None = None, merged: bool = False) -> Path: ...


class UNetGenerator:
    """The objectives' side of a generator, shared by both kinds; subclasses give `_forward`, encode/decode,
    sample, trajectories and save."""

    kind = ""

    def __init__(self, unet: torch.nn.Module, ddim, class_names: list[str], info: dict | None = None):
        from diffusers import DDPMScheduler

        self.ddim = ddim
        self.noise_scheduler = DDPMScheduler.from_config(ddim.config)
        self.info = dict(info or {})
        self.set_unet(unet, class_names)

    def set_unet(self, unet: torch.nn.Module, class_names: list[str]) -> None:
        """The UNet (embedding one class per name) this generator draws with and trains; concepts.add_class
        swaps in one with a class more. A reference copy kept before is dropped."""
        if getattr(unet.config, "num_class_embeds", None) != len(class_names):
            raise ValueError(
                f"the UNet embeds {unet.config.num_class_embeds} classes, but {len(class_names)} class names were given"
            )
        self.unet = unet
        self.denoiser = unet
        self.class_names = list(class_names)
        self._reference: torch.nn.Module | None = None

    # ------------------------------------------------------------------ the model

    def _forward(self, model, latents: torch.Tensor, timesteps, labels: torch.Tensor) -> torch.Tensor:
        """The raw model output (B, C, h, w) of `model` (the UNet or an engine around it)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def to(self, device: torch.device | str) -> UNetGenerator:
        self.unet.to(device)
        if self._reference is not None:
            self._reference.to(device)
        return self

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The pretrained model, to call inside the block: the adapter disabled, or the frozen copy."""
        if _lora.has_lora(self.unet):
            with torch.no_grad(), _lora.adapters_disabled(self.unet):
                yield self.denoiser
        elif self._reference is not None:
            with torch.no_grad():
                yield self._reference
        else:
            raise RuntimeError("no reference model: add a LoRA adapter, or call keep_reference() before training")

    def keep_reference(self) -> None:
        """Full finetuning: keep a frozen copy of the current weights as the reference (a second copy in memory)."""
        if _lora.has_lora(self.unet):
            return  # the adapter disabled is the reference
        self._reference = copy.deepcopy(self.unet).eval().requires_grad_(False)

    def add_lora(self, settings: _lora.LoraSettings) -> None:
        """Freeze the UNet and add a LoRA adapter; only the adapter trains from now on."""
        if _lora.has_lora(self.unet):
            raise ValueError("the UNet already holds a LoRA adapter")
        _lora.add_lora(self.unet, _lora.lora_config(settings, self.unet))
        self._reference = None

    @property
    def has_lora(self) -> bool:
        return _lora.has_lora(self.unet)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return _lora.trainable_parameters(self.unet)

    # ------------------------------------------------------------------ the objectives' quantities

    def denoise(self, noisy, timesteps, labels, reference: bool = False) -> torch.Tensor:
        """The model's output on x_t (B, C, h, w) at timesteps (B,) or an int, labels (B,): the policy's (through
        `denoiser`, with gradient), or the reference's (no gradient). Drift penalties compare the two."""
        if reference:
            with self.reference() as model:
                return self._forward(model, noisy, timesteps, labels)
        return self._forward(self.denoiser, noisy, timesteps, labels)

    def predict_noise(
        self, latents, labels, noise, timesteps, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = q(x_t | x_0 = latents, noise) and the model's output on it, both (B, C, h, w).

        latents, noise: (B, C, h, w) in model space; labels, timesteps: (B,) int64.
        """
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        return noisy, self.denoise(noisy, timesteps, labels, reference)

    def loss_target(self, latents, noise, timesteps) -> torch.Tensor:
        """What the model learns to output: the noise (epsilon), or v = sqrt(a) eps - sqrt(1 - a) x_0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"prediction_type {self.prediction_type!r} is not supported: use epsilon or v_prediction")

    def loss_per_sample(self, latents, labels, noise, timesteps, reference: bool = False) -> torch.Tensor:
        """L_diff per sample (Ho et al. 2020, eq. 14) in model space, (B,) float32; the mean over the batch is
        diffusers' training loss (train_text_to_image.py) on the same latents, noise and timesteps."""
        from pathalign_ray.generator.diffusion import noise_prediction_loss  # heavy: diffusion imports diffusers

        _, predicted = self.predict_noise(latents, labels, noise, timesteps, reference)
        return noise_prediction_loss(predicted, self.loss_target(latents, noise, timesteps))

    def step_log_prob(
        self, latents, prev_latents, timestep: int, prev_timestep: int, labels, eta: float, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDPO: the log-probability (B,) of the step latents -> prev_latents (both (B, C, h, w)) under the
        policy (with gradient) or the reference, and the model output (B, C, h, w)."""
        return _ddim.step_log_prob(
            lambda x, t: self.denoise(x, t, labels, reference),
            self.ddim,
            latents,
            prev_latents,
            timestep,
            prev_timestep,
            eta,
        )

    def sample_uint8(
        self, labels: torch.Tensor, seeds: list[int], num_inference_steps: int, eta: float = 0.0
    ) -> np.ndarray:
        """`sample` as (B, H, W, 3) uint8, what the reward model, the endpoint and the store take."""
        from pathalign_ray.generator.diffusion import to_uint8  # heavy: diffusion imports diffusers

        return to_uint8(self.sample(labels, seeds, num_inference_steps, eta))

    def _save_info(self, info: dict | None, merged: bool) -> dict:
        lora = _lora.adapter_config(self.unet) if self.has_lora else None
        return {
            **self.info,
            **(info or {}),
            "generator": self.kind,
            "lora": None if merged or lora is None else {"file": _lora.LORA_WEIGHT_NAME, **lora},
            "lora_merged": bool(merged and lora is not None),
        }


def load_generator(model_dir: str | Path):
    """A PixelGenerator or LatentGenerator from an exported folder (a vae/ subfolder means latent)."""
    model_dir = Path(model_dir)
    from pathalign_ray.generator.diffusion import MODEL_INFO_FILE  # heavy: diffusion imports diffusers

    info_path = model_dir / MODEL_INFO_FILE
    kind = json.loads(info_path.read_text()).get("generator") if info_path.is_file() else None
    kind = kind or ("latent" if (model_dir / "vae").is_dir() else "pixel")
    if kind == "latent":
        from pathalign_ray.generator.latent import LatentGenerator  # cycle: latent imports base

        return LatentGenerator.load(model_dir)
    from pathalign_ray.generator.pixel import PixelGenerator  # cycle: pixel imports base

    return PixelGenerator.load(model_dir)
