"""Generators the feedback loop aligns: pixel-space and latent diffusion models, optionally with LoRA adapters.

Only re-exports, each imported on first use, so `import pathalign_ray.generators` stays light:
    Generator, UNetGenerator, load_generator   generators.base
    PixelGenerator                             generators.pixel
    LatentGenerator                            generators.latent
    LoraSettings                               generators.lora
    TinyLatentConfig, build_tiny_latent, ...   generators.tiny
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Generator": "base",
    "UNetGenerator": "base",
    "load_generator": "base",
    "PixelGenerator": "pixel",
    "LatentGenerator": "latent",
    "LoraSettings": "lora",
    "TinyLatentConfig": "tiny",
    "TinyTrainConfig": "tiny",
    "build_tiny_latent": "tiny",
    "train_tiny_latent": "tiny",
    "make_tiny_latent_model": "tiny",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
