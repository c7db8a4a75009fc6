"""The feedback store: validation, idempotency, the derived views, compaction, CSV, corrupt files, and durability
under several writer processes, one of them killed with SIGKILL.

Run as a script (`python tests/test_feedback.py writer DIR K N SIDE_FILE`) this file is the writer process of
the multi-process tests: it appends N known verdicts and, after each append returns, writes the acknowledged
record_ids to SIDE_FILE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pathalign_ray.experts.checklist import CRITERIA
from pathalign_ray.experts.feedback import FeedbackRecord, FeedbackStore, FeedbackStoreError

SHA = hashlib.sha256(b"an image").hexdigest()
BATCH_SIZES = (1, 2, 3, 4)  # writers cycle through these, so the batch boundaries are known


def verdict(sample_id="s1", expert_id="ann", verdict="plausible", **kwargs) -> FeedbackRecord:
    fields = {"image_ref": f"samples/{sample_id}.png", "image_sha256": SHA, "declared_class": "blast"}
    return FeedbackRecord(sample_id=sample_id, expert_id=expert_id, verdict=verdict, **{**fields, **kwargs})


def _writer_record(writer: int, i: int) -> FeedbackRecord:
    """The i-th verdict of writer `writer`: content known in advance, so a test can check every stored row."""
    implausible = i % 3 == 0
    return FeedbackRecord(
        record_id=f"w{writer}-{i:04d}",
        sample_id=f"w{writer}-s{i:04d}",
        image_ref=f"samples/w{writer}/{i:04d}.png",
        image_sha256=hashlib.sha256(f"{writer}/{i}".encode()).hexdigest(),
        declared_class=f"class{i % 5}",
        expert_id=f"expert{writer}",
        verdict="implausible" if implausible else "plausible",
        failed_criteria=CRITERIA[i % 6 : i % 6 + 2] if implausible else (),
        note=f"note {i}, with a comma" if i % 2 else None,
        round=i % 4,
    )


def _batch_ends(n: int) -> list[int]:
    ends, i = [], 0
    for size in itertools.cycle(BATCH_SIZES):
        i = min(i + size, n)
        ends.append(i)
        if i == n:
            return ends


def _writer_main(directory: str, writer: int, n: int, side_file: str) -> None:
    store = FeedbackStore(directory)
    start = 0
    with open(side_file, "a") as side:
        for end in _batch_ends(n):
            batch = [_writer_record(writer, i) for i in range(start, end)]
            result = store.append(batch)
            assert result.stored == tuple(r.record_id for r in batch), result
            side.write("".join(f"{r.record_id}\n" for r in batch))  # acknowledged: append has returned
            side.flush()
            start = end


def _start_writer(directory: Path, writer: int, n: int, side_file: Path) -> subprocess.Popen:
    command = [sys.executable, __file__, "writer", str(directory), str(writer), str(n), str(side_file)]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


def _acknowledged(side_file: Path) -> list[str]:
    text = side_file.read_text() if side_file.exists() else ""
    return text.split("\n")[:-1]  # complete lines only


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()  # only the processes this test started, by their pid
            process.wait()


def _without_timestamp(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "timestamp"}


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failed_criteria": ["granules", "mitochondria"]}, "failed_criteria: unknown criterion 'mitochondria'"),
        ({"verdict": "maybe"}, "verdict: .* got 'maybe'"),
        ({"sample_id": ""}, "sample_id: expected a non-empty string, got ''"),
        ({"expert_id": "  "}, "expert_id: expected a non-empty string, got '  '"),
        ({"expert_id": " ann"}, "expert_id: leading or trailing whitespace in ' ann'"),
        ({"round": -1}, "round: expected an integer >= 0, got -1"),
        ({"round": True}, "round: expected an integer >= 0, got True"),
        ({"image_sha256": "abc"}, "image_sha256: expected 64 hex digits, got 'abc'"),
        ({"verdict": "plausible", "failed_criteria": ["granules"]}, "failed_criteria: a plausible verdict"),
        ({"failed_criteria": "granules"}, "failed_criteria: expected a list of criteria, got 'granules'"),
        ({"verdict": "plausible", "believed_class": "myelocyte"}, "believed_class: a plausible 'blast'"),
        ({"note": "x" * 2001}, "note: at most 2000 characters, got 2001"),
        ({"timestamp": datetime(2024, 1, 1)}, "timestamp: expected a timezone-aware datetime"),
        ({"record_id": ""}, "record_id: expected a non-empty string"),
    ],
)
def test_bad_values_raise_naming_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        verdict(**{"verdict": "implausible", **kwargs})


def test_records_are_normalised():
    record = verdict(
        verdict="implausible", failed_criteria=["granules", "cell_size", "granules"], note="", believed_class="",
        image_sha256=SHA.upper(), timestamp=datetime(2024, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))),
    )  # fmt: skip
    assert record.failed_criteria == ("cell_size", "granules")
    assert record.note is None and record.believed_class is None
    assert record.image_sha256 == SHA
    assert record.timestamp == datetime(2024, 1, 1, tzinfo=timezone.utc) and record.timestamp.tzinfo == timezone.utc
    assert len(verdict().record_id) == 32 and verdict().record_id != verdict().record_id


# ---- appending and idempotency -----------------------------------------------------------------


def test_append_is_idempotent_by_record_id(tmp_path):
    store = FeedbackStore(tmp_path / "feedback")
    first, second = verdict("s1"), verdict("s2")
    assert store.append([first, second, first]).duplicates == (first.record_id,)
    result = store.append([second, verdict("s3", record_id="retry-key")])
    assert result.duplicates == (second.record_id,) and result.stored == ("retry-key",)
    # A fresh store object (another process) knows the stored ids from the files.
    again = FeedbackStore(tmp_path / "feedback").append([verdict("s3", record_id="retry-key")])
    assert again.stored == () and again.duplicates == ("retry-key",)
    assert store.records().num_rows == 3
    assert store.append([]).stored == ()


def test_a_reused_record_id_with_other_content_is_refused_and_nothing_is_stored(tmp_path):
    store = FeedbackStore(tmp_path)
    store.append([verdict("s1", record_id="k1")])
    with pytest.raises(ValueError, match="record_id: 'k1' is already stored with verdict='plausible'"):
        store.append([verdict("s2"), verdict("s1", record_id="k1", verdict="implausible")])
    assert store.records().column("sample_id").to_pylist() == ["s1"]


def test_a_sample_keeps_its_declared_class_and_image(tmp_path):
    store = FeedbackStore(tmp_path)
    store.append([verdict("s1")])
    with pytest.raises(ValueError, match="sample_id: 's1' is stored with declared_class 'blast'"):
        store.append([verdict("s1", expert_id="bob", declared_class="neutrophil")])
    with pytest.raises(ValueError, match="sample_id: 's1'"):
        store.append([verdict("s1", expert_id="bob", image_sha256="0" * 64)])


def test_readers_drop_a_record_id_stored_twice_by_racing_writers(tmp_path):
    store = FeedbackStore(tmp_path)
    store.append([verdict("s1", record_id="k1")])
    store.append([verdict("s2", record_id="k2")])
    (original,) = [n for n in os.listdir(tmp_path) if n.endswith(".parquet")][:1]
    shutil.copy(tmp_path / original, tmp_path / "fb-99999999999999999999-0-copy-00000000.parquet")
    fresh = FeedbackStore(tmp_path).records()
    assert fresh.column("record_id").to_pylist() == ["k1", "k2"]


def test_records_are_sorted_by_timestamp_and_round_trip_as_records(tmp_path):
    store = FeedbackStore(tmp_path)
    late = verdict("s1", timestamp=datetime(2030, 1, 1, tzinfo=timezone.utc))
    early = verdict("s2", verdict="implausible", failed_criteria=["chromatin"], note="dense", round=2)
    store.append([late])
    store.append([early])
    rows = store.records().to_pylist()
    assert [r["sample_id"] for r in rows] == ["s2", "s1"]
    assert FeedbackRecord.from_row(rows[0]) == dataclasses.replace(early, timestamp=rows[0]["timestamp"])


# ---- derived views -----------------------------------------------------------------------------


def test_latest_consensus_and_the_labelling_queue(tmp_path):
    store = FeedbackStore(tmp_path)
    store.append([verdict("s1", "ann", "implausible", failed_criteria=["granules"]), verdict("s2", "ann")])
    store.append([verdict("s1", "ann", "plausible")])  # ann changes her mind on s1
    store.append(
        [
            verdict("s1", "bob", "implausible", failed_criteria=["granules", "chromatin"]),
            verdict("s2", "bob", "implausible", failed_criteria=["nucleus_shape"], believed_class="myelocyte"),
            verdict("s2", "cat", "implausible", failed_criteria=["nucleus_shape", "granules"]),
        ]
    )
    latest = store.latest()
    assert latest.num_rows == 5
    pairs = {(r["sample_id"], r["expert_id"]): r["verdict"] for r in latest.to_pylist()}
    assert pairs[("s1", "ann")] == "plausible"

    s1, s2 = store.consensus().to_pylist()
    assert (s1["sample_id"], s1["n_votes"], s1["n_plausible"], s1["tie"], s1["verdict"]) == ("s1", 2, 1, True, None)
    assert s1["plausibility"] == 0.5
    assert s1["failed_criteria"] == ["chromatin", "granules"]  # union, in CRITERIA order
    assert s1["top_criterion"] == "chromatin"  # a tie between the two: the earlier criterion
    assert (s2["n_votes"], s2["n_plausible"], s2["tie"], s2["verdict"]) == (3, 1, False, "implausible")
    assert s2["top_criterion"] == "nucleus_shape" and s2["declared_class"] == "blast"

    assert store.judged_by("ann") == {"s1", "s2"} and store.judged_by("cat") == {"s2"}
    assert store.pending(["s3", "s1", "s2", "s3"], "cat") == ["s3", "s1"]


def test_an_empty_or_missing_store_reads_as_empty_tables(tmp_path):
    store = FeedbackStore(tmp_path / "not-yet")
    assert store.records().num_rows == 0 and store.latest().num_rows == 0 and store.consensus().num_rows == 0
    assert store.pending(["s1"], "ann") == ["s1"] and store.compact() == 0


# ---- compaction --------------------------------------------------------------------------------


def _data_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".parquet") and not n.startswith("."))


def test_compact_merges_into_one_file_without_loss_or_duplicates(tmp_path):
    store = FeedbackStore(tmp_path)
    for i in range(30):
        store.append([verdict(f"s{i}", expert) for expert in ("ann", "bob")[: 1 + i % 2]])
    before = store.records()
    assert store.compact() == 30
    assert len(_data_files(tmp_path)) == 1
    assert FeedbackStore(tmp_path).records().equals(before)
    assert store.records().equals(before)
    assert store.compact() == 0


def test_a_crash_between_merge_and_delete_shows_no_duplicates(tmp_path):
    store = FeedbackStore(tmp_path)
    for i in range(5):
        store.append([verdict(f"s{i}")])
    before = store.records()
    saved = {name: (tmp_path / name).read_bytes() for name in _data_files(tmp_path)}
    store.compact()
    for name, data in saved.items():  # as if the compactor died before deleting the merged-in files
        (tmp_path / name).write_bytes(data)
    assert len(_data_files(tmp_path)) == 6
    assert FeedbackStore(tmp_path).records().equals(before)
    assert FeedbackStore(tmp_path).compact() == 6 and FeedbackStore(tmp_path).records().equals(before)


def test_compact_is_safe_while_another_process_appends(tmp_path):
    directory, side, n = tmp_path / "feedback", tmp_path / "acks.txt", 300
    writer = _start_writer(directory, 1, n, side)
    compactor = FeedbackStore(directory)
    compactions = 0
    try:
        while writer.poll() is None:
            compactions += compactor.compact() > 0
            acked = set(_acknowledged(side))
            ids = FeedbackStore(directory).records().column("record_id").to_pylist()  # a cold reader meanwhile
            assert len(ids) == len(set(ids)) and acked <= set(ids)
            time.sleep(0.05)
        assert writer.wait(timeout=60) == 0, writer.stderr.read()
    finally:
        _stop([writer])
    assert compactions >= 2
    table = FeedbackStore(directory).records()
    assert sorted(table.column("record_id").to_pylist()) == sorted(_acknowledged(side)) and table.num_rows == n
    compactor.compact()
    assert len(_data_files(directory)) == 1 and FeedbackStore(directory).records().num_rows == n


# ---- CSV ---------------------------------------------------------------------------------------


def test_csv_round_trip(tmp_path):
    store = FeedbackStore(tmp_path / "a")
    store.append(
        [
            verdict("s1", "ann", "implausible", failed_criteria=["granules", "cell_size"], believed_class="myelocyte"),
            verdict("s2", "ann", note='two lines,\n"quoted", and ümlauts  '),
            verdict("s1", "bob", round=3),
        ]
    )
    store.append([verdict("s3", "bob", "implausible")])
    path = store.export_csv(tmp_path / "verdicts.csv")
    copy = FeedbackStore(tmp_path / "b")
    assert len(copy.import_csv(path).stored) == 4
    assert copy.records().equals(store.records())
    assert copy.import_csv(path).stored == ()  # importing twice stores nothing new


def test_csv_import_of_a_hand_written_file_with_an_expert_id(tmp_path):
    path = tmp_path / "ann.csv"
    path.write_text(
        "sample_id,image_ref,image_sha256,declared_class,verdict,failed_criteria\n"
        f"s1,samples/s1.png,{SHA},blast,implausible,granules; chromatin\n"
        f"s2,samples/s2.png,{SHA},blast,plausible,\n"
        "\n"
    )
    store = FeedbackStore(tmp_path / "feedback")
    assert len(store.import_csv(path, expert_id="ann").stored) == 2
    assert store.import_csv(path, expert_id="ann").stored == ()  # record_ids derive from the content
    rows = store.records().to_pylist()
    assert [(r["expert_id"], r["failed_criteria"], r["round"]) for r in rows] == [
        ("ann", ["chromatin", "granules"], 0),
        ("ann", [], 0),
    ]


def test_csv_bad_rows_are_named_by_line_and_nothing_is_stored(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "sample_id,image_ref,image_sha256,declared_class,expert_id,verdict,failed_criteria,round\n"
        f"s1,a.png,{SHA},blast,ann,plausible,,0\n"
        f"s2,b.png,{SHA},blast,ann,maybe,,0\n"
        f'"s3\nstill s3",c.png,{SHA},blast,ann,implausible,granules;halo,1\n'
        f"s4,d.png,{SHA},blast,,plausible,,0\n"
        f"s5,e.png,{SHA},blast,ann,plausible,,-2\n"
        f"s6,e.png,{SHA},blast,ann,plausible\n"
    )
    store = FeedbackStore(tmp_path / "feedback")
    with pytest.raises(ValueError) as error:
        store.import_csv(path)
    message = str(error.value)
    assert "nothing stored" in message
    assert f"{path}:3: verdict:" in message and "'maybe'" in message
    assert f"{path}:4: failed_criteria: unknown criterion 'halo'" in message
    assert f"{path}:6: expert_id: empty" in message
    assert f"{path}:7: round: expected an integer >= 0, got -2" in message
    assert f"{path}:8: expected 8 fields, got 6" in message
    assert ":2:" not in message
    assert store.records().num_rows == 0 and not (tmp_path / "feedback").exists()
    with pytest.raises(ValueError, match="expert_id: the row says 'ann', the import says 'bob'"):
        store.import_csv(tmp_path / "bad.csv", expert_id="bob")


def test_csv_bad_header_is_line_one(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("sample_id,verdcit\ns1,plausible\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: bad header .*unknown columns \['verdcit'\]"):
        FeedbackStore(tmp_path / "feedback").import_csv(path)


# ---- corrupt and foreign files -----------------------------------------------------------------


def test_a_truncated_data_file_is_an_error_naming_it(tmp_path):
    store = FeedbackStore(tmp_path)
    store.append([verdict("s1")])
    store.append([verdict("s2")])
    victim = tmp_path / _data_files(tmp_path)[1]
    victim.write_bytes(victim.read_bytes()[:-30])
    with pytest.raises(FeedbackStoreError, match=victim.name):
        FeedbackStore(tmp_path).records()
    with pytest.raises(FeedbackStoreError, match=victim.name):
        FeedbackStore(tmp_path).append([verdict("s3")])


def test_a_foreign_parquet_file_is_an_error_naming_it(tmp_path):
    FeedbackStore(tmp_path).append([verdict("s1")])
    pq.write_table(pa.table({"sample_id": ["s9"], "score": [0.5]}), tmp_path / "scores.parquet")
    with pytest.raises(FeedbackStoreError, match="scores.parquet: not a feedback file"):
        FeedbackStore(tmp_path).records()


def test_temp_and_other_files_are_ignored(tmp_path):
    store = FeedbackStore(tmp_path)
    store.append([verdict("s1")])
    (tmp_path / ".tmp-fb-00000000000000000001-1-dead-00000000.parquet").write_bytes(b"PAR1 half a batch")
    (tmp_path / "README.txt").write_text("verdicts live here")
    assert FeedbackStore(tmp_path).records().num_rows == 1
    old = time.time() - 7200
    os.utime(tmp_path / ".tmp-fb-00000000000000000001-1-dead-00000000.parquet", (old, old))
    store.append([verdict("s2")])
    store.compact()  # removes the stale temp file of a dead writer
    assert not list(tmp_path.glob(".tmp-*")) and store.records().num_rows == 2


# ---- durability --------------------------------------------------------------------------------


def _kill_after(writer, side, acknowledged: int) -> None:
    """SIGKILL the writer process once it has acknowledged that many verdicts (within 60 s)."""
    deadline = time.monotonic() + 60
    while len(_acknowledged(side)) < acknowledged:
        assert writer.poll() is None, writer.stderr.read()
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.002)
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=10) == -signal.SIGKILL


def test_four_writer_processes_one_killed_lose_no_acknowledged_verdict(tmp_path):
    directory, n, victim = tmp_path / "feedback", 500, 0
    sides = [tmp_path / f"acks-{k}.txt" for k in range(4)]
    writers = [_start_writer(directory, k, n, sides[k]) for k in range(4)]
    try:
        _kill_after(writers[victim], sides[victim], 120)
        for k in range(1, 4):
            assert writers[k].wait(timeout=60) == 0, writers[k].stderr.read()
    finally:
        _stop(writers)

    table = FeedbackStore(directory).records()  # reads clean: no error
    ids = table.column("record_id").to_pylist()
    assert len(ids) == len(set(ids)), "a verdict shows twice"
    acked = [_acknowledged(side) for side in sides]
    for k in range(1, 4):
        assert acked[k] == [f"w{k}-{i:04d}" for i in range(n)]
    killed_acks = len(acked[victim])
    assert 120 <= killed_acks < n, "the kill did not land midway"
    assert acked[victim] == [f"w{victim}-{i:04d}" for i in range(killed_acks)]
    # Durable but unacknowledged: at most the batch in flight at the kill, and all of it or nothing.
    stored_by_victim = sorted(i for i in ids if i.startswith(f"w{victim}-"))
    durable = len(stored_by_victim)
    assert stored_by_victim == [f"w{victim}-{i:04d}" for i in range(durable)]
    assert durable == killed_acks or (durable in _batch_ends(n) and 0 < durable - killed_acks <= max(BATCH_SIZES))
    assert len(ids) == sum(len(a) for a in acked) + (durable - killed_acks)
    # Every stored row is complete and exactly what its writer appended.
    for row in table.to_pylist():
        writer, i = row["record_id"][1:].split("-")
        assert _without_timestamp(row) == _without_timestamp(_writer_record(int(writer), int(i)).to_row())


if __name__ == "__main__" and sys.argv[1:2] == ["writer"]:
    _writer_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
