"""Appends per second and read times of the feedback store, against plain pyarrow writes without fsync.

Usage: python bench/feedback_store.py [--dir /tmp] [--single-appends 2000] [--records 10000]

Figures:
- append: appends/s and records/s with batches of 1 and of 32 records.  Each durable append writes a
  parquet file to a temp name, fsyncs it, renames it and fsyncs the directory, after listing the
  directory and reading any new files for the record_id check.  Baselines: the same batches written
  with pq.write_table to one file each, no fsync ("plain"); and the store with os.fsync patched out
  ("store_no_fsync"), which separates the cost of the disk flushes from the cost of the bookkeeping.
- read: records() over `--records` verdicts written in batches of 32, then after compact(), from a
  cold store object (reads every file) and a warm one (files cached); baseline: pq.write_table of the
  same rows to one file and pq.read_table of it.  Also the cold read of the batch-1 store (one file
  per verdict) before and after compact().
Read times are medians of 5; the machine may be shared, so CPU times are given too.
"""

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench_common import write_result

from pathalign_ray.experts.checklist import CRITERIA
from pathalign_ray.experts.feedback import SCHEMA, FeedbackRecord, FeedbackStore

EXPERTS = ("ann", "bob", "cat", "dan")


def _records(count: int) -> list[FeedbackRecord]:
    """`count` verdicts: each sample judged by the four experts, a third implausible with two criteria."""
    out = []
    for i in range(count):
        sample, implausible = i // len(EXPERTS), i % 3 == 0
        out.append(
            FeedbackRecord(
                sample_id=f"s{sample:06d}",
                image_ref=f"samples/images/s{sample:06d}.png",
                image_sha256=hashlib.sha256(str(sample).encode()).hexdigest(),
                declared_class=f"class{sample % 23}",
                expert_id=EXPERTS[i % len(EXPERTS)],
                verdict="implausible" if implausible else "plausible",
                failed_criteria=CRITERIA[i % 5 : i % 5 + 2] if implausible else (),
                round=1,
            )
        )
    return out


def _batches(records: list, size: int) -> list[list]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def _timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def _append_all(directory: Path, batches: list[list]) -> FeedbackStore:
    store = FeedbackStore(directory)
    for batch in batches:
        store.append(batch)
    return store


def _plain_writes(directory: Path, batches: list[list]) -> None:
    directory.mkdir(parents=True)
    for i, batch in enumerate(batches):
        now = datetime.now(timezone.utc)
        table = pa.Table.from_pylist([{**r.to_row(), "timestamp": now} for r in batch], schema=SCHEMA)
        pq.write_table(table, directory / f"part-{i:06d}.parquet")


def _append_figures(root: Path, records: list, size: int) -> dict:
    batches = _batches(records, size)
    wall, cpu, _ = _timed(lambda: _append_all(root / f"store-{size}", batches))
    with mock.patch("os.fsync", lambda fd: None):
        no_fsync_wall, _, _ = _timed(lambda: _append_all(root / f"nofsync-{size}", batches))
    plain_wall, _, _ = _timed(lambda: _plain_writes(root / f"plain-{size}", batches))
    return {
        "batch_size": size,
        "appends": len(batches),
        "appends_per_s": round(len(batches) / wall, 1),
        "records_per_s": round(len(records) / wall, 1),
        "cpu_ms_per_append": round(cpu / len(batches) * 1e3, 3),
        "store_no_fsync_appends_per_s": round(len(batches) / no_fsync_wall, 1),
        "plain_appends_per_s": round(len(batches) / plain_wall, 1),
        "slowdown_vs_plain": round(wall / plain_wall, 1),
    }


def _read_s(directory: Path, repeats: int = 5) -> tuple[float, float, float]:
    """Median seconds of records() from a cold store object (wall, CPU), and from a warm one (wall)."""
    cold = [_timed(lambda: FeedbackStore(directory).records())[:2] for _ in range(repeats)]
    store = FeedbackStore(directory)
    store.records()
    warm = statistics.median(_timed(store.records)[0] for _ in range(repeats))
    return statistics.median(w for w, _ in cold), statistics.median(c for _, c in cold), warm


def _read_figures(directory: Path, rows: int) -> dict:
    files_before = len(list(directory.glob("*.parquet")))
    cold, cold_cpu, warm = _read_s(directory)
    compact_s, _, merged = _timed(lambda: FeedbackStore(directory).compact())
    cold_after, cold_cpu_after, warm_after = _read_s(directory)
    assert FeedbackStore(directory).records().num_rows == rows
    return {
        "records": rows,
        "files_before": files_before,
        "cold_read_s_before": round(cold, 4),
        "cold_read_cpu_s_before": round(cold_cpu, 4),
        "warm_read_s_before": round(warm, 4),
        "compact_s": round(compact_s, 4),
        "files_merged": merged,
        "cold_read_s_after": round(cold_after, 4),
        "cold_read_cpu_s_after": round(cold_cpu_after, 4),
        "warm_read_s_after": round(warm_after, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="parent of the scratch directory (default: the system temp dir)")
    parser.add_argument("--single-appends", type=int, default=2000, help="appends of one record each")
    parser.add_argument("--records", type=int, default=10000, help="records appended in batches of 32, then read")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="feedback-bench-", dir=args.dir))
    try:
        records = _records(args.records)
        figures = {
            "append_batch_1": _append_figures(root, records[: args.single_appends], 1),
            "append_batch_32": _append_figures(root, records, 32),
        }
        table = FeedbackStore(root / "store-32").records()
        single = root / "single.parquet"
        write_s = statistics.median(_timed(lambda: pq.write_table(table, single))[0] for _ in range(3))
        read_s = statistics.median(_timed(lambda: pq.read_table(single))[0] for _ in range(5))
        figures["read_batch_32_store"] = _read_figures(root / "store-32", args.records)
        figures["read_batch_1_store"] = _read_figures(root / "store-1", args.single_appends)
        figures["baseline_one_file"] = {
            "records": table.num_rows,
            "write_s": round(write_s, 4),
            "read_s": round(read_s, 4),
            "bytes": single.stat().st_size,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)

    for name, row in figures.items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    print(f"wrote {write_result('feedback_store', figures)}")


if __name__ == "__main__":
    main()
