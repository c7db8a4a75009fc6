"""DDIM sampling and DDPO trajectories in any model space (pixels or VAE latents), as pure torch.

`denoise(x_t, t)` is the model with its condition bound: (B, C, h, w) and an int timestep in, the
model's raw output (B, C, h, w) out. These functions follow `diffusion.ddim_sample` and
`objectives.ddim_trajectories` draw for draw (the same seeds and generator give the same noise), and
add what a latent model needs: no clamp of x_t, clipping of the predicted x_0 as the scheduler's
config says, and v-prediction (converted to the epsilon `ddim_step_with_log_prob` takes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pathalign_ray.generator.objectives import ddim_step_with_log_prob

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]


def seeded_noise(seeds: list[int], shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T (B, C, h, w) float32 on the CPU, one generator per seed (as ddim_sample), and those generators."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return torch.stack([torch.randn(*shape, generator=g) for g in generators]), generators


def clip_range(scheduler) -> float | None:
    """The range the scheduler clips its predicted x_0 to, or None (latent models do not clip)."""
    return float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None


def to_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, timestep: int, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise prediction of a model trained for `prediction_type` (B, C, h, w).

    v-prediction (Salimans & Ho 2022, eq. 31): v = sqrt(a) eps - sqrt(1 - a) x_0, so
    eps = sqrt(a) v + sqrt(1 - a) x_t, with a = alpha_cumprod[t].
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        alpha = alphas_cumprod[timestep].to(sample.device, sample.dtype)
        return alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not supported: use epsilon or v_prediction")


@torch.no_grad()
def ddim_sample_from(
    denoise: Denoiser,
    scheduler,
    shape: tuple[int, int, int],
    seeds: list[int],
    num_inference_steps: int,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) with one generator per sample, as `diffusion.ddim_sample` draws it.

    shape: (C, h, w) of one x_T. Returns x_0 (B, C, h, w), unclamped: clamp pixels, decode latents.
    """
    sample, generators = seeded_noise(seeds, shape)
    sample = sample.to(device, dtype)
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        model_output = denoise(sample, t)
        variance_noise = None
        if eta > 0:
            variance_noise = torch.stack([torch.randn(*shape, generator=g) for g in generators]).to(device, dtype)
        sample = scheduler.step(model_output, t, sample, eta=eta, variance_noise=variance_noise).prev_sample
    return sample


@torch.no_grad()
def ddim_trajectory(
    denoise: Denoiser,
    ddim,
    batch: int,
    shape: tuple[int, int, int],
    ddim_steps: int,
    eta: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """A batch of DDIM trajectories x_T..x_0 with each stochastic step's log-probability, for DDPO.

    As `objectives.ddim_trajectories`: noise from `generator` on the CPU, x_T (batch, *shape) first;
    the last step (onto alpha = 1, no variance) is deterministic and carries no log-probability.
    Returns {"latents": [(B, C, h, w)] * (ddim_steps + 1) on the CPU, unclamped,
    "log_probs": [(B,)] * (ddim_steps - 1), "timesteps": [(t, t_prev)] * (ddim_steps - 1)}.
    """
    ddim.set_timesteps(ddim_steps)
    stride = ddim.config.num_train_timesteps // ddim_steps
    alphas_cumprod, final_alpha = ddim.alphas_cumprod.to(device), ddim.final_alpha_cumprod.to(device)
    latents = [torch.randn(batch, *shape, generator=generator)]
    log_probs, timesteps = [], []
    for t in ddim.timesteps.tolist():
        sample = latents[-1].to(device, dtype)
        model_output = denoise(sample, t).float()
        if t - stride < 0:
            latents.append(ddim.step(model_output, t, sample.float(), eta=0.0).prev_sample.cpu())
            break
        noise = torch.randn(sample.shape, generator=generator).to(device)
        epsilon = to_epsilon(model_output, sample.float(), t, alphas_cumprod, ddim.config.prediction_type)
        prev, log_prob = ddim_step_with_log_prob(
            alphas_cumprod,
            final_alpha,
            epsilon,
            t,
            t - stride,
            sample.float(),
            eta,
            noise=noise,
            clip_sample_range=clip_range(ddim),
        )
        latents.append(prev.cpu())
        log_probs.append(log_prob.cpu())
        timesteps.append((t, t - stride))
    return {"latents": latents, "log_probs": log_probs, "timesteps": timesteps}


def step_log_prob(
    denoise: Denoiser,
    ddim,
    sample: torch.Tensor,
    prev_sample: torch.Tensor,
    timestep: int,
    prev_timestep: int,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability (B,) of a step x_t -> x_{t_prev} already taken, under `denoise`, with gradient.

    sample, prev_sample: (B, C, h, w) on the model's device. Also returns the raw model output
    (B, C, h, w), for a drift penalty against the reference model.
    """
    device = sample.device
    alphas_cumprod = ddim.alphas_cumprod.to(device)
    model_output = denoise(sample, timestep)
    epsilon = to_epsilon(model_output.float(), sample.float(), timestep, alphas_cumprod, ddim.config.prediction_type)
    _, log_prob = ddim_step_with_log_prob(
        alphas_cumprod,
        ddim.final_alpha_cumprod.to(device),
        epsilon,
        timestep,
        prev_timestep,
        sample.float(),
        eta,
        prev_sample=prev_sample.float(),
        clip_sample_range=clip_range(ddim),
    )
    return log_prob, model_output
