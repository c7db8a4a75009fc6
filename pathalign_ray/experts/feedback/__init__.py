"""The durable store of expert verdicts on synthetic images (the paper's labelling function Gamma).

A pathologist judges one synthetic image against its declared cell type by a
six-item checklist (CRITERIA) and gives a binary verdict: plausible or
implausible.  Each verdict is one FeedbackRecord; a FeedbackStore keeps them
in a local directory (by convention RUN/feedback/) or under an object-storage
prefix (s3://bucket/RUN/feedback, gs://...):

    DIR/fb-<time_ns>-<pid>-<token>-<seq>.parquet   one file per append batch, never rewritten
    DIR/.tmp-fb-....parquet                          a batch being written (local only); readers ignore it

Guarantees:
- Append-only and crash-safe.  Locally a batch is serialised in memory,
  written to a temporary name in DIR, fsync'ed, renamed to its final name and
  DIR is fsync'ed; on object storage it is one PUT of the whole object (atomic,
  so no temporary name).  Only then does `append` return (the acknowledgement).
  A writer killed at any instant leaves every acknowledged batch readable and
  no half batch: a batch is all of one final file or nothing.
- Several writer processes at once.  File names are unique per writer
  (time, pid, a random token per store object, a sequence number) and no file
  is ever changed after it is written, so writers never touch each other's files.
- Idempotent.  `record_id` is the idempotency key: appending a record whose id
  is stored stores nothing (and raises if the content differs).  Two writers
  racing on one id may both store it; every reader keeps only the first
  (earliest timestamp), so no id is ever seen twice.
- Strict reading.  Every `*.parquet` in DIR that does not start with "." must
  be a feedback file: a truncated or foreign file raises FeedbackStoreError
  naming it (its path or URI), rather than silently dropping verdicts.

A store object caches the rows of the files it has read (they are immutable)
and is safe to share between threads; different processes each open their own.

Modules: records (FeedbackRecord, the schemas, CSV rows), files (the local and
object-storage backends), store (FeedbackStore).
"""

from pathalign_ray.experts.feedback.records import (
    CONSENSUS_SCHEMA,
    CSV_COLUMNS,
    MAX_ID_CHARS,
    MAX_NOTE_CHARS,
    SCHEMA,
    VERDICTS,
    AppendResult,
    FeedbackRecord,
    FeedbackStoreError,
)
from pathalign_ray.experts.feedback.store import FeedbackStore

__all__ = [
    "CONSENSUS_SCHEMA",
    "CSV_COLUMNS",
    "MAX_ID_CHARS",
    "MAX_NOTE_CHARS",
    "SCHEMA",
    "VERDICTS",
    "AppendResult",
    "FeedbackRecord",
    "FeedbackStore",
    "FeedbackStoreError",
]
