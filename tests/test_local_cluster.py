"""LocalCluster's retry of a node whose `ray start` gave up (pure: `ray start` and the GCS are stood in for).

`ray start` waits a hard-coded 30 s for its raylet to register (ray/_private/node.py) and exits when a
loaded machine is slower: add_node then kills that try's process group and starts the node once more.
"""

from __future__ import annotations

import subprocess

import pytest

from pathalign_ray.local_cluster import START_ATTEMPTS, STARTUP_TIMEOUT_MARK, LocalCluster, LocalNode


def _cluster(tmp_path, monkeypatch, exits: list[str | None]) -> tuple[LocalCluster, list[LocalNode]]:
    """A cluster whose k-th `ray start` exits at once having logged exits[k], or (None) keeps running."""
    cluster, started = LocalCluster(tmp_path), []

    def start(name, role_args, num_cpus, resources, ports):
        log = tmp_path / f"{name}-{len(started)}.log"
        message = exits[len(started)]
        log.write_text(message or "")
        process = subprocess.Popen(["sleep", "0" if message is not None else "60"], start_new_session=True)
        if message is not None:
            process.wait()
        node = LocalNode(name, process, tmp_path, log=log)
        cluster.nodes.append(node)
        started.append(node)
        return node

    def wait_for_nodes(n, timeout):
        if any(node.process.poll() is not None for node in cluster.nodes):
            raise RuntimeError("ray start exited")
        assert n == len(cluster.nodes)

    monkeypatch.setattr(cluster, "_start", start)
    monkeypatch.setattr(cluster, "wait_for_nodes", wait_for_nodes)
    return cluster, started


def test_a_node_whose_ray_start_timed_out_is_started_once_more(tmp_path, monkeypatch):
    cluster, started = _cluster(tmp_path, monkeypatch, [f"Exception: The current node {STARTUP_TIMEOUT_MARK}.", None])
    try:
        node = cluster.add_node(num_cpus=1)
        assert node is started[1] and cluster.nodes == [node] and node.process.poll() is None
    finally:
        started[-1].process.kill()


def test_other_failures_and_the_last_try_raise(tmp_path, monkeypatch):
    cluster, started = _cluster(tmp_path, monkeypatch, ["Exception: port 6379 is in use"])
    with pytest.raises(RuntimeError, match="ray start exited"):
        cluster.add_node(num_cpus=1)
    assert len(started) == 1  # not a timeout: no second try
    timeouts = [f"Exception: The current node {STARTUP_TIMEOUT_MARK}."] * START_ATTEMPTS
    cluster, started = _cluster(tmp_path, monkeypatch, timeouts)
    with pytest.raises(RuntimeError, match="ray start exited"):
        cluster.add_node(num_cpus=1)
    assert len(started) == START_ATTEMPTS
