"""Shared fixtures: one real local Ray cluster per test session, tiny data sets and configs."""

from __future__ import annotations

import os

import pytest

from pathalign_ray.cluster import job_env

os.environ.update(job_env("cpu"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster on 127.0.0.1 for the whole session, stopped at the end.

    Four logical CPUs on a 2-core machine: two Ray Train workers plus the Ray Data and
    sampling tasks around them fit without waiting on each other.
    """
    import ray

    from pathalign_ray.cluster import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A 16 px procedural data set of 4 cell types, 8 images each, written as parquet shards."""
    from pathalign_ray.data import procedural
    from pathalign_ray.data.shards import write_dataset

    images = procedural.generate(8, 16, seed=0, classes=procedural.DEFAULT_CELL_TYPES[:4])
    return write_dataset(images, tmp_path_factory.mktemp("data") / "tiny", test_fraction=0.25, seed=0, source="test")
