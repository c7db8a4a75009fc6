"""Shared fixtures: one real local Ray cluster per test session, tiny data sets and configs."""

from __future__ import annotations

import itertools
import os

import pytest

from pathalign_ray.cluster import job_env
from pathalign_ray.generator.diffusion import ModelConfig

os.environ.update(job_env("cpu"))


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """A local Ray cluster on 127.0.0.1 for the whole session, stopped at the end.

    Four logical CPUs on a 2-core machine: two Ray Train workers plus the Ray Data and
    sampling tasks around them fit without waiting on each other. It starts after the S3 server,
    so every Ray process has the bucket's endpoint and credentials in its environment, as every
    node of a real cluster has its instance profile (Ray Train's controller checks the storage too).
    The node's download cache of the bucket's files (PATHALIGN_STORAGE_CACHE) is a folder of the session.
    """
    import ray

    from pathalign_ray.cluster import init_ray

    saved = os.environ.get("PATHALIGN_STORAGE_CACHE")
    os.environ["PATHALIGN_STORAGE_CACHE"] = str(tmp_path_factory.mktemp("storage_cache"))
    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("PATHALIGN_STORAGE_CACHE", None)
    else:
        os.environ["PATHALIGN_STORAGE_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A 16 px procedural data set of 4 cell types, 8 images each, written as parquet shards."""
    from pathalign_ray.data import procedural
    from pathalign_ray.data.shards import write_dataset

    images = procedural.generate(8, 16, seed=0, classes=procedural.DEFAULT_CELL_TYPES[:4])
    return write_dataset(images, tmp_path_factory.mktemp("data") / "tiny", test_fraction=0.25, seed=0, source="test")


def pytest_collection_modifyitems(config, items):
    """CI=true skips the long runs; each of them has a benchmark in bench/ that covers it."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow: skipped when CI=true (covered by bench/)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


TINY_MODEL = ModelConfig(sample_size=16, block_out_channels=(8, 16), norm_num_groups=4, num_train_timesteps=100)


@pytest.fixture(scope="module")
def unet():
    """A seeded 3-class UNet of TINY_MODEL's size, in eval mode."""
    import torch

    from pathalign_ray.generator.diffusion import build_unet

    torch.manual_seed(0)
    return build_unet(TINY_MODEL, num_classes=3).eval()


TINY_PRETRAIN_OVERRIDES = [
    "model.sample_size=16",
    "model.block_out_channels=[8,16]",
    "model.norm_num_groups=4",
    "model.num_train_timesteps=100",
    "train.batch_size=4",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.warmup_steps=1",
    "scale.num_workers=2",
    "scale.zero_stage=2",
]


# the reward model and finetuning of one round of the align loop (AlignConfig's reward and finetune), tiny
TINY_ALIGN_OVERRIDES = [
    "reward.model.image_size=16", "reward.model.channels=[8,16]", "reward.model.hidden=16",
    "reward.model.class_embedding=8", "reward.train.epochs=1", "reward.train.steps_per_epoch=2",
    "reward.train.batch_size=8", "reward.data.test_fraction=0.25", "reward.scale.num_workers=1",
    "finetune.train.steps=2", "finetune.train.batch_size=2", "finetune.train.checkpoint_every=2",
    "finetune.train.log_every=1", "finetune.train.eval_every=0", "finetune.train.eval_per_class=1",
    "finetune.train.eval_ddim_steps=2", "finetune.scale.num_workers=2",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_pretrained(ray_cluster, tiny_dataset, tmp_path_factory):
    """A tiny model pretrained on 2 Ray Train workers with ZeRO-2: 3 steps, then resumed to 5.

    Returns (run_dir, metric history of the first run, exported model folder).
    """
    from pathalign_ray.config import load_config
    from pathalign_ray.generator.pretrain import PretrainConfig, pretrain

    run_dir = tmp_path_factory.mktemp("run")

    def run(steps):
        overrides = [f"run_dir={run_dir}", f"data.dataset={tiny_dataset}", f"train.steps={steps}"]
        return pretrain(load_config(PretrainConfig, None, TINY_PRETRAIN_OVERRIDES + overrides))

    first = run(3)
    return run_dir, first.history, run(5).model_dir


@pytest.fixture(scope="session")
def tiny_samples(tiny_pretrained):
    """3 samples per class (12 in all) from the tiny model, in RUN_DIR/samples/pretrained."""
    from pathalign_ray.generator.sampling import SampleConfig, sample

    run_dir, _, model_dir = tiny_pretrained
    return sample(
        SampleConfig(model=str(model_dir), out_dir=str(run_dir / "samples" / "pretrained"), n_per_class=3, ddim_steps=2)
    )


@pytest.fixture(scope="session")
def serve_port(ray_cluster):
    """Ray Serve's HTTP proxy on 127.0.0.1 at a free port, shut down at the end of the session."""
    import socket

    from ray import serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def start_moto_server(port: int = 0, bucket: str = ""):
    """A moto S3 server on 127.0.0.1 (a free port unless given), holding an empty `bucket` if named:
    (server, port). moto keeps its objects in this process, so a server started again on the same port
    after server.stop() serves what it held: how the tests take storage away and bring it back."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    if bucket:
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(bucket)  # fmt: skip
    return server, port


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's, in a thread of this process) on 127.0.0.1 at a free port.

    While it runs, the environment points pyarrow, boto3 and processes started from here (writer
    subprocesses, Ray workers started later) at it, with moto's fake credentials; both are undone
    at the end.  Yields the endpoint URL.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no probe of the EC2 instance metadata service
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_buckets = itertools.count()


@pytest.fixture
def bucket(s3_server) -> str:
    """A new empty bucket on the session's S3 server, as an s3:// URI."""
    import pyarrow.fs as pafs

    name = f"test-{os.getpid()}-{next(_buckets)}"
    host = s3_server.split("://", 1)[1]
    admin = pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1", allow_bucket_creation=True)
    admin.create_dir(name)
    return f"s3://{name}"
