"""Does the policy gradient climb a smooth reward on the 32 px model, and at what learning rate?

    .venv/bin/python experiments/ddpo_smooth_reward.py [--steps 25] [--trajectories 16]

The reward is the mean brightness of the final image: smooth, cheap, and with no reward model in
the way. Plain PyTorch, one process, the objective functions finetuning uses
(ddim_trajectories, ddim_step_with_log_prob, PerClassRewardStats, clipped_policy_loss), AdamW, DDIM 10 with eta 1 and
the same noise for every learning rate; lr 0 is the baseline (the reward's spread from the noise
alone). Needs runs/pretrain32/model (bench/pretrain32.py --restore). Writes
bench/results/ddpo_smooth_reward.json: the reward of each step's trajectories per learning rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pathalign_ray.generator.diffusion import load_model
from pathalign_ray.generator.objectives import (
    PerClassRewardStats,
    clipped_policy_loss,
    ddim_step_with_log_prob,
    ddim_trajectories,
)

# bench_common (it writes bench/results/NAME.json) is in bench/, off the path when run as experiments/NAME.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_common import write_result

MODEL = "runs/pretrain32/model"
LEARNING_RATES = (0.0, 1e-5, 1e-4)


def climb(lr: float, steps: int, trajectories: int) -> list[float]:
    unet, ddim, class_names, _ = load_model(MODEL)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    stats, generator = PerClassRewardStats(), torch.Generator().manual_seed(0)
    schedule = (ddim.alphas_cumprod, ddim.final_alpha_cumprod)
    labels = torch.arange(trajectories) % len(class_names)
    rewards = []
    for _ in range(steps):
        trajectory = ddim_trajectories(unet, ddim, labels, 10, 1.0, generator)
        latents, old_log_probs = trajectory["latents"], trajectory["log_probs"]
        brightness = latents[-1].mean(dim=(1, 2, 3))  # the trajectory's final latents are clamped to [-1, 1]
        rewards.append(float(brightness.mean()))
        advantages = torch.as_tensor(stats.advantages(brightness.numpy(), labels.numpy()), dtype=torch.float32)
        optimizer.zero_grad()
        for j, (t, prev_t) in enumerate(trajectory["timesteps"]):
            output = unet(latents[j], t, class_labels=labels).sample
            _, log_prob = ddim_step_with_log_prob(
                *schedule, output, t, prev_t, latents[j], 1.0, prev_sample=latents[j + 1]
            )
            loss, _ = clipped_policy_loss(log_prob, old_log_probs[j], advantages.clamp(-5, 5), clip_range=1e-4)
            (loss / len(old_log_probs)).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
    return rewards


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    curves = {}
    for lr in LEARNING_RATES:
        curves[str(lr)] = climb(lr, args.steps, args.trajectories)
        shown = " ".join(f"{r:.3f}" for r in curves[str(lr)])
        print(f"lr {lr:g}: {shown}", flush=True)
    write_result(
        "ddpo_smooth_reward",
        {
            "reward": "mean brightness of the final image, in [-1, 1]",
            "steps": args.steps,
            "trajectories_per_step": args.trajectories,
            "reward_per_step": curves,
            "peak": {lr: max(curve) for lr, curve in curves.items()},
            "last": {lr: curve[-1] for lr, curve in curves.items()},
        },
    )


if __name__ == "__main__":
    main(sys.argv[1:])
