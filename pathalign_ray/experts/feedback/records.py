"""One expert verdict (FeedbackRecord), validated on construction; the store's table schemas; CSV rows."""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pathalign_ray.experts.checklist import CRITERIA

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
_MAX_CSV_ERRORS = 20  # import_csv lists at most this many bad rows


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


def _first_per_record(table: pa.Table) -> pa.Table:
    """Rows sorted by timestamp (stable: ties keep their order), keeping the first row of each record_id."""
    table = table.take(pc.sort_indices(table, sort_keys=[("timestamp", "ascending")]))
    seen: set[str] = set()
    keep = [i for i, rid in enumerate(table.column("record_id").to_pylist()) if not (rid in seen or seen.add(rid))]
    return table if len(keep) == table.num_rows else table.take(keep)


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
