"""The feedback store's appends per second on a local S3 server against a local folder, and their ratio.

Usage: python bench/storage_throughput.py [--appends 300] [--records 3200] [--dir /tmp]

The S3 server is moto's (`python -m moto.server`, in-memory), started here in a process of its own on
127.0.0.1 and stopped at the end; the store reaches it through pathalign_ray.storage (pyarrow's S3
client), as a job on the cluster reaches its bucket.  Figures, per backend: appends/s and records/s
with batches of 1 record (`--appends` of them) and of 32 records (`--records` in all), each append
acknowledged only once durable (local: temp name, fsync, rename, fsync the folder; S3: one PUT),
after listing the store and reading any new objects for the record_id check; then a cold read of
every record.  ratio_s3_over_local is appends/s on S3 divided by appends/s locally.
Finetuning images/s with checkpoints on S3 is not measured here yet (phase 2 of issue #24).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench_common import write_result
from feedback_store import _batches, _records

from pathalign_ray.feedback import FeedbackStore


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=300, help="appends of one record each, per backend")
    parser.add_argument("--records", type=int, default=3200, help="records appended in batches of 32, per backend")
    parser.add_argument("--dir", default=None, help="parent of the local scratch folder (default: the system temp dir)")
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
        figures["s3_server"] = "moto.server (in-memory, Python) on 127.0.0.1, its own process"
        figures["finetune_images_per_s"] = "not measured: phase 2 of issue #24"
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
