"""Locations as URIs: s3://bucket/key, gs://bucket/key, file:///abs/path or a plain path, on pyarrow.fs.

One small layer, the way Ray Train and Ray Data take their storage: `resolve` turns a location into
(pyarrow filesystem, path on it); the helpers read and write bytes, list, test existence, upload a
local folder and download a folder once per node into a local cache.  Jobs write a folder through
`output_dir` (a local folder renamed, or a scratch folder uploaded, over the location) and read one
through `download_dir` (a local folder as it is, a URI's files once per node).

Endpoint and credentials come from the environment, as boto3 and pyarrow read them:
- S3 endpoint: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (e.g. http://127.0.0.1:9000 for a local
  server); region: AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1 when an endpoint is set.
- S3 credentials: the AWS SDK's default chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN,
  AWS_PROFILE and ~/.aws files, web identity, the container's or the instance profile's role).  They
  are never passed to pyarrow explicitly, so they are neither pickled into Ray tasks nor logged.
- GCS: Google's default credentials (GOOGLE_APPLICATION_CREDENTIALS, the VM's service account);
  STORAGE_EMULATOR_HOST points at an emulator.
Errors are StorageError naming the URI and what is wrong: unknown scheme, no such bucket, no
credentials or credentials refused, endpoint unreachable.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

SCHEMES = ("s3", "gs", "file")
CACHE_DIR = Path.home() / ".cache" / "pathalign_ray" / "storage"  # per node; PATHALIGN_STORAGE_CACHE overrides
CONNECT_TIMEOUT_S = 5.0  # per S3 connection attempt
MAX_ATTEMPTS = 3  # per S3 request, the SDK's standard retry strategy
_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


_DENIED = (  # pyarrow's names for S3's refusals, and S3's own
    "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN", "AccessDenied",
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "HTTP status 403", "credentials",
)  # fmt: skip


class StorageError(OSError):
    """A location that cannot be used; the message names the URI and the reason."""


def is_uri(location: str | os.PathLike) -> bool:
    """True for s3:// and gs:// locations (remote storage); False for plain paths and file:// URIs."""
    return _scheme(location) in ("s3", "gs")


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` with '/'-separated parts appended: a URI stays a URI, a path a path."""
    base = str(location)
    if _scheme(base) is None:
        return str(Path(base, *parts))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a location; plain paths and file:// become absolute local paths."""
    location = str(location)
    scheme = _scheme(location)
    if scheme is None:
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    parsed = urlparse(location)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{location}: a file:// URI has no host (file:///absolute/path)")
        return pafs.LocalFileSystem(), str(Path(parsed.path).resolve())
    if not parsed.netloc:
        raise StorageError(f"{location}: no bucket ({scheme}://bucket/key)")
    path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    return (_s3_filesystem(location, parsed.netloc) if scheme == "s3" else _gcs_filesystem()), path


def ray_storage(location: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig.

    A plain path resolves to an absolute local path and no filesystem; a URI gives the path on the
    bucket and this module's filesystem, which carries the endpoint override to every worker.
    """
    if _scheme(location) in (None, "file"):
        return resolve(location)[1], None
    fs, path = resolve(location)
    check_bucket(location)
    return path, fs


def absolute(location: str | os.PathLike) -> str:
    """A location workers can use from any working directory: a plain path made absolute, a URI as it is."""
    return str(location) if _scheme(location) is not None else str(Path(location).resolve())


def location(value: str | os.PathLike) -> str | Path:
    """A URI as its string, a plain path as a Path: how jobs return where they wrote."""
    return str(value) if _scheme(value) is not None else Path(value)


def check_bucket(location: str | os.PathLike) -> None:
    """Raise StorageError unless the bucket of a URI exists and can be reached; nothing for local paths."""
    if not is_uri(location):
        return
    fs, path = resolve(location)
    with _errors(location):
        if fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound:
            raise StorageError(f"{location}: bucket {path.split('/', 1)[0]!r} does not exist")


def exists(location: str | os.PathLike) -> bool:
    """Whether a file, object or folder is at `location`; a missing bucket is StorageError, not False."""
    fs, path = resolve(location)
    with _errors(location):
        found = fs.get_file_info(path).type != pafs.FileType.NotFound
    if not found:
        check_bucket(location)
    return found


def is_empty(location: str | os.PathLike) -> bool:
    """True when nothing is at `location`, or an empty folder; False for a file or a folder holding anything."""
    fs, path = resolve(location)
    with _errors(location):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            return not fs.get_file_info(pafs.FileSelector(path))
    if kind == pafs.FileType.NotFound:
        check_bucket(location)
    return kind == pafs.FileType.NotFound


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole object or file; FileNotFoundError if it is not there (a missing bucket is StorageError)."""
    fs, path = resolve(location)
    with _errors(location), fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write an object in one request (small objects: a single PUT, visible whole or not at all).

    Local files are written in place, without fsync: callers that need durability do their own.
    """
    fs, path = resolve(location)
    with _errors(location):
        if not is_uri(location):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(data)


def delete(location: str | os.PathLike) -> None:
    """Delete one object or file; a missing one is not an error."""
    fs, path = resolve(location)
    with _errors(location), contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def list_files(location: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Paths relative to `location` of the files under it, sorted; [] if there is nothing there."""
    fs, path = resolve(location)
    with _errors(location):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    if not infos:
        check_bucket(location)  # pyarrow lists a missing bucket as empty
    prefix = path.rstrip("/") + "/"
    return sorted(i.path[len(prefix) :] for i in infos if i.type == pafs.FileType.File)


def delete_dir(location: str | os.PathLike) -> None:
    """Delete a folder, or every object under a prefix; a missing one is not an error."""
    fs, path = resolve(location)
    with _errors(location), contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)


def upload_dir(local_dir: str | os.PathLike, location: str | os.PathLike, replace: bool = False) -> str:
    """Copy a local folder's files to `location` (a URI or path); return `location`.

    replace=True first deletes what is under `location`, so no file of an older version stays
    beside the new ones (on object storage the two steps are not atomic together).
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise NotADirectoryError(f"{local_dir}: not a folder")
    fs, path = resolve(location)
    check_bucket(location)
    if replace:
        delete_dir(location)
    with _errors(location):
        if not is_uri(location):
            fs.create_dir(path, recursive=True)  # copy_files makes the subfolders only
        pafs.copy_files(str(local_dir.resolve()), path, destination_filesystem=fs)
    return str(location)


@contextlib.contextmanager
def output_dir(location: str | os.PathLike) -> Iterator[Path]:
    """A local folder to write a job's output into; when the block ends without an error it replaces `location`.

    A local path: a staging folder beside it, renamed over it (a crash never leaves half a folder).
    A URI: a scratch folder, uploaded over the prefix (upload_dir with replace=True), then removed.
    """
    if is_uri(location):
        check_bucket(location)  # before the job writes anything
        with tempfile.TemporaryDirectory(prefix="pathalign-out-") as scratch:
            yield Path(scratch)
            upload_dir(scratch, location, replace=True)
        return
    target = Path(resolve(location)[1])
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cache_root() -> Path:
    """This node's cache folder for copies of remote files (PATHALIGN_STORAGE_CACHE, else CACHE_DIR)."""
    return Path(os.environ.get("PATHALIGN_STORAGE_CACHE") or CACHE_DIR)


def download_dir(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding the files under `location`, downloaded once per node and kept.

    Plain paths and file:// URIs are returned as they are.  For a URI the cache folder is keyed by
    the URI and its listing (every file's name, size and modification time), so a folder written
    again at the same URI (the reward model each round, a rerun's export) is downloaded again; a
    file lock makes concurrent workers on one node wait for a single download.
    """
    if not is_uri(location):
        local = Path(resolve(location)[1])
        if not local.is_dir():
            raise FileNotFoundError(f"{location}: no such folder")
        return local
    root = Path(cache_dir) if cache_dir else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    fs, path = resolve(location)
    with _errors(location):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    listing = sorted((i.path, i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)
    if not listing:
        check_bucket(location)
        raise FileNotFoundError(f"{location}: no files there")
    key = hashlib.sha256(repr((str(location).rstrip("/"), listing)).encode()).hexdigest()[:24]
    target = root / key
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        partial = root / f".{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()  # copy_files makes the subfolders only: a flat folder's files need this one
        with _errors(location):
            pafs.copy_files(path, str(partial), source_filesystem=fs)
        partial.rename(target)
    return target


# ---- filesystems ---------------------------------------------------------------------------------
def _scheme(location: str | os.PathLike) -> str | None:
    """The scheme of a URI, None for a plain path; StorageError for a scheme this module does not know."""
    text = str(location)
    if "://" not in text:
        return None
    scheme = text.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{text}: unknown scheme {scheme!r} (use s3://, gs://, file:// or a plain path)")
    return scheme


def _s3_filesystem(location: str, bucket: str) -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint_override = scheme = None
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        endpoint_override, scheme = parsed.netloc, parsed.scheme
        region = region or "us-east-1"
    if not _aws_credentials_configured() and _imds_disabled():
        raise StorageError(
            f"{location}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
            "run where an instance profile or role provides them (AWS_EC2_METADATA_DISABLED is set here)"
        )
    if not region:  # AWS itself: ask where the bucket is, as pyarrow's from_uri does
        with _errors(location):
            region = _bucket_region(bucket)
    return _s3(region, endpoint_override, scheme)


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError as error:
        if "not found" in str(error).lower():
            raise StorageError(f"bucket {bucket!r} does not exist ({error})") from None
        raise


@functools.lru_cache(maxsize=8)
def _s3(region: str | None, endpoint_override: str | None, scheme: str | None) -> pafs.S3FileSystem:
    """One client per (region, endpoint): building one sets up the AWS SDK's connection pool."""
    return pafs.S3FileSystem(
        region=region,
        endpoint_override=endpoint_override,
        scheme=scheme or "https",
        connect_timeout=CONNECT_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        allow_delayed_open=True,  # a small object is one PutObject at close, not a multipart upload
    )


def _gcs_filesystem() -> pafs.FileSystem:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        parsed = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.GcsFileSystem()


def _aws_credentials_configured() -> bool:
    """Whether the environment names a credential source (the instance profile aside)."""
    if any(os.environ.get(name) for name in _CREDENTIAL_VARS):
        return True
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE"), os.environ.get("AWS_CONFIG_FILE"))
    defaults = (Path.home() / ".aws" / "credentials", Path.home() / ".aws" / "config")
    return any(Path(f).is_file() for f in files if f) or any(p.is_file() for p in defaults)


def _imds_disabled() -> bool:
    return os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() in ("1", "true")


@contextlib.contextmanager
def _errors(location: str | os.PathLike):
    """Re-raise pyarrow's errors as StorageError naming the location and the reason in words."""
    try:
        yield
    except FileNotFoundError:
        check_bucket(location)  # pyarrow reports a key in a missing bucket as a missing file
        raise FileNotFoundError(f"{location}: not found") from None
    except (StorageError, NotADirectoryError, IsADirectoryError, FileExistsError):
        raise
    except OSError as error:
        text = str(error)
        if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            reason = "the bucket does not exist"
        elif "NETWORK_CONNECTION" in text or "Could not connect" in text or "curlCode" in text:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
            reason = f"cannot reach the storage endpoint ({endpoint})"
        elif any(code in text for code in _DENIED):
            configured = "" if _aws_credentials_configured() else "; no credentials are set in the environment"
            reason = f"access denied: the credentials are missing or refused{configured}"
        else:
            reason = "storage error"
        raise StorageError(f"{location}: {reason} ({text})") from None
