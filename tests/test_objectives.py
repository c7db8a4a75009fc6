import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from pathalign_ray.generator.objectives import (
    PerClassRewardStats,
    class_means,
    clipped_policy_loss,
    ddim_step_with_log_prob,
    reward_weighted_loss,
    reward_weights,
)


@pytest.fixture
def ddim():
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    scheduler.set_timesteps(10)
    return scheduler


def _step_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 4, generator=g) for _ in range(3)]


@pytest.mark.parametrize("index", [0, 5, 9])
def test_ddim_step_matches_diffusers(ddim, index):
    model_output, sample, noise = _step_inputs()
    t = int(ddim.timesteps[index])
    prev_t = t - 1000 // 10
    ours, _ = ddim_step_with_log_prob(
        ddim.alphas_cumprod, ddim.final_alpha_cumprod, model_output, t, prev_t, sample, eta=0.7, noise=noise
    )
    theirs = ddim.step(model_output, t, sample, eta=0.7, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_log_prob_is_the_gaussian_density(ddim):
    model_output, sample, noise = _step_inputs(1)
    t, prev_t = int(ddim.timesteps[3]), int(ddim.timesteps[3]) - 100
    args = (ddim.alphas_cumprod, ddim.final_alpha_cumprod, model_output, t, prev_t, sample)
    mean, _ = ddim_step_with_log_prob(*args, eta=1.0, noise=torch.zeros_like(noise))
    prev, log_prob = ddim_step_with_log_prob(*args, eta=1.0, noise=noise)
    alpha, alpha_prev = ddim.alphas_cumprod[t], ddim.alphas_cumprod[prev_t]
    std = ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
    _, rescored = ddim_step_with_log_prob(*args, eta=1.0, prev_sample=prev)
    torch.testing.assert_close(rescored, log_prob)


def test_log_prob_gradient_flows_through_the_mean_only(ddim):
    model_output, sample, noise = _step_inputs(2)
    model_output.requires_grad_(True)
    t = int(ddim.timesteps[2])
    prev, _ = ddim_step_with_log_prob(
        ddim.alphas_cumprod, ddim.final_alpha_cumprod, model_output.detach(), t, t - 100, sample, 1.0, noise
    )
    _, log_prob = ddim_step_with_log_prob(
        ddim.alphas_cumprod, ddim.final_alpha_cumprod, model_output, t, t - 100, sample, 1.0, prev_sample=prev
    )
    log_prob.sum().backward()
    assert model_output.grad is not None and model_output.grad.abs().sum() > 0


def test_deterministic_step_has_no_log_prob(ddim):
    model_output, sample, noise = _step_inputs()
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_log_prob(
            ddim.alphas_cumprod, ddim.final_alpha_cumprod, model_output, 900, 800, sample, 0.0, noise
        )


def test_reward_weights():
    rewards = torch.tensor([0.9, 0.2, 0.6, 0.4])
    classes = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(reward_weights(rewards), rewards)
    torch.testing.assert_close(reward_weights(rewards, "threshold", threshold=0.5), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    normalised = reward_weights(rewards, "class_normalized", class_ids=classes, temperature=0.1)
    centred = torch.tensor([0.35, -0.35, 0.1, -0.1]) / 0.1
    torch.testing.assert_close(normalised, 4 * torch.softmax(centred, 0))
    assert normalised.mean().item() == pytest.approx(1.0)
    baselines = class_means(rewards, classes)
    torch.testing.assert_close(baselines, torch.tensor([0.55, 0.55, 0.5, 0.5]))
    torch.testing.assert_close(
        reward_weights(rewards, "centred", baselines=baselines), torch.tensor([0.35, -0.35, 0.1, -0.1])
    )
    with pytest.raises(ValueError, match="centred weights need baselines"):
        reward_weights(rewards, "centred")
    with pytest.raises(ValueError, match="unknown reward weighting"):
        reward_weights(rewards, "cubic")


def test_ratio_clipped_reward_weighted_loss_golden():
    """PPO's pessimistic clip on L / L_ref: a sample fitted (w > 0) or pushed away (w < 0) past 1 -+ eps stops pulling."""
    reference = torch.tensor([1.0, 1.0, 1.0, 1.0])
    losses = torch.tensor([0.8, 1.05, 1.3, 0.95], requires_grad=True)
    weights = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, metrics = reward_weighted_loss(losses, weights, None, beta=0.0, reference_losses=reference, ratio_clip=0.1)
    # per sample: max(0.8, 0.9) = 0.9 (clipped), max(1.05, 1.05), max(-1.3, -1.1) = -1.1 (clipped), max(-0.95, -0.95)
    assert loss.item() == pytest.approx((0.9 + 1.05 - 1.1 - 0.95) / 4)
    assert metrics["ratio_clip_fraction"] == pytest.approx(0.5) and metrics["loss_ratio_mean"] == pytest.approx(1.025)
    loss.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([0.0, 0.25, 0.0, -0.25]))
    with pytest.raises(ValueError, match="ratio_clip > 0 needs reference_losses"):
        reward_weighted_loss(losses, weights, None, beta=0.0, ratio_clip=0.1)


def test_reward_weighted_loss_golden():
    loss, metrics = reward_weighted_loss(
        torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]), torch.tensor([3.0, 1.0]), beta=0.3
    )
    assert loss.item() == pytest.approx((0.5 * 1 + 1.0 * 2) / 2 + 0.3 * 2.0)
    assert metrics["loss_real"] == pytest.approx(2.0) and metrics["weight_mean"] == pytest.approx(0.75)
    no_real, _ = reward_weighted_loss(torch.tensor([1.0]), torch.tensor([1.0]), None, beta=0.0)
    assert no_real.item() == 1.0
    with pytest.raises(ValueError, match="beta > 0 needs real_losses"):
        reward_weighted_loss(torch.tensor([1.0]), torch.tensor([1.0]), None, beta=0.3)


def test_clipped_policy_loss_golden():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    advantages = torch.tensor([1.0, 1.0, -2.0])
    loss, metrics = clipped_policy_loss(new, old, advantages, clip_range=0.2)
    # per sample: max(-A r, -A clip(r)): [max(-1.5, -1.2), max(-0.5, -0.8), max(2.2, 2.2)]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert metrics["clipfrac"] == pytest.approx(2 / 3)
    assert metrics["approx_kl"] == pytest.approx(0.5 * float((new**2).mean()))


def test_per_class_advantages():
    stats = PerClassRewardStats(buffer_size=4, min_count=2)
    advantages = stats.advantages(np.array([1.0, 3.0, 10.0]), np.array([0, 0, 1]))
    # class 0: leave-one-out baselines 3 and 1, scaled by the std of its rewards [1, 3]; class 1 is
    # alone: the batch's other rewards are its baseline, the batch's spread its scale
    assert advantages == pytest.approx([-2.0, 2.0, (10 - 2) / np.std([1, 3, 10])], abs=1e-5)
    stats.advantages(np.array([5.0, 5.0, 5.0]), np.array([0, 0, 0]))
    assert stats.state()["0"] == [3.0, 5.0, 5.0, 5.0]


def test_per_class_advantages_sum_to_zero_per_class_whatever_came_before():
    """A falling reward must not make every advantage negative (the buffer-baseline collapse)."""
    stats = PerClassRewardStats(buffer_size=64, min_count=4)
    stats.advantages(np.full(8, 0.9), np.repeat([0, 1], 4))  # high rewards in the past
    class_ids = np.repeat([0, 1], 4)
    advantages = stats.advantages(np.array([0.1, 0.2, 0.0, 0.3, 0.05, 0.0, 0.1, 0.2]), class_ids)
    for class_id in (0, 1):
        assert advantages[class_ids == class_id].sum() == pytest.approx(0.0, abs=1e-9)
    assert (advantages > 0).any()
    restored = PerClassRewardStats(buffer_size=4, min_count=2)
    restored.load_state(stats.state())
    assert restored.state() == stats.state()


def test_policy_gradient_raises_a_smooth_reward(ddim):
    """The pieces compose into an ascent: DDIM trajectories with log-probabilities, leave-one-out
    advantages, the clipped surrogate; a few steps raise the images' brightness on fixed noise."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    stats = PerClassRewardStats(min_count=4)
    stride = ddim.config.num_train_timesteps // len(ddim.timesteps)

    def trajectories(seed):
        g = torch.Generator().manual_seed(seed)
        latents, log_probs = [torch.randn(16, 3, 8, 8, generator=g)], []
        with torch.no_grad():
            for t in ddim.timesteps.tolist()[:-1]:  # the stochastic steps
                noise = torch.randn(16, 3, 8, 8, generator=g)
                prev, log_prob = ddim_step_with_log_prob(
                    ddim.alphas_cumprod,
                    ddim.final_alpha_cumprod,
                    unet(latents[-1], t).sample,
                    t,
                    t - stride,
                    latents[-1],
                    eta=1.0,
                    noise=noise,
                )
                latents.append(prev)
                log_probs.append(log_prob)
        return latents, log_probs

    def brightness(latents):
        return latents[-1].clamp(-1, 1).mean(dim=(1, 2, 3))

    before = brightness(trajectories(seed=999)[0]).mean()
    for step in range(12):
        latents, old_log_probs = trajectories(seed=step)
        advantages = torch.as_tensor(
            stats.advantages(brightness(latents).numpy(), np.arange(16) % 2), dtype=torch.float32
        )
        optimizer.zero_grad()
        for j, t in enumerate(ddim.timesteps.tolist()[:-1]):
            _, log_prob = ddim_step_with_log_prob(
                ddim.alphas_cumprod,
                ddim.final_alpha_cumprod,
                unet(latents[j], t).sample,
                t,
                t - stride,
                latents[j],
                eta=1.0,
                prev_sample=latents[j + 1],
            )
            loss, _ = clipped_policy_loss(log_prob, old_log_probs[j], advantages, clip_range=1e-4)
            loss.backward()
        optimizer.step()
    after = brightness(trajectories(seed=999)[0]).mean()
    assert after > before + 0.02  # measured: 0.071 -> 0.108
