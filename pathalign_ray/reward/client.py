"""Scoring images with a served reward model: over HTTP (`RewardClient`) or a Serve handle (`HandleRewardClient`).

Both take (N, H, W, 3) uint8 images or N encoded images (PNG/JPEG bytes) with N declared class
names, split them into requests of at most `max_batch` images, send those concurrently, and
return (N,) float64 P(plausible) in input order. The server batches requests from every caller
into shared forward passes; `max_batch` only bounds one request.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pathalign_ray.images import encode_png

Images = np.ndarray | Sequence[bytes]


class RewardRequestError(ValueError):
    """The endpoint refused a request (4xx): retrying would not help. The message is the server's."""

    def __init__(self, status: int, message: str):
        super().__init__(f"reward endpoint refused the request ({status}): {message}")
        self.status = status


class RewardServiceError(RuntimeError):
    """The endpoint could not be reached or kept failing (connection error, 5xx, 429) after every retry."""


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _check(images: Images, classes: Sequence[str]) -> int:
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    elif not all(isinstance(item, (bytes, bytearray, memoryview)) for item in images):
        raise ValueError("images must be a uint8 array or a list of encoded image bytes")
    if len(images) != len(classes):
        raise ValueError(f"{len(images)} images but {len(classes)} classes")
    return len(images)


class RewardClient:
    """HTTP client of the reward endpoint (`start_reward_server`'s URL).

    Connection errors, timeouts, 5xx and 429 are retried `retries` times with exponential backoff
    (from `backoff_s`, doubled each time, jittered, honouring Retry-After); a 4xx raises
    RewardRequestError at once. Thread-safe: one client can serve a whole job.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        retries: int = 4,
        backoff_s: float = 0.25,
        max_batch: int = 32,
        max_concurrency: int = 8,
    ):
        import httpx

        if max_batch < 1 or max_concurrency < 1 or retries < 0:
            raise ValueError("max_batch and max_concurrency must be >= 1, retries >= 0")
        self.url = url.rstrip("/") + "/"
        self.retries, self.backoff_s, self.max_batch = retries, backoff_s, max_batch
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="reward-client")
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, limits=limits)
        self.last_model: dict | None = None  # {"id", "version"} of the model that scored the latest request

    def score(self, images: Images, classes: Sequence[str]) -> np.ndarray:
        """(N, H, W, 3) uint8 or N encoded images, N class names -> (N,) P(plausible)."""
        n = _check(images, classes)
        if n == 0:
            return np.zeros(0)
        if isinstance(images, np.ndarray):
            encoded = [encode_png(np.ascontiguousarray(image)) for image in images]
        else:
            encoded = [bytes(item) for item in images]
        parts = _chunks(n, self.max_batch)
        bodies = [
            {"images": [base64.b64encode(item).decode("ascii") for item in encoded[part]], "classes": [*classes[part]]}
            for part in parts
        ]
        return np.concatenate(list(self._pool.map(self._post, bodies))).astype(np.float64)

    def classes(self) -> list[str]:
        return self._request("GET", "v1/classes")["classes"]

    def _post(self, body: dict) -> np.ndarray:
        return np.asarray(self._request("POST", "v1/score", json=body)["scores"])

    def _request(self, method: str, path: str, **kwargs) -> dict:
        import httpx

        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:  # refused, reset, timed out
                failure, retry_after = f"{type(error).__name__}: {error}", None
            else:
                if response.status_code < 400:
                    payload = response.json()
                    self.last_model = payload.get("model", self.last_model)
                    return payload
                if response.status_code < 500 and response.status_code != 429:
                    raise RewardRequestError(response.status_code, _detail(response))
                failure = f"{response.status_code}: {_detail(response)}"
                retry_after = response.headers.get("retry-after")
            if attempt == self.retries:
                break
            wait = delay * (0.5 + random.random())
            if retry_after and retry_after.replace(".", "", 1).isdigit():
                wait = max(wait, min(float(retry_after), 30.0))
            time.sleep(wait)
            delay *= 2
        raise RewardServiceError(f"{self.url}{path} failed after {self.retries + 1} attempts; last: {failure}")

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _detail(response) -> str:
    try:
        return str(response.json().get("detail", response.text))[:500]
    except ValueError:
        return response.text[:500]


class HandleRewardClient:
    """The same `score` through a DeploymentHandle of RewardScorer, for jobs in the same Ray cluster.

    Arrays travel as arrays (no PNG round trip); encoded images are decoded on the replica. A bad
    input raises the replica's BadRequest, a ValueError naming the fault. Call from synchronous
    code (Ray Train workers, drivers), not from inside an event loop.
    """

    def __init__(self, handle, max_batch: int = 32):
        self.handle, self.max_batch = handle, max_batch
        self.last_model: dict | None = None

    @classmethod
    def from_app(cls, app_name: str = "reward", max_batch: int = 32) -> HandleRewardClient:
        from ray import serve

        return cls(serve.get_app_handle(app_name), max_batch)

    def score(self, images: Images, classes: Sequence[str]) -> np.ndarray:
        n = _check(images, classes)
        if n == 0:
            return np.zeros(0)
        array = isinstance(images, np.ndarray)
        responses = [
            self.handle.score.remote(images[part] if array else list(images[part]), list(classes[part]))
            for part in _chunks(n, self.max_batch)
        ]  # all sent before any is awaited: the replica batches them together
        results = [response.result() for response in responses]
        self.last_model = results[-1]["model"]
        return np.concatenate([result["scores"] for result in results]).astype(np.float64)
