"""The project's custom metrics read back as Prometheus text from the node's metrics export port."""

from __future__ import annotations

import re
import time
import urllib.request

import httpx
import numpy as np
import pytest
import torch

from pathalign_ray.images import encode_png
from pathalign_ray.reward.client import RewardClient
from pathalign_ray.reward.model import RewardModel, RewardModelConfig, save_reward_model
from pathalign_ray.reward.serve import ServeRewardConfig, build_app

pytestmark = pytest.mark.ray

APP = "reward_metrics"
CLASSES = ["blast", "lymphocyte"]


def _scrape(ray) -> str:
    (node,) = [node for node in ray.nodes() if node["Alive"]]
    with urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10) as response:
        return response.read().decode()


def _series(text: str, name: str, le: float | None = None, **tags: str) -> list[float]:
    """Values of every sample of `name` whose tags include `tags` (and whose bucket bound is `le`)."""
    values = []
    for match in re.finditer(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if le is not None and ("le" not in labels or float(labels["le"]) != le):
            continue
        if all(labels.get(key) == value for key, value in tags.items()):
            values.append(float(match.group(2)))
    return values


def _poll(ray, ready, timeout: float = 60) -> str:
    """Scrape until ready(text): metrics reach the export one report interval (10 s by default) after they are set."""
    deadline = time.time() + timeout
    while not ready(text := _scrape(ray)):
        assert time.time() < deadline, [line for line in text.splitlines() if "pathalign" in line][:20]
        time.sleep(1)
    return text


def test_training_gauges_are_exported_with_their_job_tag(ray_cluster):
    @ray_cluster.remote(num_cpus=0)
    class Loop:
        def report(self, metrics):
            from pathalign_ray.metrics import record_train_metrics

            record_train_metrics("finetune-test", metrics)

    loop = Loop.remote()  # kept alive while the export is read: it holds the gauges
    metrics = {"step": 3, "loss": 0.25, "images_per_s": 42.0, "step_time_s": 0.5, "reward_mean": 0.75,
               "fresh_plausibility": 0.625, "trajectory_plausibility": 0.375, "lr": 1e-4}  # fmt: skip
    ray_cluster.get(loop.report.remote(metrics))
    expected = {
        "ray_pathalign_train_loss": 0.25, "ray_pathalign_train_images_per_second": 42.0,
        "ray_pathalign_train_step_seconds": 0.5, "ray_pathalign_reward_mean": 0.75, "ray_pathalign_plausibility": 0.625,
        "ray_pathalign_trajectory_plausibility": 0.375,
    }  # fmt: skip
    text = _poll(ray_cluster, lambda text: all(_series(text, name, job="finetune-test") for name in expected))
    for name, value in expected.items():
        assert _series(text, name, job="finetune-test") == [value], name
    ray_cluster.kill(loop)


@pytest.fixture(scope="module")
def endpoint(ray_cluster, serve_port, tmp_path_factory):
    from ray import serve

    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig(image_size=16, channels=(8, 16), class_embedding=8, hidden=16), CLASSES)
    path = save_reward_model(model.eval(), tmp_path_factory.mktemp("reward") / "model", {"id": "metrics", "version": 1})
    config = ServeRewardConfig(
        model=str(path), port=serve_port, route_prefix="/metrics-test", max_batch_size=8, max_images_per_request=8
    )
    serve.run(build_app(config), name=APP, route_prefix=config.route_prefix)
    yield f"http://127.0.0.1:{serve_port}/metrics-test/"
    serve.delete(APP)


def test_endpoint_latency_and_batch_size_are_exported(ray_cluster, endpoint):
    rng = np.random.default_rng(0)
    images = [encode_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(20)]
    with RewardClient(endpoint, max_batch=4, max_concurrency=5) as client:  # 5 requests of 4 images, sent at once
        assert len(client.score(images, CLASSES * 10)) == 20
    assert httpx.get(f"{endpoint}healthz").status_code == 200  # not a scoring request: not counted

    def counted(text):  # each histogram reaches the export on its own schedule: wait for both
        latency = _series(text, "ray_pathalign_endpoint_latency_seconds_count", app=APP)
        return latency == [5.0] and _series(text, "ray_pathalign_endpoint_batch_size_count", app=APP)[-1:] >= [3.0]

    text = _poll(ray_cluster, counted)  # 5 requests; 20 images in batches of at most max_batch_size=8
    batches = _series(text, "ray_pathalign_endpoint_batch_size_count", app=APP)
    assert 3 <= batches[0] <= 5
    assert _series(text, "ray_pathalign_endpoint_batch_size_bucket", le=8, app=APP) == batches  # none over 8
    assert _series(text, "ray_pathalign_endpoint_latency_seconds_bucket", le=float("inf"), app=APP) == [5.0]
    assert 0 < _series(text, "ray_pathalign_endpoint_latency_seconds_sum", app=APP)[0] < 5 * 30
