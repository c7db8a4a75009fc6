"""Custom metrics for the Ray dashboard, through ray.util.metrics.

Each Ray node exports them in Prometheus text at its metrics export port (`ray start
--metrics-export-port`, or `MetricsExportPort` in `ray.nodes()`), named `ray_` + the name here,
with Ray's own tags (SessionName, WorkerId, ...) beside the ones below. Values reach the export a
metrics report interval (a few seconds) after they are recorded. Ray exports a histogram's `_sum`
from bucket midpoints, so it is approximate; `_count` and the buckets are exact.

    training (tag `job`: pretrain, finetune or the finetuning run's name; recorded by rank 0 at each report):
      pathalign_train_step_seconds         wall time of one optimizer step, averaged over the report window
      pathalign_train_images_per_second    images per second over all workers
      pathalign_train_loss                 the objective, mean over workers
      pathalign_reward_mean                mean reward r(x, c) of the finetuning batch
      pathalign_plausibility               share of fresh samples the (simulated) pathologist judges plausible
      pathalign_trajectory_plausibility    DDPO: share of the step's trajectories the pathologist judges plausible
    reward endpoint (tag `app`: the Serve application):
      pathalign_endpoint_latency_seconds   histogram: a /v1/score request or handle call, arrival to scores
      pathalign_endpoint_batch_size        histogram: images in one forward pass of the replica
"""

from __future__ import annotations

import functools
import math

# metrics-dict key of a training report -> gauge name, description
TRAIN_GAUGES = {
    "step_time_s": (
        "pathalign_train_step_seconds",
        "Wall time of one optimizer step (s), averaged over the report window",
    ),
    "images_per_s": ("pathalign_train_images_per_second", "Training images per second over all workers"),
    "loss": ("pathalign_train_loss", "Training objective, mean over workers"),
    "reward_mean": ("pathalign_reward_mean", "Mean reward r(x, c) of the finetuning batch"),
    "fresh_plausibility": (
        "pathalign_plausibility",
        "Share of fresh samples of the EMA weights judged plausible as their declared class",
    ),
    "trajectory_plausibility": (
        "pathalign_trajectory_plausibility",
        "Share of a DDPO step's trajectories judged plausible as their declared class",
    ),
}
LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


@functools.cache
def _train_gauges() -> dict:
    from ray.util.metrics import Gauge

    return {key: Gauge(name, description, tag_keys=("job",)) for key, (name, description) in TRAIN_GAUGES.items()}


@functools.cache
def _endpoint_histograms() -> tuple:
    from ray.util.metrics import Histogram

    latency = Histogram(
        "pathalign_endpoint_latency_seconds", "Reward endpoint: one scoring request, arrival to scores (s)",
        boundaries=LATENCY_BOUNDARIES_S, tag_keys=("app",),
    )  # fmt: skip
    batch = Histogram(
        "pathalign_endpoint_batch_size", "Reward endpoint: images in one forward pass",
        boundaries=BATCH_SIZE_BOUNDARIES, tag_keys=("app",),
    )  # fmt: skip
    return latency, batch


def record_train_metrics(job: str, metrics: dict) -> None:
    """Set the training gauges from one report's metrics dict; keys that are absent are left alone.

    Call it from rank 0 only, right where the loop reports: every rank would set the same gauge.
    """
    gauges = _train_gauges()
    for key, value in metrics.items():
        if key in gauges and not math.isnan(value):  # NaN (nothing measured) is not a reading
            gauges[key].set(float(value), tags={"job": job})


def record_endpoint_latency(seconds: float, app: str) -> None:
    _endpoint_histograms()[0].observe(seconds, tags={"app": app})


def record_endpoint_batch(images: int, app: str) -> None:
    _endpoint_histograms()[1].observe(images, tags={"app": app})
