"""The durable store of expert verdicts on synthetic images (the paper's labelling function Gamma).

A pathologist judges one synthetic image against its declared cell type by a
six-item checklist (CRITERIA) and gives a binary verdict: plausible or
implausible.  Each verdict is one FeedbackRecord; a FeedbackStore keeps them
in a directory (by convention RUN/feedback/):

    DIR/fb-<time_ns>-<pid>-<token>-<seq>.parquet   one file per append batch, never rewritten
    DIR/.tmp-fb-....parquet                          a batch being written; readers ignore it

Guarantees:
- Append-only and crash-safe.  A batch is serialised in memory, written to a
  temporary name in DIR, fsync'ed, renamed to its final name and DIR is
  fsync'ed; only then does `append` return (the acknowledgement).  A writer
  killed at any instant leaves every acknowledged batch readable and no half
  batch: a batch is all of one final file or nothing.
- Several writer processes at once.  File names are unique per writer
  (time, pid, a random token per store object, a sequence number) and no file
  is ever changed after its rename, so writers never touch each other's files.
- Idempotent.  `record_id` is the idempotency key: appending a record whose id
  is stored stores nothing (and raises if the content differs).  Two writers
  racing on one id may both store it; every reader keeps only the first
  (earliest timestamp), so no id is ever seen twice.
- Strict reading.  Every `*.parquet` in DIR that does not start with "." must
  be a feedback file: a truncated or foreign file raises FeedbackStoreError
  naming it, rather than silently dropping verdicts.

A store object caches the rows of the files it has read (they are immutable)
and is safe to share between threads; different processes each open their own.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import numbers
import os
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pathalign_ray.checklist import CRITERIA

VERDICTS = ("plausible", "implausible")
MAX_NOTE_CHARS = 2000  # a free-text remark, not a report
MAX_ID_CHARS = 256  # record_id, sample_id, expert_id, class names, image_ref

SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_ref", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("declared_class", pa.string(), nullable=False),
        pa.field("expert_id", pa.string(), nullable=False),
        pa.field("verdict", pa.string(), nullable=False),
        pa.field("failed_criteria", pa.list_(pa.string()), nullable=False),
        pa.field("believed_class", pa.string()),
        pa.field("note", pa.string()),
        pa.field("round", pa.int64(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
CONSENSUS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("declared_class", pa.string()),
        ("image_ref", pa.string()),
        ("image_sha256", pa.string()),
        ("n_votes", pa.int64()),
        ("n_plausible", pa.int64()),
        ("plausibility", pa.float64()),  # n_plausible / n_votes: a soft label for the reward model
        ("verdict", pa.string()),  # the majority verdict; null on a tie
        ("tie", pa.bool_()),
        ("failed_criteria", pa.list_(pa.string())),  # union over the implausible votes, in CRITERIA order
        ("top_criterion", pa.string()),  # most often failed; ties go to the earlier one in CRITERIA; null if none
    ]
)
CSV_COLUMNS = tuple(SCHEMA.names)
_CSV_REQUIRED = ("sample_id", "image_ref", "image_sha256", "declared_class", "expert_id", "verdict")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_PREFIX = "fb-"
_TEMP_PREFIX = ".tmp-"
_STALE_TEMP_S = 3600.0  # compact() removes temp files older than this: their writer died mid-batch
_MAX_CSV_ERRORS = 20


class FeedbackStoreError(Exception):
    """A file in the store that is not a readable feedback file, or stored rows that contradict each other."""


@dataclass(frozen=True)
class FeedbackRecord:
    """One expert's verdict on one synthetic image, judged against its declared class.

    Validated on construction: a bad value raises ValueError naming the field
    and the value.  failed_criteria is normalised to CRITERIA order without
    repeats; empty optional strings become None.
    """

    sample_id: str  # one (image, declared class) pair; every verdict on it shares image_sha256 and declared_class
    image_ref: str  # path relative to the run directory, or a URI
    image_sha256: str  # hex digest of the image file's bytes, as the expert saw them
    declared_class: str  # the cell type the generator was asked for
    expert_id: str
    verdict: str  # "plausible" | "implausible"
    failed_criteria: tuple[str, ...] = ()  # checklist items the image fails; only with "implausible"
    believed_class: str | None = None  # the cell type the expert sees instead, if any
    note: str | None = None  # free text, at most MAX_NOTE_CHARS
    round: int = 0  # feedback round (0: before any finetuning)
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # idempotency key
    timestamp: datetime | None = None  # UTC; set by the store on append unless given (CSV import)

    def __post_init__(self) -> None:
        for name in ("record_id", "sample_id", "image_ref", "declared_class", "expert_id"):
            _check_name(name, getattr(self, name))
        sha = self.image_sha256
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
            raise ValueError(f"image_sha256: expected 64 hex digits, got {sha!r}")
        object.__setattr__(self, "image_sha256", sha.lower())
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict: expected one of {VERDICTS}, got {self.verdict!r}")
        object.__setattr__(self, "failed_criteria", _criteria(self.failed_criteria))
        if self.verdict == "plausible" and self.failed_criteria:
            raise ValueError(f"failed_criteria: a plausible verdict fails no criterion, got {self.failed_criteria!r}")
        for name in ("believed_class", "note"):
            value = getattr(self, name)
            if value == "":
                object.__setattr__(self, name, None)
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"{name}: expected a string or None, got {value!r}")
        if self.believed_class is not None:
            _check_name("believed_class", self.believed_class)
            if self.verdict == "plausible" and self.believed_class != self.declared_class:
                raise ValueError(
                    f"believed_class: a plausible {self.declared_class!r} cannot be believed to be "
                    f"{self.believed_class!r}"
                )
        if self.note is not None and len(self.note) > MAX_NOTE_CHARS:
            raise ValueError(f"note: at most {MAX_NOTE_CHARS} characters, got {len(self.note)}")
        if isinstance(self.round, bool) or not isinstance(self.round, numbers.Integral) or self.round < 0:
            raise ValueError(f"round: expected an integer >= 0, got {self.round!r}")
        object.__setattr__(self, "round", int(self.round))
        if self.timestamp is not None:
            if not isinstance(self.timestamp, datetime) or self.timestamp.utcoffset() is None:
                raise ValueError(f"timestamp: expected a timezone-aware datetime, got {self.timestamp!r}")
            object.__setattr__(self, "timestamp", self.timestamp.astimezone(timezone.utc))

    def to_row(self) -> dict:
        row = dataclasses.asdict(self)
        row["failed_criteria"] = list(self.failed_criteria)
        return row

    @classmethod
    def from_row(cls, row: dict) -> FeedbackRecord:
        """A record from one row of `FeedbackStore.records()` (a dict of SCHEMA's columns)."""
        return cls(**{**row, "failed_criteria": tuple(row["failed_criteria"] or ())})


@dataclass(frozen=True)
class AppendResult:
    stored: tuple[str, ...]  # record_ids written by this call, durable on return
    duplicates: tuple[str, ...]  # record_ids already stored (or repeated in the batch): nothing written for them


class FeedbackStore:
    """Expert verdicts in a directory of immutable parquet files; see the module docstring."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._lock = threading.RLock()
        self._token = secrets.token_hex(4)
        self._seq = itertools.count()
        self._tables: dict[str, pa.Table] = {}  # final file name -> its rows; files never change once named
        self._ids: set[str] = set()  # every record_id in any file read so far (records are never removed)
        self._samples: dict[str, tuple[str, str]] = {}  # sample_id -> (declared_class, image_sha256)

    # ---- writing -------------------------------------------------------------------------------
    def append(self, records: Iterable[FeedbackRecord]) -> AppendResult:
        """Store `records` as one batch; return after it is durable (fsync'ed file and directory).

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
            self._remove_stale_temps()
            names = self._list()
            if len(names) < 2:
                return 0
            try:
                tables = [self._load(name) for name in names]
            except FileNotFoundError:
                return 0  # another compaction took them first
            merged = _first_per_record(pa.concat_tables(tables))
            self._remember(self._write(merged), merged)
            for name in names:
                try:
                    os.unlink(self.directory / name)
                except FileNotFoundError:
                    pass
                self._tables.pop(name, None)
            _fsync_dir(self.directory)
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
        temp = path.with_name(f"{_TEMP_PREFIX}{path.name}.{os.getpid()}")
        temp.write_text(buffer.getvalue(), encoding="utf-8", newline="")
        os.replace(temp, path)
        return path

    # ---- files ---------------------------------------------------------------------------------
    def _list(self) -> list[str]:
        """Final names of the data files now in the directory, oldest first; temp and hidden files excluded."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".parquet") and not n.startswith("."))

    def _refresh(self) -> list[pa.Table]:
        """The tables of every data file now present, in name order, reading only files not yet cached."""
        for _ in range(100):
            names = self._list()
            try:
                tables = [self._load(name) for name in names]
            except FileNotFoundError:
                continue  # compacted away after the listing; the next listing shows the merged file
            for gone in self._tables.keys() - set(names):
                del self._tables[gone]
            return tables
        raise FeedbackStoreError(f"{self.directory}: files kept disappearing while reading (100 tries)")

    def _load(self, name: str) -> pa.Table:
        table = self._tables.get(name)
        if table is None:
            table = _read_file(self.directory / name)
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
        """Write `table` as a new data file, durably: temp name, fsync, rename, fsync the directory."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = memoryview(sink.getvalue())
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.directory.parent)
        name = f"{_FILE_PREFIX}{time.time_ns():020d}-{os.getpid()}-{self._token}-{next(self._seq):08d}.parquet"
        temp = self.directory / f"{_TEMP_PREFIX}{name}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(temp, self.directory / name)
        _fsync_dir(self.directory)
        return name

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - _STALE_TEMP_S
        for temp in self.directory.glob(f"{_TEMP_PREFIX}*"):
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()
            except FileNotFoundError:
                pass


def _read_file(path: Path) -> pa.Table:
    """One data file's rows; FileNotFoundError if it vanished, FeedbackStoreError naming it if it is not ours."""
    with open(path, "rb") as file:  # once open, a concurrent unlink no longer matters
        data = file.read()
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()  # a quarter of pq.read_table's time on small files
    except (pa.ArrowException, OSError) as error:
        raise FeedbackStoreError(f"{path}: not a readable parquet file ({error})") from None
    if not table.schema.remove_metadata().equals(SCHEMA):
        raise FeedbackStoreError(f"{path}: not a feedback file: its schema is\n{table.schema}\nexpected\n{SCHEMA}")
    return table


def _first_per_record(table: pa.Table) -> pa.Table:
    """Rows sorted by timestamp (stable: ties keep their order), keeping the first row of each record_id."""
    table = table.take(pc.sort_indices(table, sort_keys=[("timestamp", "ascending")]))
    seen: set[str] = set()
    keep = [i for i, rid in enumerate(table.column("record_id").to_pylist()) if not (rid in seen or seen.add(rid))]
    return table if len(keep) == table.num_rows else table.take(keep)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
    if value != value.strip():
        raise ValueError(f"{name}: leading or trailing whitespace in {value!r}")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"{name}: at most {MAX_ID_CHARS} characters, got {len(value)} ({value[:40]!r}...)")


def _criteria(values: object) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValueError(f"failed_criteria: expected a list of criteria, got {values!r}")
    values = list(values)
    for value in values:
        if value not in CRITERIA:
            raise ValueError(f"failed_criteria: unknown criterion {value!r} (the criteria are {', '.join(CRITERIA)})")
    return tuple(c for c in CRITERIA if c in values)


def _check_same(stored: FeedbackRecord, new: FeedbackRecord) -> None:
    """An idempotent retry repeats the content; a reused record_id with other content is a caller's bug."""
    for f in dataclasses.fields(FeedbackRecord):
        if f.name != "timestamp" and getattr(stored, f.name) != getattr(new, f.name):
            raise ValueError(
                f"record_id: {new.record_id!r} is already stored with {f.name}={getattr(stored, f.name)!r}, "
                f"not {getattr(new, f.name)!r}; nothing stored"
            )


def _record_from_csv(row: dict[str, str], expert_id: str | None) -> FeedbackRecord:
    """One CSV row to a record; the note keeps its spaces, every other cell is stripped."""
    cells = {k: (v if k == "note" else v.strip()) for k, v in row.items()}
    if expert_id:
        if cells.get("expert_id") and cells["expert_id"] != expert_id:
            raise ValueError(f"expert_id: the row says {cells['expert_id']!r}, the import says {expert_id!r}")
        cells["expert_id"] = expert_id
    for name in _CSV_REQUIRED:
        if not cells.get(name):
            raise ValueError(f"{name}: empty")
    fields = {name: cells[name] for name in _CSV_REQUIRED}
    fields["failed_criteria"] = tuple(c.strip() for c in cells.get("failed_criteria", "").split(";") if c.strip())
    fields["believed_class"] = cells.get("believed_class") or None
    fields["note"] = cells.get("note") or None
    round_cell = cells.get("round") or "0"
    try:
        fields["round"] = int(round_cell)
    except ValueError:
        raise ValueError(f"round: expected an integer >= 0, got {round_cell!r}") from None
    if cells.get("timestamp"):
        try:
            fields["timestamp"] = datetime.fromisoformat(cells["timestamp"])
        except ValueError:
            raise ValueError(f"timestamp: expected ISO 8601, got {cells['timestamp']!r}") from None
    record = FeedbackRecord(**fields)  # validates
    if cells.get("record_id"):
        return dataclasses.replace(record, record_id=cells["record_id"])
    content = [record.sample_id, record.image_sha256, record.declared_class, record.expert_id, record.verdict]
    content += [";".join(record.failed_criteria), record.believed_class or "", record.note or "", str(record.round)]
    digest = hashlib.sha256("\x1f".join(content).encode()).hexdigest()[:32]
    return dataclasses.replace(record, record_id=f"csv-{digest}")
