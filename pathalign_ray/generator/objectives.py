"""Feedback objectives, as pure functions of tensors: (loss, metrics) out; no Ray, no DeepSpeed, no I/O.

Reward-weighted likelihood (the paper, after Lee et al. 2023):
    L(theta) = E_synthetic[ w(r) * L_diff(x~, c~) ] + beta * E_real[ L_diff(x, c) ]
With centred weights w = r - mean_class(r), the synthetic term takes each sample's loss relative to
the pretrained model's, L_diff / L_diff_ref, clipped to 1 +- eps as PPO clips its ratio: a sample
already fitted (or pushed away) by eps stops pulling.
Policy gradient (DDPO, Black et al. 2023): denoising is an MDP whose actions are DDIM steps with
eta > 0; the clipped importance-ratio objective of PPO is applied to each step's log-probability.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

WeightMode = Literal["raw", "threshold", "class_normalized", "centred"]


def reward_weights(
    rewards: torch.Tensor,
    mode: WeightMode = "raw",
    threshold: float = 0.5,
    class_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    baselines: torch.Tensor | None = None,
) -> torch.Tensor:
    """w(r) for the reward-weighted term. rewards, class_ids, baselines: (B,). Returns (B,), no gradient.

    raw: w = r, the paper's choice (r in [0, 1] from the reward model).
    threshold: w = 1[r >= threshold], keep only images judged plausible (rejection sampling).
    class_normalized: w = B * softmax over the batch of (r - mean_c(r)) / temperature, where mean_c is
        the mean reward of the sample's class in the batch: classes the model already draws well
        do not dominate the update. The weights average 1.
    centred: w = r - baseline, the baseline being the mean reward of the sample's class over the
        whole pool (`class_means`): plausible samples pull, implausible ones push, and the pull
        towards the model's own samples as such, which alone lowers plausibility here
        (BENCHMARKS.md), cancels. Negative weights raise a loss without bound: use them with
        `reward_weighted_loss`'s ratio_clip.
    """
    rewards = rewards.detach().float()
    if mode == "raw":
        return rewards
    if mode == "threshold":
        return (rewards >= threshold).float()
    if mode == "class_normalized":
        if class_ids is None:
            raise ValueError("class_normalized weights need class_ids")
        centred = rewards - class_means(rewards, class_ids)
        return len(rewards) * torch.softmax(centred / temperature, dim=0)
    if mode == "centred":
        if baselines is None:
            raise ValueError("centred weights need baselines (the class means of the pool's rewards)")
        return rewards - baselines.detach().float()
    raise ValueError(f"unknown reward weighting {mode!r}: use raw, threshold, class_normalized or centred")


def class_means(values: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """(B,) the mean of `values` over the samples of each sample's class."""
    sums = torch.zeros(int(class_ids.max()) + 1).index_add_(0, class_ids, values)
    counts = torch.zeros_like(sums).index_add_(0, class_ids, torch.ones_like(values))
    return (sums / counts)[class_ids]


def reward_weighted_loss(
    synthetic_losses: torch.Tensor,
    weights: torch.Tensor,
    real_losses: torch.Tensor | None,
    beta: float,
    reference_losses: torch.Tensor | None = None,
    ratio_clip: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's objective from per-sample noise-prediction losses.

    synthetic_losses: (B,) L_diff of feedback-labelled synthetic images at their declared classes.
    weights: (B,) w(r). real_losses: (B',) L_diff of real images, or None when beta is 0.
    ratio_clip > 0: the synthetic term is PPO's pessimistic max(w * rho, w * clip(rho, 1 - eps, 1 + eps))
    of rho = L_diff / reference_losses (the pretrained model's L_diff on the same noisy inputs).
    """
    metrics = {"weight_mean": float(weights.mean())}
    if ratio_clip > 0:
        if reference_losses is None:
            raise ValueError("ratio_clip > 0 needs reference_losses")
        ratio = synthetic_losses / reference_losses.detach().clamp_min(1e-12)
        clipped = ratio.clamp(1 - ratio_clip, 1 + ratio_clip)
        per_sample = torch.maximum(weights * ratio, weights * clipped)
        weighted = per_sample.mean()
        metrics.update(
            loss_ratio_mean=float(ratio.detach().mean()),
            ratio_clip_fraction=float((weights * clipped > weights * ratio).float().mean()),
        )
    else:
        weighted = (weights * synthetic_losses).mean()
    loss = weighted
    metrics["loss_weighted_synthetic"] = float(weighted.detach())
    if beta > 0:
        if real_losses is None:
            raise ValueError("beta > 0 needs real_losses")
        real = real_losses.mean()
        loss = loss + beta * real
        metrics["loss_real"] = float(real.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics


@torch.no_grad()
def ddim_trajectories(
    model,
    ddim,
    labels: torch.Tensor,
    ddim_steps: int,
    eta: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """DDIM from `model` (a UNet2DModel on labels' device): latents x_T..x_0 on the CPU, each
    stochastic step's log-probability, and its (t, t_prev). Noise is drawn on the CPU from generator.

    The last step lands on alpha = 1, where the step has no variance and so no log-probability:
    it is taken deterministically and not trained on (the policy's actions are the steps before).
    """
    device = labels.device
    size = model.config.sample_size
    ddim.set_timesteps(ddim_steps)
    stride = ddim.config.num_train_timesteps // ddim_steps
    schedule = (ddim.alphas_cumprod.to(device), ddim.final_alpha_cumprod.to(device))
    latents = [torch.randn(len(labels), 3, size, size, generator=generator)]
    log_probs, timesteps = [], []
    for t in ddim.timesteps.tolist():
        sample = latents[-1].to(device, dtype)
        model_output = model(sample, t, class_labels=labels).sample.float()
        if t - stride < 0:
            latents.append(ddim.step(model_output, t, sample.float(), eta=0.0).prev_sample.cpu())
            break
        noise = torch.randn(sample.shape, generator=generator).to(device)
        prev, log_prob = ddim_step_with_log_prob(
            *schedule, model_output, t, t - stride, sample.float(), eta, noise=noise
        )
        latents.append(prev.cpu())
        log_probs.append(log_prob.cpu())
        timesteps.append((t, t - stride))
    latents[-1] = latents[-1].clamp(-1, 1)
    return {"latents": latents, "log_probs": log_probs, "timesteps": timesteps}


def ddim_step_with_log_prob(
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor,
    model_output: torch.Tensor,
    timestep: int,
    prev_timestep: int,
    sample: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    clip_sample_range: float | None = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12) and the log-probability of its outcome.

    Adapted from diffusers 0.42.1 schedulers/scheduling_ddim.py DDIMScheduler.step (epsilon
    prediction, clip_sample): adds the log-density of prev_sample under N(mean, std^2), as
    kvablack/ddpo-pytorch's ddim_with_logprob. Give `noise` to draw a step, or `prev_sample` to score
    one already taken (the policy-gradient update). model_output, sample, noise, prev_sample:
    (B, C, H, W). Returns (prev_sample (B, C, H, W), log_prob (B,): mean over pixels).
    """
    if eta <= 0:
        raise ValueError(f"a log-probability needs a stochastic step: eta must be > 0, got {eta}")
    alpha_prod_t = alphas_cumprod[timestep]
    alpha_prod_t_prev = alphas_cumprod[prev_timestep] if prev_timestep >= 0 else final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    pred_original_sample = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()  # eq. 12, "predicted x_0"
    if clip_sample_range is not None:
        pred_original_sample = pred_original_sample.clamp(-clip_sample_range, clip_sample_range)
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)  # eq. 16, sigma_t^2 / eta^2
    std_dev_t = eta * variance.sqrt()
    direction = (1 - alpha_prod_t_prev - std_dev_t**2).sqrt() * model_output  # eq. 12, "direction pointing to x_t"
    mean = alpha_prod_t_prev.sqrt() * pred_original_sample + direction
    if prev_sample is None:
        if noise is None:
            raise ValueError("give noise to draw a step, or prev_sample to score one")
        prev_sample = mean + std_dev_t * noise
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std_dev_t**2) - torch.log(std_dev_t) - 0.5 * math.log(2 * math.pi)
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) for one denoising step of a batch.

    log_prob: (B,) under the current policy; old_log_prob: (B,) when sampled; advantages: (B,).
    Returns the loss to minimise and metrics: approx_kl (0.5 E[(log ratio)^2]), clipfrac.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        log_ratio = log_prob - old_log_prob
        metrics = {
            "policy_loss": float(loss),
            "approx_kl": float(0.5 * (log_ratio**2).mean()),
            "clipfrac": float(((ratio - 1.0).abs() > clip_range).float().mean()),
        }
    return loss, metrics


class PerClassRewardStats:
    """DDPO's per-prompt advantage normalisation, per declared class.

    The baseline of a reward is the mean of the OTHER rewards of its class in the same batch
    (leave-one-out, as RLOO; for a class drawn once, the batch's other rewards), so the advantages
    of a class drawn more than once sum to zero: the update never pushes the likelihood of all the
    policy's samples up or down at once. A baseline from a buffer
    of past rewards does, and feeds on itself once the reward falls: every new sample is below the
    buffer's mean, each step lowers the likelihood of everything the policy draws (measured: mean
    advantage -1.2 after 60 steps at lr 1e-4). The scale is the running standard deviation of the
    class's last `buffer_size` rewards; a class seen fewer than `min_count` times uses the batch's.
    """

    def __init__(self, buffer_size: int = 256, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self._buffers: dict[int, np.ndarray] = {}

    def advantages(self, rewards: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        """(B,) rewards and class ids -> (B,) advantages (reward - leave-one-out class mean) / (class std + 1e-6).

        A class drawn once in the batch is compared with the mean of the batch's other rewards.
        """
        rewards = np.asarray(rewards, dtype=np.float64)
        class_ids = np.asarray(class_ids)
        advantages = np.zeros_like(rewards)
        for class_id in np.unique(class_ids):
            chosen = class_ids == class_id
            buffer = np.concatenate([self._buffers.get(int(class_id), np.empty(0)), rewards[chosen]])
            self._buffers[int(class_id)] = buffer = buffer[-self.buffer_size :]
            peers = chosen if chosen.sum() > 1 else np.ones_like(chosen)
            if peers.sum() < 2:
                continue
            others_mean = (rewards[peers].sum() - rewards[chosen]) / (peers.sum() - 1)
            scale = (buffer if len(buffer) >= self.min_count else rewards).std()
            advantages[chosen] = (rewards[chosen] - others_mean) / (scale + 1e-6)
        return advantages

    def state(self) -> dict[str, list[float]]:
        return {str(k): v.tolist() for k, v in self._buffers.items()}

    def load_state(self, state: dict[str, list[float]]) -> None:
        self._buffers = {int(k): np.asarray(v) for k, v in state.items()}
