"""The feedback store's appends/s and the finetuning step's images/s on a local S3 server against a local folder.

Usage: python bench/storage_throughput.py [--appends 300] [--records 3200] [--dir /tmp]
    [--finetune-steps 60] [--checkpoint-every 20] [--rounds 3]

The S3 server is moto's (`python -m moto.server`, in-memory), started here in a process of its own on
127.0.0.1 and stopped at the end; the store reaches it through pathalign_ray.storage (pyarrow's S3
client), as a job on the cluster reaches its bucket.  Figures, per backend: appends/s and records/s
with batches of 1 record (`--appends` of them) and of 32 records (`--records` in all), each append
acknowledged only once durable (local: temp name, fsync, rename, fsync the folder; S3: one PUT),
after listing the store and reading any new objects for the record_id check; then a cold read of
every record.  ratio_s3_over_local is appends/s on S3 divided by appends/s locally.

Finetuning: bench/finetune_throughput.py's Ray Train + DeepSpeed run (32 px model, rwl, batch 16 + 16,
1 worker x 2 threads), a checkpoint every `--checkpoint-every` steps, once with the model, pool, data
set and run folder in a local folder and once with all four on the bucket (the worker downloads the
inputs to its node cache once; checkpoints go to the bucket through Ray Train's storage_path).
images/s is the images of every logged window after the first over their wall time, so the windows
a checkpoint falls in count in full. The two runs alternate for `--rounds` rounds; the ratio is the
median of the per-round ratios (the machine is shared and drifts).
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench_common import write_result
from feedback_store import _batches, _records
from finetune_throughput import LOG_EVERY, benchmark_inputs, ray_history

from pathalign_ray.experts.feedback import FeedbackStore


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_moto(port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{port}") from None
            time.sleep(0.2)


def _append_figures(location: str, batches: list[list]) -> dict:
    store = FeedbackStore(location)
    start = time.perf_counter()
    for batch in batches:
        store.append(batch)
    wall = time.perf_counter() - start
    read_start = time.perf_counter()
    rows = FeedbackStore(location).records().num_rows  # cold: lists and reads every object
    read_s = time.perf_counter() - read_start
    assert rows == sum(len(b) for b in batches), rows
    return {
        "appends": len(batches),
        "appends_per_s": round(len(batches) / wall, 1),
        "records_per_s": round(rows / wall, 1),
        "ms_per_append": round(wall / len(batches) * 1e3, 2),
        "cold_read_s": round(read_s, 3),
    }


def _finetune_images_per_s(inputs: tuple, run_dir: str, args: argparse.Namespace) -> float:
    """Images/s over every logged window after the first, checkpoint windows included."""
    model, dataset, samples = inputs
    batch = 16
    windows = ray_history(model, samples, dataset, args.finetune_steps, batch, run_dir, args.checkpoint_every)[1:]
    return 2 * batch * LOG_EVERY * len(windows) / sum(row["step_time_s"] * LOG_EVERY for row in windows)


def _finetune_figures(root: Path, args: argparse.Namespace) -> dict:
    """Finetuning images/s with everything in a local folder against everything on s3://bench."""
    from pathalign_ray import storage
    from pathalign_ray.cluster import init_ray

    init_ray(num_cpus=2)  # after the AWS_* variables are set: the local cluster's workers inherit them
    model, dataset, samples, _ = benchmark_inputs(root / "inputs")
    local_inputs = (model, dataset, samples)
    s3_inputs = tuple(storage.upload_dir(path, f"s3://bench/inputs/{path.name}") for path in local_inputs)
    rounds = []
    for number in range(args.rounds):
        local = _finetune_images_per_s(local_inputs, str(root / f"finetune-{number}"), args)
        s3 = _finetune_images_per_s(s3_inputs, f"s3://bench/finetune-{number}", args)
        rounds.append({"local": round(local, 2), "s3": round(s3, 2), "ratio_s3_over_local": round(s3 / local, 3)})
        print(f"finetuning round {number + 1}: local {local:.1f}, S3 {s3:.1f} img/s")
    return {
        "model": "configs/pretrain.yaml (32 px), rwl, batch 16 synthetic + 16 real, 1 worker x 2 threads, ZeRO-2",
        "steps": args.finetune_steps,
        "checkpoint_every": args.checkpoint_every,
        "rounds": rounds,
        "local_images_per_s": round(statistics.median(r["local"] for r in rounds), 2),
        "s3_images_per_s": round(statistics.median(r["s3"] for r in rounds), 2),
        "ratio_s3_over_local": round(statistics.median(r["ratio_s3_over_local"] for r in rounds), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=300, help="appends of one record each, per backend")
    parser.add_argument("--records", type=int, default=3200, help="records appended in batches of 32, per backend")
    parser.add_argument("--dir", default=None, help="parent of the local scratch folder (default: the system temp dir)")
    parser.add_argument("--finetune-steps", type=int, default=60, help="steps of each finetuning run")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="steps between finetuning checkpoints")
    parser.add_argument("--rounds", type=int, default=3, help="local/S3 finetuning pairs")
    args = parser.parse_args()

    port = _free_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",  # moto's fake credentials
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    import pyarrow.fs as pafs

    server = _start_moto(port)
    root = Path(tempfile.mkdtemp(prefix="storage-bench-", dir=args.dir))
    try:
        admin = pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
        )
        admin.create_dir("bench")
        records = _records(max(args.appends, args.records))
        figures = {}
        for size, count in ((1, args.appends), (32, args.records)):
            batches = _batches(records[:count], size)
            local = _append_figures(str(root / f"store-{size}"), batches)
            s3 = _append_figures(f"s3://bench/store-{size}", batches)
            figures[f"append_batch_{size}"] = {
                "batch_size": size,
                "local": local,
                "s3": s3,
                "ratio_s3_over_local": round(s3["appends_per_s"] / local["appends_per_s"], 3),
            }
        figures["finetune"] = _finetune_figures(root, args)
        figures["s3_server"] = "moto.server (in-memory, Python) on 127.0.0.1, its own process"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)
    path = write_result("storage_throughput", figures)
    for key, value in figures.items():
        print(key, value)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
