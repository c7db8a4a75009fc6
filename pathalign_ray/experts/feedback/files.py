"""Where the feedback store's batch files live: a local folder or a prefix on object storage.

Both hold immutable files named fb-<time_ns>-<pid>-<token>-<seq>.parquet, one per append batch, and
make a written file appear whole or not at all:
- LocalFiles: temp name in the folder, fsync, rename, fsync the folder (a crash leaves a temp file
  that readers ignore and compaction removes after an hour).
- ObjectFiles (s3://, gs://): one PUT of the whole object; a PUT is atomic, so there is no temp name.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from pathalign_ray import storage

FILE_PREFIX = "fb-"
TEMP_PREFIX = ".tmp-"
PREFETCH_THREADS = 16  # concurrent GETs when a reader meets objects it has not read yet
_STALE_TEMP_S = 3600.0  # compact() removes temp files older than this: their writer died mid-batch


def batch_files(location: str | os.PathLike) -> LocalFiles | ObjectFiles:
    """The backend for a store location: ObjectFiles for s3:// and gs:// URIs, LocalFiles otherwise."""
    if storage.is_uri(location):
        return ObjectFiles(str(location))
    if str(location).startswith("file://"):
        return LocalFiles(Path(storage.resolve(location)[1]))
    return LocalFiles(Path(location))


def is_data_name(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith(".")


class LocalFiles:
    """Batch files in a local (or NFS-mounted) folder, written durably with fsync and rename."""

    def __init__(self, directory: Path):
        self.directory = directory

    def where(self, name: str) -> str:
        return str(self.directory / name)

    def list(self) -> list[str]:
        """Final names of the data files now in the folder, oldest first; temp and hidden files excluded."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_data_name(n))

    def read(self, name: str) -> bytes:
        with open(self.directory / name, "rb") as file:  # once open, a concurrent unlink no longer matters
            return file.read()

    def prefetch(self, names: list[str]) -> dict[str, bytes]:
        """Nothing: local files are read one by one as they are needed."""
        return {}

    def write(self, name: str, data: bytes | pa.Buffer) -> None:
        """Write a new file durably: temp name, fsync, rename, fsync the folder."""
        data = memoryview(data)
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.directory.parent)
        temp = self.directory / f"{TEMP_PREFIX}{name}"
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

    def delete(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(self.directory / name)
            except FileNotFoundError:
                pass
        _fsync_dir(self.directory)

    def remove_stale_temps(self) -> None:
        cutoff = time.time() - _STALE_TEMP_S
        for temp in self.directory.glob(f"{TEMP_PREFIX}*"):
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()
            except FileNotFoundError:
                pass


class ObjectFiles:
    """Batch objects under a URI prefix; each is written by one PUT and never changed."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        storage.resolve(self.uri)  # an unknown scheme or missing credentials fail here, naming the URI

    def where(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def list(self) -> list[str]:
        return [n for n in storage.list_files(self.uri) if is_data_name(n)]  # sorted by the store's listing

    def read(self, name: str) -> bytes:
        return storage.read_bytes(self.where(name))  # FileNotFoundError if compacted away meanwhile

    def prefetch(self, names: list[str]) -> dict[str, bytes]:
        """The objects' bytes, up to PREFETCH_THREADS requests at once: one GET each is mostly waiting."""
        if len(names) < 2:
            return {}
        with ThreadPoolExecutor(min(PREFETCH_THREADS, len(names))) as pool:
            return dict(zip(names, pool.map(self.read, names)))  # FileNotFoundError if one was compacted away

    def write(self, name: str, data: bytes | pa.Buffer) -> None:
        storage.write_bytes(self.where(name), data)

    def delete(self, names: list[str]) -> None:
        for name in names:
            storage.delete(self.where(name))

    def remove_stale_temps(self) -> None:
        """Nothing to do: a PUT leaves no temporary object behind."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
