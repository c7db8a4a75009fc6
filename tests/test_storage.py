"""Storage by URI (pathalign_ray.storage) and the feedback store on a real S3-compatible server.

The server is moto's (the `s3_server` session fixture in conftest.py, on 127.0.0.1); each test gets
a bucket of its own (the `bucket` fixture).  Configs check their locations as they load.  The last
test runs Ray Train with its checkpoints on the bucket and a worker killed midway.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import start_moto_server
from test_feedback import (
    _acknowledged,
    _batch_ends,
    _kill_after,
    _start_writer,
    _stop,
    _without_timestamp,
    _writer_record,
)

from pathalign_ray import storage
from pathalign_ray.experts.feedback import FeedbackRecord, FeedbackStore, FeedbackStoreError
from pathalign_ray.storage import StorageError

SHA = hashlib.sha256(b"an image").hexdigest()


def verdict(sample_id: str, expert_id: str = "ann", **kwargs) -> FeedbackRecord:
    fields = {"image_ref": f"samples/{sample_id}.png", "image_sha256": SHA, "declared_class": "blast"}
    return FeedbackRecord(sample_id=sample_id, expert_id=expert_id, **{"verdict": "plausible", **fields, **kwargs})


# ---- locations, no server ----------------------------------------------------------------------


def test_plain_paths_and_file_uris_resolve_to_absolute_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("runs/a")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "runs" / "a")
    assert storage.resolve(f"file://{tmp_path}/b")[1] == str(tmp_path / "b")
    assert storage.ray_storage("runs/a") == (str(tmp_path / "runs" / "a"), None)
    assert not storage.is_uri("runs/a") and not storage.is_uri("file:///x") and storage.is_uri("s3://b/k")
    assert storage.join("s3://bkt/runs/", "r1", "feedback") == "s3://bkt/runs/r1/feedback"
    assert storage.join("runs", "r1") == str(Path("runs", "r1"))


@pytest.mark.parametrize(
    "location, message",
    [
        ("ftp://host/runs", "ftp://host/runs: unknown scheme 'ftp'"),
        ("hdfs://nn/runs", "hdfs://nn/runs: unknown scheme 'hdfs'"),
        ("s3:///runs", "s3:///runs: no bucket"),
        ("file://host/runs", "file://host/runs: a file:// URI has no host"),
    ],
)
def test_bad_locations_are_errors_naming_them(location, message):
    with pytest.raises(StorageError, match=re.escape(message)):
        storage.resolve(location)


def test_local_round_trip_and_download_returns_the_folder_itself(tmp_path):
    storage.write_bytes(tmp_path / "a" / "x.bin", b"x")
    assert storage.read_bytes(f"file://{tmp_path}/a/x.bin") == b"x"
    assert storage.list_files(tmp_path, recursive=True) == ["a/x.bin"] and storage.list_files(tmp_path / "none") == []
    assert storage.download_dir(tmp_path / "a") == tmp_path / "a"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(tmp_path / "missing")


# ---- the S3 server ------------------------------------------------------------------------------


def test_s3_round_trip_list_exists_delete(bucket):
    storage.write_bytes(f"{bucket}/dir/a.bin", b"alpha")
    storage.write_bytes(f"{bucket}/dir/sub/b.bin", b"beta")
    assert storage.read_bytes(f"{bucket}/dir/a.bin") == b"alpha"
    assert storage.list_files(f"{bucket}/dir") == ["a.bin"]
    assert storage.list_files(f"{bucket}/dir", recursive=True) == ["a.bin", "sub/b.bin"]
    assert storage.list_files(f"{bucket}/nothing") == []
    assert storage.exists(f"{bucket}/dir/a.bin") and storage.exists(f"{bucket}/dir")
    assert not storage.exists(f"{bucket}/dir/c.bin")
    storage.delete(f"{bucket}/dir/a.bin")
    storage.delete(f"{bucket}/dir/a.bin")  # a missing object is no error
    assert not storage.exists(f"{bucket}/dir/a.bin")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/dir/a.bin"):
        storage.read_bytes(f"{bucket}/dir/a.bin")


def test_upload_then_download_once_per_node(bucket, tmp_path):
    local = tmp_path / "model"
    (local / "unet").mkdir(parents=True)
    (local / "unet" / "weights.bin").write_bytes(b"w" * 1000)
    (local / "pathalign.json").write_text("{}")
    storage.upload_dir(local, f"{bucket}/models/m1")
    assert storage.list_files(f"{bucket}/models/m1", recursive=True) == ["pathalign.json", "unet/weights.bin"]
    cache = tmp_path / "cache"
    first = storage.download_dir(f"{bucket}/models/m1", cache_dir=cache)
    assert (first / "unet" / "weights.bin").read_bytes() == b"w" * 1000
    (first / "marker").write_text("")  # a second download would not have it
    again = storage.download_dir(f"{bucket}/models/m1/", cache_dir=cache)  # cached: no second download
    assert again == first and (again / "marker").is_file()
    (local / "pathalign.json").write_text('{"version": 2}')
    storage.upload_dir(local, f"{bucket}/models/m1", replace=True)  # written again at the same URI
    newer = storage.download_dir(f"{bucket}/models/m1", cache_dir=cache)
    assert newer != first and (newer / "pathalign.json").read_text() == '{"version": 2}'
    with pytest.raises(FileNotFoundError, match="no files there"):
        storage.download_dir(f"{bucket}/models/none", cache_dir=cache)
    storage.upload_dir(local / "unet", f"{bucket}/flat")  # files only, no subfolder (a reward model)
    assert (storage.download_dir(f"{bucket}/flat", cache_dir=cache) / "weights.bin").read_bytes() == b"w" * 1000
    assert (Path(storage.upload_dir(local / "unet", tmp_path / "new" / "copy")) / "weights.bin").is_file()


def test_output_dir_replaces_a_folder_or_a_prefix_only_when_the_block_succeeds(bucket, tmp_path):
    for target in (tmp_path / "out", f"{bucket}/out"):
        storage.write_bytes(storage.join(target, "old.txt"), b"old")
        with pytest.raises(RuntimeError), storage.output_dir(target) as folder:
            (folder / "new.txt").write_text("new")
            raise RuntimeError("the job failed")
        assert storage.list_files(target) == ["old.txt"]
        with storage.output_dir(target) as folder:
            (folder / "new.txt").write_text("new")
        assert storage.list_files(target) == ["new.txt"]
        assert storage.read_bytes(storage.join(target, "new.txt")) == b"new"
    assert storage.is_empty(f"{bucket}/nothing") and not storage.is_empty(f"{bucket}/out")


def test_a_bucket_that_does_not_exist_is_an_error_naming_it(s3_server):
    uri = "s3://no-such-bucket-here/runs/r1"
    for call in (storage.check_bucket, storage.read_bytes, storage.exists, storage.list_files, storage.ray_storage):
        with pytest.raises(StorageError, match=f"{uri}: .*does not exist"):
            call(uri)
    with pytest.raises(StorageError, match=f"{uri}/feedback: .*does not exist"):
        FeedbackStore(f"{uri}/feedback").append([verdict("s1")])
    from pathalign_ray.cluster import ScaleConfig, trainer_settings

    with pytest.raises(StorageError, match=f"{uri}: .*does not exist"):  # before any Ray worker starts
        trainer_settings(ScaleConfig(), "run", uri, keep_checkpoints=1)


def test_missing_credentials_are_an_error_naming_the_uri(s3_server, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    with pytest.raises(StorageError, match="s3://bkt/runs: no AWS credentials: set AWS_ACCESS_KEY_ID"):
        storage.resolve("s3://bkt/runs")
    with pytest.raises(StorageError, match="s3://bkt/fb: no AWS credentials"):
        FeedbackStore("s3://bkt/fb")


@pytest.fixture(scope="module")
def s3_server_with_auth(s3_server):
    """A second moto server, in a process of its own, that checks every request's credentials."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}  # moto: authenticate from the first request on
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()  # SIGTERM: a process started from a non-interactive shell ignores SIGINT
        server.wait(timeout=10)


def test_refused_credentials_are_an_error_naming_the_uri(s3_server_with_auth, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server_with_auth)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEYTHISSERVERKNOWS")
    uri = "s3://bkt/runs/r1"
    calls = (storage.check_bucket, storage.read_bytes, storage.list_files, lambda u: storage.write_bytes(u, b"x"))
    for call in calls:
        with pytest.raises(StorageError, match=f"{uri}: access denied: the credentials are missing or refused"):
            call(uri)
    with pytest.raises(StorageError, match=f"{uri}/feedback: access denied"):
        FeedbackStore(f"{uri}/feedback").records()
    assert "AKIANOTAKEY" not in str(pytest.raises(StorageError, storage.list_files, uri).value)  # never the key


def test_an_unreachable_endpoint_is_an_error_naming_the_uri_and_endpoint(s3_server, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(
        StorageError, match=f"s3://bkt/x: cannot reach the storage endpoint \\(http://127.0.0.1:{port}\\)"
    ):
        storage.read_bytes("s3://bkt/x")
    assert time.monotonic() - start < 30


def test_a_server_stopped_mid_job_is_an_error_naming_the_uri_and_reads_resume_when_it_is_back(s3_server, monkeypatch):
    server, port = start_moto_server(bucket="stopped")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        uri = "s3://stopped/run/rounds/0/samples"
        for i in range(3):
            storage.write_bytes(f"{uri}/images/{i}.png", b"png %d" % i)
        names = storage.list_files(f"{uri}/images")
        assert storage.read_bytes(f"{uri}/images/{names[0]}") == b"png 0"
        server.stop()  # the job has listed the folder and read one image
        with pytest.raises(StorageError, match=f"{uri}/images/1.png: cannot reach the storage endpoint"):
            storage.read_bytes(f"{uri}/images/{names[1]}")
        server, _ = start_moto_server(port)  # back, with what it held (moto keeps its state in this process)
        assert [storage.read_bytes(f"{uri}/images/{name}") for name in names[1:]] == [b"png 1", b"png 2"]
    finally:
        server.stop()


# ---- configs check their storage locations before Ray starts ------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("run_dir=ftp://host/run", "run_dir: ftp://host/run: unknown scheme 'ftp'"),
        ("reward.data.dataset=s3:///data", "reward.data.dataset: s3:///data: no bucket"),
        ("run_dir=s3://no-such-bucket/run", "run_dir: s3://no-such-bucket/run: bucket 'no-such-bucket' does not exist"),
        ("finetune.scale.num_workers=1", None),  # plain paths: nothing to check
    ],
)
def test_an_align_config_names_the_key_and_the_uri_of_a_bad_location(s3_server, override, message):
    from pathalign_ray.align import AlignConfig
    from pathalign_ray.config import ConfigError, load_config

    if message is None:
        assert load_config(AlignConfig, None, [override]).run_dir == "runs/demo"
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(AlignConfig, None, [override])


def test_a_config_with_a_uri_and_no_credentials_fails_as_it_loads(bucket, monkeypatch, tmp_path):
    from pathalign_ray.config import ConfigError, load_config
    from pathalign_ray.generator.pretrain import PretrainConfig

    config = load_config(PretrainConfig, None, [f"run_dir={bucket}/run", f"data.dataset={bucket}/data"])
    assert config.run_dir == f"{bucket}/run"  # the bucket exists and the credentials are the server's
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    with pytest.raises(ConfigError, match=f"data.dataset: {bucket}/data: no AWS credentials"):
        load_config(PretrainConfig, None, [f"data.dataset={bucket}/data"])


# ---- the feedback store on the bucket -----------------------------------------------------------


def test_feedback_store_on_s3_appends_idempotently_and_compacts(bucket):
    uri = f"{bucket}/run/feedback"
    store = FeedbackStore(uri)
    first, second = verdict("s1", record_id="k1"), verdict("s2", "bob", record_id="k2")
    assert store.append([first, second]).stored == ("k1", "k2")
    assert store.append([first]).duplicates == ("k1",)
    with pytest.raises(ValueError, match="record_id: 'k1' is already stored"):
        store.append([verdict("s1", record_id="k1", verdict="implausible")])
    other = FeedbackStore(uri)  # another process's view: reads the objects
    assert other.append([second, verdict("s3")]).duplicates == ("k2",)
    assert other.records().num_rows == 3 and store.records().equals(other.records())
    names = storage.list_files(uri)
    assert len(names) == 2 and all(n.startswith("fb-") and n.endswith(".parquet") for n in names)
    before = store.records()
    assert store.compact() == 2
    assert len(storage.list_files(uri)) == 1 and FeedbackStore(uri).records().equals(before)


def test_a_foreign_or_truncated_object_is_an_error_naming_it(bucket):
    uri = f"{bucket}/feedback"
    FeedbackStore(uri).append([verdict("s1"), verdict("s2")])
    (name,) = storage.list_files(uri)
    data = storage.read_bytes(f"{uri}/{name}")
    cut = f"{uri}/fb-99999999999999999999-0-cut-00000000.parquet"
    storage.write_bytes(cut, data[: len(data) // 2])
    with pytest.raises(FeedbackStoreError, match=f"{cut}: not a readable"):
        FeedbackStore(uri).records()
    storage.delete(cut)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": [1, 2]}), sink)
    storage.write_bytes(f"{uri}/other.parquet", sink.getvalue().to_pybytes())
    with pytest.raises(FeedbackStoreError, match=f"{uri}/other.parquet: not a feedback file"):
        FeedbackStore(uri).records()
    storage.write_bytes(f"{uri}/notes.txt", b"not parquet")  # other suffixes are not the store's
    storage.delete(f"{uri}/other.parquet")
    assert FeedbackStore(uri).records().num_rows == 2


def test_two_writer_processes_on_s3_one_killed_lose_no_acknowledged_verdict(bucket, tmp_path):
    uri, n, victim = f"{bucket}/feedback", 80, 0
    sides = [tmp_path / f"acks-{k}.txt" for k in range(2)]
    writers = [_start_writer(uri, k, n, sides[k]) for k in range(2)]  # type: ignore[arg-type]
    try:
        _kill_after(writers[victim], sides[victim], 20)
        assert writers[1].wait(timeout=90) == 0, writers[1].stderr.read()
    finally:
        _stop(writers)
    table = FeedbackStore(uri).records()
    ids = table.column("record_id").to_pylist()
    assert len(ids) == len(set(ids))
    acked = [_acknowledged(side) for side in sides]
    assert acked[1] == [f"w1-{i:04d}" for i in range(n)]
    killed_acks = len(acked[victim])
    assert 20 <= killed_acks < n, "the kill did not land midway"
    stored_by_victim = sorted(i for i in ids if i.startswith("w0-"))
    durable = len(stored_by_victim)
    assert stored_by_victim == [f"w0-{i:04d}" for i in range(durable)]  # every acknowledged one, in order
    assert durable == killed_acks or (durable in _batch_ends(n) and 0 < durable - killed_acks <= 4)
    for row in table.to_pylist():
        writer, i = row["record_id"][1:].split("-")
        assert _without_timestamp(row) == _without_timestamp(_writer_record(int(writer), int(i)).to_row())


# ---- Ray Train with its checkpoints on the bucket -------------------------------------------------


@pytest.mark.ray
def test_ray_train_checkpoints_go_to_the_bucket_and_a_killed_worker_resumes_from_them(
    s3_server, bucket, ray_cluster, tmp_path
):
    from ray.train.torch import TorchTrainer

    from pathalign_ray.cluster import ScaleConfig, trainer_settings

    def count_steps(config: dict) -> None:
        """Three steps, each with a checkpoint; the first worker dies after step 1 (nested: pickled by value)."""
        import tempfile
        import time

        import ray.train

        start = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:  # downloaded from the bucket
                start = int((Path(folder) / "step.txt").read_text())
        for step in range(start + 1, 4):
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "step.txt").write_text(str(step))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
                ray.train.report({"step": step, "resumed_at": start}, checkpoint=checkpoint)
            if step == 1 and not Path(config["killed"]).exists():
                Path(config["killed"]).touch()
                time.sleep(2)  # the controller registers the reported checkpoint
                os._exit(1)  # the worker process dies, as on a lost node

    settings = trainer_settings(ScaleConfig(num_workers=1, zero_stage=0, max_failures=1), "steps", f"{bucket}/runs", 1)
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")}
    settings["run_config"].worker_runtime_env["env_vars"].update(env)  # moto's fake keys, for the workers
    result = TorchTrainer(count_steps, train_loop_config={"killed": str(tmp_path / "killed")}, **settings).fit()
    assert (tmp_path / "killed").exists(), "the worker was not killed"
    assert result.metrics == {"step": 3, "resumed_at": 1}  # the new worker resumed from the bucket's checkpoint
    assert isinstance(result.checkpoint.filesystem, pafs.S3FileSystem)
    assert result.checkpoint.path.startswith(f"{bucket.removeprefix('s3://')}/runs/steps/checkpoint_")
    files = storage.list_files(f"{bucket}/runs/steps", recursive=True)
    assert [f for f in files if f.endswith("step.txt")] == [f"{Path(result.checkpoint.path).name}/step.txt"]
    with result.checkpoint.as_directory() as folder:
        assert (Path(folder) / "step.txt").read_text() == "3"
