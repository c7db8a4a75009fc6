"""The generator and the steps that train, run and change it: the paper's pretraining, sampling and finetuning.

The interface the feedback loop talks to (base: Generator, load_generator) and its two implementations:
pixel (this project's class-conditional UNet, diffusion) and latent (a VAE around a conditional UNet; tiny
builds a small one), optionally with LoRA adapters (lora); ddim samples and records DDPO trajectories in
either space. The steps: pretrain (Ray Train + DeepSpeed), sampling (a model into a folder of PNGs, over
Ray tasks), finetune and finetune_worker (the reward-weighted finetuning, driver and worker), objectives
(its losses, as pure functions) and concepts (a new class from feedback alone, the paper's Algorithm 4).

Only re-exports, each imported on first use, so `import pathalign_ray.generator` stays light:
    Generator, UNetGenerator, load_generator   generator.base
    PixelGenerator                             generator.pixel
    LatentGenerator                            generator.latent
    LoraSettings                               generator.lora
    TinyLatentConfig, build_tiny_latent, ...   generator.tiny
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
