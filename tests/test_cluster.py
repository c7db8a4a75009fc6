"""Ray on a cluster: the launcher configs against Ray's own schema; jobs sent with `ray job submit` to
a two-node cluster started with `ray start` on this machine, with token authentication on; the tiny
loop with everything on a bucket of the session's S3 server (moto); faults: a job stopped with
`ray job stop` and sent again, a worker node lost mid-run.

Each node has one CPU and each Ray Train worker reserves one, so a 2-worker run puts one worker on
each node, and a run that lost a node waits for a replacement (as an autoscaler would bring).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import TINY_ALIGN_OVERRIDES, TINY_PRETRAIN_OVERRIDES, start_moto_server

from pathalign_ray import storage
from pathalign_ray.local_cluster import LocalCluster

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV = {"excludes": [".git", "bench/results"]}  # as README.md submits jobs
JOB_TIMEOUT_S = 900  # one tiny job: 2.5 min on 2 cores at load 4, 7 min at load 12
TRAIN_GAUGES = ["ray_pathalign_train_images_per_second", "ray_pathalign_train_step_seconds", "ray_pathalign_train_loss"]
# files a run writes into its run_dir: none may land on a node's disk when run_dir is a bucket
RUN_FILES = {"pretrain.yaml", "pretrain_metrics.jsonl", "rounds.jsonl", "round0.yaml", "round0_metrics.jsonl",
             "train_reward.yaml", "demo.json", "report.html", "checkpoint_manager_snapshot.json"}  # fmt: skip


def test_the_launcher_configs_follow_the_autoscaler_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cloud, local = (yaml.safe_load((ROOT / name).read_text()) for name in ("cluster.yaml", "cluster-local.yaml"))
    for config in (cloud, local):
        jsonschema.validate(config, schema)
        assert config["file_mounts"]["~/pathalign_ray"] == "."  # the code and configs/ reach every node
        assert any("pip install" in command and "-e ~/pathalign_ray" in command for command in config["setup_commands"])
        starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        assert all("RAY_AUTH_MODE=token" in command for command in starts if " start " in command)
    head = cloud["available_node_types"][cloud["head_node_type"]]
    gpu = cloud["available_node_types"]["worker.gpu"]
    assert head["node_config"]["InstanceType"].startswith("m")  # a CPU instance
    assert gpu["node_config"]["InstanceType"].startswith("g") and 1 <= gpu["min_workers"] <= gpu["max_workers"]
    assert any(
        "torch==" in command and "index-url" not in command for command in cloud["setup_commands"]
    )  # PyPI's CUDA build
    assert local["provider"]["type"] == "local" and local["provider"]["worker_ips"]

    broken = {
        **cloud,
        "available_node_types": {**cloud["available_node_types"], "worker.gpu": {**gpu, "min_worker": 1}},
    }
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(broken, schema)


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head and a worker node, one CPU each, that reach the S3 server (its endpoint and keys in their
    environment, as an instance profile gives a real node); each node's download cache is ROOT/cache.
    Stopped after the module."""
    root = Path(tempfile.mkdtemp(prefix="pa_", dir="/tmp"))  # short: Ray's socket paths under it must fit 107 bytes
    with LocalCluster(root, env={"PATHALIGN_STORAGE_CACHE": str(root / "cache")}) as local:
        local.start_head(num_cpus=1)
        local.add_node(num_cpus=1)
        yield local
    assert not local.alive_nodes()
    shutil.rmtree(root, ignore_errors=True)


def _pretrain(run_dir: str | Path, dataset: str | Path, steps: int, *overrides: str) -> list[str]:
    overrides = [
        *TINY_PRETRAIN_OVERRIDES,
        f"run_dir={run_dir}",
        f"data.dataset={dataset}",
        f"train.steps={steps}",
        *overrides,
    ]
    return ["python", "jobs/pretrain.py", *overrides]


def _submit(cluster: LocalCluster, entrypoint: list[str], job_id: str, wait: bool = True, env: dict | None = None):
    """`ray job submit` from the project's root, as a user does; waits for the end unless wait=False.
    env: environment variables of the job's processes, over the nodes' own."""
    runtime_env = {**RUNTIME_ENV, **({"env_vars": env} if env else {})}
    args = [
        "job",
        "submit",
        f"--submission-id={job_id}",
        f"--working-dir={ROOT}",
        f"--runtime-env-json={json.dumps(runtime_env)}",
    ]
    return cluster.cli(*args, *([] if wait else ["--no-wait"]), "--", *entrypoint, timeout=JOB_TIMEOUT_S, check=False)


def _status(cluster: LocalCluster, job_id: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, STOPPED or FAILED, read from `ray job status` as a user reads it."""
    result = cluster.cli("job", "status", job_id)
    output = result.stdout + result.stderr  # the CLI's logger writes to stderr
    ended = {"succeeded": "SUCCEEDED", "was stopped": "STOPPED", "failed": "FAILED"}
    if match := re.search(rf"Job '{job_id}' (succeeded|was stopped|failed)", output):
        return ended[match.group(1)]
    return re.search(rf"Status for job '{job_id}': (\w+)", output).group(1)


def _history(run_dir: str | Path) -> list[int]:
    text = storage.read_bytes(storage.join(run_dir, "pretrain_metrics.jsonl")).decode()
    return [json.loads(line)["step"] for line in text.splitlines()]


def _wait_for_checkpoint(run_dir: str | Path, timeout: float = JOB_TIMEOUT_S) -> None:
    """Until Ray Train has committed a checkpoint of the run to its snapshot, the one a rerun resumes from.

    A checkpoint folder appears before the commit: a job stopped in between resumes from the
    previous committed checkpoint (here none), as Ray Train intends.
    """
    snapshot = storage.join(run_dir, "pretrain", "checkpoint_manager_snapshot.json")
    deadline = time.time() + timeout
    while not (storage.exists(snapshot) and _committed_checkpoint(snapshot)):
        assert time.time() < deadline, f"no committed checkpoint in {snapshot} after {timeout} s"
        time.sleep(0.2)


def _committed_checkpoint(snapshot: str) -> bool:
    try:
        return json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result") is not None
    except json.JSONDecodeError:  # caught mid-write
        return False


def _scrape(cluster: LocalCluster) -> str:
    """The Prometheus text of every node's metrics export port, joined."""
    pages = []
    for node in cluster.alive_nodes():
        with urllib.request.urlopen(f"http://127.0.0.1:{node.ports['metrics']}/metrics", timeout=10) as response:
            pages.append(response.read().decode())
    return "\n".join(pages)


def _gauges_exported(cluster: LocalCluster) -> bool:
    """Whether a node exports every training gauge of the pretraining job."""
    text = _scrape(cluster)
    return all(
        re.search(rf'^{name}{{[^}}]*job="pretrain"[^}}]*}} [0-9.e+-]+$', text, re.MULTILINE) for name in TRAIN_GAUGES
    )


def _watch(check, stop: threading.Event, seen: threading.Event) -> threading.Thread:
    """Run check() every 0.3 s until stop, setting seen once it holds: rank 0 sets the gauges, and
    Ray drops a gauge two report intervals after its worker is gone, so they are read while the job runs."""

    def loop():
        while not stop.is_set() and not seen.is_set():
            if check():
                seen.set()
            time.sleep(0.3)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _alive_node_ids(cluster: LocalCluster) -> set[str]:
    return {row["node_id"] for row in cluster.node_table() if row["state"] == "ALIVE"}


def _train_worker_nodes(cluster: LocalCluster) -> set[str]:
    """Node IDs of every Ray Train worker the cluster has run, alive or dead, through `ray list actors`."""
    listed = cluster.cli("list", "actors", "--detail", "--format=json", "-f", "class_name=RayTrainWorker").stdout
    return {worker["node_id"] for worker in json.loads(listed)}


def _wait_for_end(cluster: LocalCluster, job_id: str) -> str:
    """The final status of a submitted job, as `ray job status` prints it once the API says it ended."""
    deadline = time.time() + JOB_TIMEOUT_S
    while (status := cluster.job_status(job_id)) in ("PENDING", "RUNNING"):
        assert time.time() < deadline, f"{job_id} still {status} after {JOB_TIMEOUT_S} s"
        time.sleep(1)
    return _status(cluster, job_id)


def _tiny_demo(run_dir: str) -> list[str]:
    """jobs/demo.py on 16 px with its generator pretrained first (configs/demo_pretrain.yaml): data set,
    4 pretraining steps, one round of the align loop, the evaluation. The reward is scored in-process
    (align.serve=null): the two nodes have one CPU each, both held by the Ray Train workers, so a Serve
    replica would leave finetuning waiting for a CPU (tests/test_demo.py covers the served path)."""
    pretrain = [f"pretrain.{override}" for override in TINY_PRETRAIN_OVERRIDES]
    align = ["align.rounds=1", "align.sample.n_per_class=2", "align.sample.ddim_steps=2", "align.simulate.experts=2"]
    align += [f"align.{override}" for override in TINY_ALIGN_OVERRIDES] + ["align.serve=null"]
    evaluate = [
        "evaluate.sampling.n_per_class=2",
        "evaluate.sampling.ddim_steps=2",
        "evaluate.prdc_k=2",
        "evaluate.encoder.steps=20",
        "evaluate.utility.steps=20",
        "evaluate.grid_per_class=2",
    ]
    return [
        "python", "jobs/demo.py", "--config", "configs/demo_pretrain.yaml", f"run_dir={run_dir}", "verbose=true",
        "dataset.image_size=16", "dataset.n_per_class=6", "dataset.classes=[myeloblast,lymphocyte,segmented_neutrophil]",
        *pretrain, "pretrain.train.steps=4", *align, *evaluate,
    ]  # fmt: skip


@pytest.mark.timeout(1200)
def test_the_tiny_align_loop_sent_with_ray_job_submit_runs_on_both_nodes_on_the_bucket(cluster, bucket):
    run = f"{bucket}/run"
    stop, gauges_seen = threading.Event(), threading.Event()
    watcher = _watch(lambda: _gauges_exported(cluster), stop, gauges_seen)
    assert _submit(cluster, _tiny_demo(run), "demo-two-nodes", wait=False).returncode == 0
    status = _wait_for_end(cluster, "demo-two-nodes")
    stop.set()
    watcher.join()
    logs = cluster.cli("job", "logs", "demo-two-nodes").stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert "pretrain step 4/4" in logs and re.search(r"\[align\] round 0: plausibility of its samples \d", logs), logs[
        -3000:
    ]
    assert re.search(r"\[demo\] plausibility \d+\.\d% \[.*\] -> \d+\.\d%", logs), logs[-3000:]
    assert storage.exists(f"{run}/report.html") and json.loads(storage.read_bytes(f"{run}/demo.json"))["labels"] > 0
    assert _history(run) == [1, 2, 3, 4]
    (round_row,) = [json.loads(line) for line in storage.read_bytes(f"{run}/rounds.jsonl").decode().splitlines()]
    assert round_row["labels"] > 0 and round_row["model"] == f"{run}/model"
    assert gauges_seen.is_set(), f"no node exported all of {TRAIN_GAUGES} while the job ran"

    files = set(storage.list_files(run, recursive=True))  # the bucket holds the run
    for model in ("data/dataset.json", "model/unet/config.json", "round0-model/unet/config.json", "reward/reward.json"):
        assert model in files, model
    assert any(f.startswith("feedback/fb-") for f in files) and "rounds/0/samples/manifest.parquet" in files
    for train_run in ("pretrain", "round0", "reward_train"):  # Ray Train's checkpoints
        assert any(f.startswith(f"{train_run}/checkpoint_") for f in files), f"no checkpoint of {train_run}"
    assert "evaluation/metrics.json" in files
    on_disk = [  # in the nodes' folders and the job's working directory; the uploaded code's configs/ shares names
        p for p in cluster.root.rglob("*") if p.name in RUN_FILES and p.parent.name != "configs"
    ]
    assert not on_disk, f"run files on a node's disk: {on_disk}"

    nodes = _alive_node_ids(cluster)
    assert _train_worker_nodes(cluster) == nodes and len(nodes) == 2


@pytest.mark.slow  # bench/faults.py
@pytest.mark.timeout(1500)
def test_a_stopped_job_sent_again_resumes_from_its_checkpoint(cluster, tiny_dataset, tmp_path):
    entrypoint = _pretrain(tmp_path, tiny_dataset, 12, "train.checkpoint_every=3")
    assert _submit(cluster, entrypoint, "stopped", wait=False).returncode == 0
    _wait_for_checkpoint(tmp_path)
    cluster.cli("job", "stop", "stopped", timeout=120)
    assert _status(cluster, "stopped") == "STOPPED"

    again = _submit(cluster, entrypoint, "sent-again")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    resumed_at = int(re.search(r"resumed pretraining at step (\d+)", again.stdout).group(1))
    assert 3 <= resumed_at < 12 and resumed_at % 3 == 0
    assert _history(tmp_path) == list(range(1, 13)), "the resumed run continues the step count"


@pytest.mark.slow  # bench/faults.py
@pytest.mark.timeout(1500)
def test_training_on_the_bucket_survives_the_loss_of_a_worker_node(cluster, bucket, tiny_dataset):
    """The data set, the run and Ray Train's checkpoints on the bucket: the new worker group resumes from there."""
    run, dataset = f"{bucket}/node-lost", storage.upload_dir(tiny_dataset, f"{bucket}/data")
    entrypoint = _pretrain(run, dataset, 30, "train.checkpoint_every=3", "scale.max_failures=3")
    assert _submit(cluster, entrypoint, "node-lost", wait=False).returncode == 0
    _wait_for_checkpoint(run)
    lost = next(node for node in cluster.alive_nodes() if node.name != "head")
    before = _alive_node_ids(cluster)
    cluster.remove_node(lost)
    cluster.add_node(num_cpus=1)  # what an autoscaler would start for min_workers
    replacement = _alive_node_ids(cluster) - before
    status = _wait_for_end(cluster, "node-lost")
    logs = cluster.cli("job", "logs", "node-lost").stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert logs.count("Attempting to start training worker group") >= 2, "the worker group was restarted"
    assert replacement & _train_worker_nodes(cluster), "a worker of the new group ran on the replacement node"
    assert re.search(r"resumed pretraining at step (\d+)", logs), "the new group started from scratch"
    assert _history(run) == list(range(1, 31))
    assert any(f.startswith("pretrain/checkpoint_") for f in storage.list_files(run, recursive=True))


@pytest.mark.slow  # bench/faults.py
@pytest.mark.timeout(1500)
def test_a_job_whose_storage_server_stops_fails_naming_the_uri_and_resumes_once_it_is_back(cluster, tiny_dataset):
    """Its own S3 server (moto keeps the objects in this process across a stop and a start on the same port)."""
    server, port = start_moto_server(bucket="outage")
    try:
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        run = "s3://outage/run"
        entrypoint = _pretrain(run, tiny_dataset, 30, "train.checkpoint_every=3", "scale.max_failures=0")
        assert _submit(cluster, entrypoint, "outage", wait=False, env=env).returncode == 0
        with pytest.MonkeyPatch.context() as patch:  # the test reads the run where the job writes it
            patch.setenv("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
            _wait_for_checkpoint(run)
            server.stop()
            assert _wait_for_end(cluster, "outage") == "FAILED"
            logs = cluster.cli("job", "logs", "outage").stdout
            # an error line names where it could not write: as the URI (this project's) or as pyarrow's key and bucket
            named = re.compile(r"[Ee]rror.*(s3://outage/run|key 'run/[^']*' in bucket 'outage')")
            errors = [line for line in logs.splitlines() if named.search(line)]
            assert errors, logs[-3000:]

            server, _ = start_moto_server(port)  # back, with what it held
            again = _submit(cluster, entrypoint, "outage-again", env=env)
            assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
            assert re.search(r"resumed pretraining at step (\d+)", again.stdout), again.stdout[-3000:]
            assert _history(run) == list(range(1, 31))
    finally:
        server.stop()
