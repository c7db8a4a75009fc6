"""Full finetuning against LoRA on the same latent model: peak memory and step time, in one script.

    .venv/bin/python bench/lora_memory.py [--size sd15|medium|tiny] [--device cuda|cpu] [--dtype bf16|fp32]
        [--batch 4] [--steps 10] [--rank 8]

The model is built from a config with random weights (no download): `sd15` is a Stable-Diffusion-1.5-sized
UNet (channels 320/640/1280/1280, two layers a level, 64 x 64 x 4 latents of 512 px images) with a class
embedding in place of the text encoder's cross-attention; `medium` and `tiny` are smaller ones for a CPU.
Each mode runs in its own process so its peak is its own: on CUDA torch.cuda.max_memory_allocated, on
the CPU the process's peak resident set. A step is what finetune_worker's RWL step does to the weights:
the per-sample noise-prediction loss on a batch of latents (generator.loss_per_sample), backward, AdamW
over the trainable parameters (every UNet weight, or the adapter's only). The reference model the ratio
clip needs is counted too: a frozen copy for full finetuning (generator.keep_reference), the adapter
disabled for LoRA (nothing more).

Writes bench/results/lora_memory.json (per mode: trainable parameters, peak GiB, seconds a step; the
LoRA/full ratios).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from bench_common import write_result

from pathalign_ray.generator.lora import LoraSettings
from pathalign_ray.generator.tiny import TinyLatentConfig, build_tiny_latent

SIZES = {  # decoded image side, VAE levels (latent side = image / 2^(levels - 1)), UNet channels, layers a level
    "sd15": TinyLatentConfig(image_size=512, vae_channels=(32, 32, 32, 32), unet_channels=(320, 640, 1280, 1280),
                             layers_per_block=2, norm_num_groups=32, attention_head_dim=8),
    "medium": TinyLatentConfig(image_size=256, vae_channels=(32, 32, 32, 32), unet_channels=(128, 256, 512, 512),
                               layers_per_block=2, norm_num_groups=32, attention_head_dim=8),
    "tiny": TinyLatentConfig(),
}  # fmt: skip
CLASSES = [f"class{i}" for i in range(8)]
WARMUP_STEPS = 2  # allocator and kernel choice settle before the timed steps


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Build the model, make `mode` trainable, take WARMUP_STEPS + args.steps steps; peak memory and seconds a step."""
    device, dtype = torch.device(args.device), {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    generator = build_tiny_latent(SIZES[args.size], CLASSES, seed=0)
    generator.unet.to(dtype)
    if mode == "lora":
        generator.add_lora(LoraSettings(rank=args.rank, alpha=float(args.rank)))
    else:
        generator.keep_reference()
    generator.to(device)
    parameters = generator.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    channels, side, _ = generator.latent_shape
    rng = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(WARMUP_STEPS + args.steps):
        latents = torch.randn(args.batch, channels, side, side, generator=rng).to(device, dtype)
        noise = torch.randn(latents.shape, generator=rng).to(device, dtype)
        timesteps = torch.randint(0, 1000, (args.batch,), generator=rng).to(device)
        labels = torch.randint(0, len(CLASSES), (args.batch,), generator=rng).to(device)
        started = time.perf_counter()
        with torch.no_grad():  # the ratio clip's reference losses, as finetune_worker computes them
            generator.loss_per_sample(latents, labels, noise, timesteps, reference=True)
        loss = generator.loss_per_sample(latents, labels, noise, timesteps).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "latent_shape": list(generator.latent_shape),
        "trainable_parameters": sum(p.numel() for p in parameters),
        "unet_parameters": sum(p.numel() for p in generator.unet.parameters()),
        "peak_gib": peak / 2**30,
        "step_s": sum(times) / len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="sd15" if torch.cuda.is_available() else "medium")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return
    flags = [arg for arg in sys.argv[1:] if not arg.startswith("--mode")]
    modes = {}
    for mode in ("full", "lora"):
        out = subprocess.run(
            [sys.executable, __file__, *flags, "--mode", mode], check=True, capture_output=True, text=True
        )
        modes[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[bench] {mode}: {modes[mode]}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    write_result("lora_memory", {
        "size": args.size, "device": device_name, "dtype": args.dtype, "batch": args.batch, "steps": args.steps,
        "rank": args.rank, "modes": modes,
        "peak_ratio_lora_over_full": modes["lora"]["peak_gib"] / modes["full"]["peak_gib"],
        "step_time_ratio_lora_over_full": modes["lora"]["step_s"] / modes["full"]["step_s"],
    })  # fmt: skip


if __name__ == "__main__":
    main()
