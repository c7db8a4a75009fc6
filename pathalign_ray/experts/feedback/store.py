"""FeedbackStore: append, read and compact expert verdicts (the package docstring gives the guarantees)."""

from __future__ import annotations

import csv
import io
import itertools
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pathalign_ray.experts.checklist import CRITERIA
from pathalign_ray.experts.feedback.files import FILE_PREFIX, TEMP_PREFIX, LocalFiles, batch_files
from pathalign_ray.experts.feedback.records import (
    _CSV_REQUIRED,
    _MAX_CSV_ERRORS,
    CONSENSUS_SCHEMA,
    CSV_COLUMNS,
    SCHEMA,
    AppendResult,
    FeedbackRecord,
    FeedbackStoreError,
    _check_same,
    _first_per_record,
    _record_from_csv,
)


class FeedbackStore:
    """Expert verdicts in immutable parquet files, in a local folder or under an s3:// or gs:// prefix.

    See the package docstring for the guarantees.  `directory` is a Path for a local folder (plain
    path or file:// URI) and the URI string for object storage.
    """

    def __init__(self, directory: str | Path):
        self._files = batch_files(directory)
        self.directory = self._files.directory if isinstance(self._files, LocalFiles) else self._files.uri
        self._lock = threading.RLock()
        self._token = secrets.token_hex(4)
        self._seq = itertools.count()
        self._tables: dict[str, pa.Table] = {}  # final file name -> its rows; files never change once named
        self._ids: set[str] = set()  # every record_id in any file read so far (records are never removed)
        self._samples: dict[str, tuple[str, str]] = {}  # sample_id -> (declared_class, image_sha256)

    # ---- writing -------------------------------------------------------------------------------
    def append(self, records: Iterable[FeedbackRecord]) -> AppendResult:
        """Store `records` as one batch; return after it is durable (fsync'ed file and folder, or PUT done).

        Records whose record_id is already stored, or repeated within the batch,
        are skipped and listed in `duplicates`; one whose id is stored with other
        content (anything but the timestamp) raises ValueError, and then nothing
        is stored.  So is a record whose sample_id is stored with another
        declared_class or image_sha256.  Records without a timestamp get the
        time of this call.
        """
        records = list(records)
        for record in records:
            if not isinstance(record, FeedbackRecord):
                raise TypeError(f"append takes FeedbackRecord objects, got {type(record).__name__}")
        with self._lock:
            self._refresh()
            fresh: dict[str, FeedbackRecord] = {}
            duplicates = []
            samples = dict(self._samples)
            for record in records:
                earlier = fresh.get(record.record_id) or self._stored(record.record_id)
                if earlier is not None:
                    _check_same(earlier, record)
                    duplicates.append(record.record_id)
                    continue
                known = samples.setdefault(record.sample_id, (record.declared_class, record.image_sha256))
                if known != (record.declared_class, record.image_sha256):
                    raise ValueError(
                        f"sample_id: {record.sample_id!r} is stored with declared_class {known[0]!r} and image_sha256 "
                        f"{known[1][:12]}..., not {record.declared_class!r} and {record.image_sha256[:12]}..."
                    )
                fresh[record.record_id] = record
            if fresh:
                now = datetime.now(timezone.utc)
                rows = [{**r.to_row(), "timestamp": r.timestamp or now} for r in fresh.values()]
                table = pa.Table.from_pylist(rows, schema=SCHEMA)
                self._remember(self._write(table), table)
            return AppendResult(stored=tuple(fresh), duplicates=tuple(duplicates))

    def compact(self) -> int:
        """Merge every feedback file present now into one; return how many files were merged.

        The merged file (de-duplicated, sorted by timestamp) is made durable
        before the merged-in files are deleted, so a crash in between leaves
        duplicates on disk that readers drop by record_id.  Files that writers
        add meanwhile are left alone; a second compaction running at once at
        worst leaves two merged files.  Temp files older than an hour (their
        writer died mid-batch) are removed.
        """
        with self._lock:
            self._files.remove_stale_temps()
            names = self._files.list()
            if len(names) < 2:
                return 0
            try:
                fetched = self._files.prefetch([n for n in names if n not in self._tables])
                tables = [self._load(name, fetched.get(name)) for name in names]
            except FileNotFoundError:
                return 0  # another compaction took them first
            merged = _first_per_record(pa.concat_tables(tables))
            self._remember(self._write(merged), merged)
            self._files.delete(names)
            for name in names:
                self._tables.pop(name, None)
            return len(names)

    def import_csv(self, path: str | Path, expert_id: str | None = None) -> AppendResult:
        """Append the verdicts of a CSV file (columns CSV_COLUMNS; see export_csv) as one batch.

        Required columns: sample_id, image_ref, image_sha256, declared_class,
        verdict, and expert_id unless `expert_id` is given (it fills empty
        cells; a different value in a cell is an error).  failed_criteria is
        ';'-joined; round defaults to 0; timestamp (ISO 8601 with offset) to the
        import time; a missing record_id is derived from the row's content, so
        importing the same file twice stores nothing new.  If any row is bad,
        ValueError lists the bad rows by line number and nothing is stored.
        """
        path = Path(path)
        records, errors = [], []
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [cell.strip() for cell in next(reader, [])]
            unknown = [c for c in header if c not in CSV_COLUMNS]
            missing = [c for c in _CSV_REQUIRED if c not in header and not (c == "expert_id" and expert_id)]
            if unknown or missing or len(set(header)) != len(header):
                raise ValueError(
                    f"{path}:1: bad header {header}: unknown columns {unknown}, missing {missing} "
                    f"(columns are {list(CSV_COLUMNS)}, each at most once)"
                )
            while True:
                line = reader.line_num + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:
                    errors.append(f"{path}:{line}: {error}")
                    break
                if not cells:
                    continue
                try:
                    if len(cells) != len(header):
                        raise ValueError(f"expected {len(header)} fields, got {len(cells)}")
                    records.append(_record_from_csv(dict(zip(header, cells)), expert_id))
                except ValueError as error:
                    errors.append(f"{path}:{line}: {error}")
                    if len(errors) >= _MAX_CSV_ERRORS:
                        break
        if errors:
            raise ValueError("bad rows, nothing stored:\n" + "\n".join(errors))
        return self.append(records)

    # ---- reading -------------------------------------------------------------------------------
    def records(self) -> pa.Table:
        """Every stored verdict once (first by timestamp per record_id), sorted by timestamp (SCHEMA)."""
        with self._lock:
            tables = self._refresh()
        return _first_per_record(pa.concat_tables(tables)) if tables else SCHEMA.empty_table()

    def latest(self) -> pa.Table:
        """The latest verdict of each expert on each sample (by timestamp), sorted by timestamp (SCHEMA)."""
        table = self.records()
        keys = zip(table.column("sample_id").to_pylist(), table.column("expert_id").to_pylist())
        last = {key: i for i, key in enumerate(keys)}
        return table.take(pa.array(sorted(last.values()), type=pa.int64()))

    def consensus(self) -> pa.Table:
        """One row per sample_id over `latest()`: votes, majority verdict, ties and failed criteria.

        Columns CONSENSUS_SCHEMA, sorted by sample_id.  On a tie (as many
        plausible as implausible votes) verdict is null and tie is true;
        plausibility = n_plausible / n_votes is defined either way.
        """
        groups: dict[str, list[dict]] = {}
        for row in self.latest().to_pylist():
            groups.setdefault(row["sample_id"], []).append(row)
        out = []
        for sample_id in sorted(groups):
            votes = groups[sample_id]
            first = votes[0]
            for vote in votes[1:]:
                if (vote["declared_class"], vote["image_sha256"]) != (first["declared_class"], first["image_sha256"]):
                    raise FeedbackStoreError(
                        f"sample_id {sample_id!r} is stored with two declared classes or images: "
                        f"{first['declared_class']!r} and {vote['declared_class']!r} (records "
                        f"{first['record_id']} and {vote['record_id']})"
                    )
            n_plausible = sum(vote["verdict"] == "plausible" for vote in votes)
            n_implausible = len(votes) - n_plausible
            failed = Counter(c for vote in votes for c in vote["failed_criteria"])
            ranked = sorted(failed, key=lambda c: (-failed[c], CRITERIA.index(c)))
            out.append(
                {
                    "sample_id": sample_id,
                    "declared_class": first["declared_class"],
                    "image_ref": first["image_ref"],
                    "image_sha256": first["image_sha256"],
                    "n_votes": len(votes),
                    "n_plausible": n_plausible,
                    "plausibility": n_plausible / len(votes),
                    "verdict": None
                    if n_plausible == n_implausible
                    else ("plausible" if n_plausible > n_implausible else "implausible"),
                    "tie": n_plausible == n_implausible,
                    "failed_criteria": [c for c in CRITERIA if c in failed],
                    "top_criterion": ranked[0] if ranked else None,
                }
            )
        return pa.Table.from_pylist(out, schema=CONSENSUS_SCHEMA)

    def judged_by(self, expert_id: str) -> set[str]:
        """The sample_ids that `expert_id` has given any verdict on."""
        table = self.records()
        mine = table.filter(pc.equal(table.column("expert_id"), expert_id))
        return set(mine.column("sample_id").to_pylist())

    def pending(self, sample_ids: Iterable[str], expert_id: str) -> list[str]:
        """The sample_ids, in the given order and without repeats, that `expert_id` has not judged yet."""
        judged = self.judged_by(expert_id)
        return [s for s in dict.fromkeys(sample_ids) if s not in judged]

    def export_csv(self, path: str | Path) -> Path:
        """Write `records()` as CSV (columns CSV_COLUMNS, failed_criteria ';'-joined), atomically."""
        path = Path(path)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        for row in self.records().to_pylist():
            row["failed_criteria"] = ";".join(row["failed_criteria"])
            row["timestamp"] = row["timestamp"].isoformat()
            writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
        temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
        temp.write_text(buffer.getvalue(), encoding="utf-8", newline="")
        os.replace(temp, path)
        return path

    # ---- files ---------------------------------------------------------------------------------
    def _refresh(self) -> list[pa.Table]:
        """The tables of every data file now present, in name order, reading only files not yet cached."""
        for _ in range(100):
            names = self._files.list()
            try:
                fetched = self._files.prefetch([n for n in names if n not in self._tables])
                tables = [self._load(name, fetched.get(name)) for name in names]
            except FileNotFoundError:
                continue  # compacted away after the listing; the next listing shows the merged file
            for gone in self._tables.keys() - set(names):
                del self._tables[gone]
            return tables
        raise FeedbackStoreError(f"{self.directory}: files kept disappearing while reading (100 tries)")

    def _load(self, name: str, data: bytes | None = None) -> pa.Table:
        table = self._tables.get(name)
        if table is None:
            table = _parse(self._files.read(name) if data is None else data, self._files.where(name))
            self._remember(name, table)
        return table

    def _remember(self, name: str, table: pa.Table) -> None:
        self._tables[name] = table
        self._ids.update(table.column("record_id").to_pylist())
        columns = (table.column(c).to_pylist() for c in ("sample_id", "declared_class", "image_sha256"))
        for sample_id, declared_class, sha in zip(*columns):
            self._samples.setdefault(sample_id, (declared_class, sha))

    def _stored(self, record_id: str) -> FeedbackRecord | None:
        if record_id not in self._ids:
            return None
        for table in self._tables.values():
            hit = table.filter(pc.equal(table.column("record_id"), record_id))
            if hit.num_rows:
                return FeedbackRecord.from_row(hit.slice(0, 1).to_pylist()[0])
        return None

    def _write(self, table: pa.Table) -> str:
        """Write `table` as a new data file under a fresh name, durably (see files.py); return the name."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        name = f"{FILE_PREFIX}{time.time_ns():020d}-{os.getpid()}-{self._token}-{next(self._seq):08d}.parquet"
        self._files.write(name, sink.getvalue())
        return name


def _parse(data: bytes, where: str) -> pa.Table:
    """One data file's rows; FeedbackStoreError naming the file or object if it is not a feedback file."""
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()  # a quarter of pq.read_table's time on small files
    except (pa.ArrowException, OSError) as error:
        raise FeedbackStoreError(f"{where}: not a readable parquet file ({error})") from None
    if not table.schema.remove_metadata().equals(SCHEMA):
        raise FeedbackStoreError(f"{where}: not a feedback file: its schema is\n{table.schema}\nexpected\n{SCHEMA}")
    return table
