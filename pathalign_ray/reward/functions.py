"""Reward functions chosen by name: each maps (images (N, H, W, 3) uint8, declared class names) to
(rewards (N,) float in [0, 1], info dict).

http: the Ray Serve scoring endpoint (pathalign_ray.reward.serve), the way finetuning jobs and
    outside users score images. handle: the same deployment through a DeploymentHandle, for jobs
    in the cluster that serves it (no HTTP, arrays sent as arrays). model: a reward model folder loaded in-process. pathologist: the
    simulated pathologist's verdict as a 0/1 reward, for ablations and upper bounds only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from pathalign_ray.config import Location, config_dataclass
from pathalign_ray.reward.client import HandleRewardClient, RewardClient

RewardFn = Callable[[np.ndarray, list[str]], tuple[np.ndarray, dict]]


@config_dataclass
class RewardSourceConfig:
    kind: Literal["http", "handle", "model", "pathologist"] = "http"
    url: str = "http://127.0.0.1:8000"  # kind=http: the scoring endpoint's base URL
    app: str = "reward"  # kind=handle: the Serve application's name (jobs/serve_reward.py deploys "reward")
    model: Location = ""  # kind=model: a reward model folder or URI written by jobs/train_reward.py
    timeout_s: float = 60.0  # kind=http: per request
    batch_size: int = 32  # images per request or forward pass; at most the endpoint's max_images_per_request

    def __post_init__(self) -> None:
        if self.kind == "model" and not self.model:
            raise ValueError("reward kind 'model' needs model=PATH")


def make_reward_fn(config: RewardSourceConfig) -> RewardFn:
    return {"http": _http, "handle": _handle, "model": _model, "pathologist": _pathologist}[config.kind](config)


def _http(config: RewardSourceConfig) -> RewardFn:
    client = RewardClient(config.url, timeout=config.timeout_s, max_batch=config.batch_size)

    def score(images: np.ndarray, classes: list[str]) -> tuple[np.ndarray, dict]:
        return np.asarray(client.score(images, classes), dtype=np.float64), {"source": config.url}

    return score


def _handle(config: RewardSourceConfig) -> RewardFn:
    client = HandleRewardClient.from_app(config.app, max_batch=config.batch_size)

    def score(images: np.ndarray, classes: list[str]) -> tuple[np.ndarray, dict]:
        return client.score(images, classes), {"source": f"serve app {config.app}"}

    return score


def _model(config: RewardSourceConfig) -> RewardFn:
    from pathalign_ray.reward.model import load_reward_model, score_images  # heavy: reward.model imports diffusers

    model, meta = load_reward_model(config.model)

    def score(images: np.ndarray, classes: list[str]) -> tuple[np.ndarray, dict]:
        return score_images(model, images, classes, config.batch_size), {"source": meta.get("model_id", config.model)}

    return score


def _pathologist(config: RewardSourceConfig) -> RewardFn:
    from pathalign_ray.experts.pathologist import judge  # heavy: pathologist imports scipy

    def score(images: np.ndarray, classes: list[str]) -> tuple[np.ndarray, dict]:
        verdicts = [judge(image, name) for image, name in zip(images, classes)]
        return np.array([float(v.plausible) for v in verdicts]), {"source": "simulated pathologist"}

    return score
