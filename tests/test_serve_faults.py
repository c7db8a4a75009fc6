"""Fault (b): a reward endpoint replica SIGKILLed under load. With the client's retries at most 0.5%
of requests fail, and Serve brings the replica back."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from pathalign_ray.images import encode_png
from pathalign_ray.reward.client import RewardClient, RewardServiceError
from pathalign_ray.reward.model import RewardModel, RewardModelConfig, save_reward_model
from pathalign_ray.reward.serve import DEPLOYMENT_NAME, ServeRewardConfig, build_app

pytestmark = pytest.mark.ray

APP = "reward_faults"
CLASSES = ["blast", "lymphocyte"]
CLIENTS = 4  # threads, each sending one 2-image request after another


@pytest.fixture(scope="module")
def endpoint(ray_cluster, serve_port, tmp_path_factory):
    """Two replicas of a tiny reward model at /faults on the session's Serve instance: (url, config)."""
    from ray import serve

    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig(image_size=16, channels=(8, 16), class_embedding=8, hidden=16), CLASSES)
    path = save_reward_model(model.eval(), tmp_path_factory.mktemp("reward") / "model", {"id": "faults", "version": 1})
    config = ServeRewardConfig(model=str(path), port=serve_port, route_prefix="/faults", num_replicas=2, max_batch_size=8,
                               max_images_per_request=8)  # fmt: skip
    serve.run(build_app(config), name=APP, route_prefix=config.route_prefix)
    yield f"http://127.0.0.1:{serve_port}/faults/"
    serve.delete(APP)


def _replicas(address: str) -> list:
    from ray.util.state import list_actors

    filters = [("class_name", "=", f"ServeReplica:{APP}:{DEPLOYMENT_NAME}"), ("state", "=", "ALIVE")]
    return list_actors(address=address, filters=filters)


def _replaced(address: str, killed: str) -> bool:
    alive = {replica.actor_id for replica in _replicas(address)}
    return killed not in alive and len(alive) == 2


def _load(url: str, stop: threading.Event, outcomes: list) -> None:
    rng = np.random.default_rng(len(outcomes))
    images = [encode_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    with RewardClient(url, retries=4, backoff_s=0.25, timeout=30) as client:
        while not stop.is_set():
            try:
                client.score(images, CLASSES)
                outcomes.append(True)
            except RewardServiceError:
                outcomes.append(False)


def test_a_killed_replica_under_load_costs_at_most_half_a_percent_of_requests(endpoint):
    import ray

    address = ray.get_runtime_context().gcs_address  # explicit: other Ray clusters may share this machine
    before = _replicas(address)
    assert len(before) == 2, before
    outcomes: list[bool] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_load, args=(endpoint, stop, outcomes)) for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        time.sleep(3)
        os.kill(before[0].pid, signal.SIGKILL)
        killed_at = time.time()
        while not _replaced(address, before[0].actor_id):
            assert time.time() - killed_at < 120, "the killed replica was not replaced"
            time.sleep(0.5)
        recovered_s = time.time() - killed_at
        time.sleep(3)  # load on the restored pair
    finally:
        stop.set()
        for client in clients:
            client.join()
    failed = outcomes.count(False)
    print(f"{len(outcomes)} requests, {failed} failed, replica back after {recovered_s:.1f} s")
    assert len(outcomes) >= 200, len(outcomes)
    assert failed <= 0.005 * len(outcomes), f"{failed} of {len(outcomes)} requests failed"
