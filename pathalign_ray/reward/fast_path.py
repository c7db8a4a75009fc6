"""The scoring request on plain ASGI: `ScoreFastPath` answers JSON POSTs to /v1/score without FastAPI.

Why it exists: under load the replica's event loop is the bottleneck, and for a single-image JSON
request a sizeable share of its event-loop CPU went to FastAPI/Starlette's routing and middleware
(Request objects, exception middleware, JSONResponse) rather than to the request's own work.
Skipping them raises the endpoint's HTTP throughput as a share of in-process throughput; the
numbers are in BENCHMARKS.md, "Reward scoring endpoint on Ray Serve" (bench/serve_throughput.py).

What keeps it answering as the FastAPI route (`serve.create_app`) does: it matches requests with
that route's own `matches`, and the two share everything after the match, which lives here for that
reason (serve.py imports this module, not the other way round): `BadRequest`, `read_capped` (the
body under its size cap), `decode_json` (the JSON body's checks and decoding) and `score_decoded`.
Its responses are encoded as Starlette's. The route stays for multipart bodies and OpenAPI; FastAPI
keeps every other route and the lifespan events. tests/test_reward_fast_path.py sends the same
valid and invalid requests through both and compares status, headers and body.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from pathalign_ray.metrics import record_endpoint_latency

if TYPE_CHECKING:  # annotations only: serve.py imports this module
    from pathalign_ray.reward.serve import RewardScorer

SCORE_ROUTE = "/v1/score"


class BadRequest(ValueError):
    """A request the endpoint refuses: `status` is the HTTP status, the message names the fault."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # crosses process boundaries as itself (handle callers catch it as ValueError)
        return BadRequest, (self.status, str(self))


class ScoreFastPath:
    """The replica's ASGI app: answers JSON POSTs to /v1/score itself and hands all else to FastAPI."""

    def __init__(self, scorer: RewardScorer, app: FastAPI):
        self._scorer = scorer
        self._app = app
        self._route = _score_route(app)
        self._limit = scorer.config.max_body_bytes
        # Serve reads the app's routes (route names in its metrics, route patterns for its proxies)
        # and adds its 503 handlers for back-pressure to it: these are the FastAPI app's.
        self.routes, self.router, self.root_path = app.routes, app.router, app.root_path
        self.add_exception_handler = app.add_exception_handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and self._route.matches(scope)[0] is Match.FULL  # as FastAPI matches it, Serve's route prefix included
            and is_json((_header(scope, b"content-type") or "").lower())
        ):
            await self._app(scope, receive, send)
            return
        try:
            status, body = 200, _json(await self._score(scope, receive))
        except BadRequest as error:
            status, body = error.status, _json({"detail": str(error)})
        except Exception:  # as Starlette's ServerErrorMiddleware: a bare 500, raised on for Serve to log
            await _respond(send, 500, b"Internal Server Error", b"text/plain; charset=utf-8")
            raise
        await _respond(send, status, body, b"application/json")

    async def _score(self, scope: Scope, receive: Receive) -> dict:
        started = time.perf_counter()
        body = await read_capped(_header(scope, b"content-length"), receive, self._limit)
        pixels, classes = decode_json(self._scorer, body)
        return await score_decoded(self._scorer, pixels, classes, started)


def _score_route(app: FastAPI) -> APIRoute:
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path == SCORE_ROUTE and "POST" in route.methods:
            return route
    raise ValueError(f"the app has no POST {SCORE_ROUTE} route for the fast path to stand in for")


def _header(scope: Scope, name: bytes) -> str | None:
    """The first `name` header of the request, as Starlette's `Headers.get` reads it."""
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == name), None)


def _json(content: Any) -> bytes:
    """`content` encoded as Starlette's JSONResponse encodes it."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", content_type)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- shared with the FastAPI route ---------------------------------------------------------------


def is_json(content_type: str) -> bool:
    """A lower-cased Content-Type the /v1/score route reads as JSON (a missing one included)."""
    return content_type.startswith("application/json") or not content_type


def decode_json(scorer: RewardScorer, body: bytes) -> tuple[np.ndarray, list[str]]:
    """A JSON body -> (N, S, S, 3) uint8 pixels and the N declared classes; BadRequest names a fault."""
    encoded, classes = _parse_json(body, scorer.config.max_images_per_request)
    scorer.check_request(len(encoded), classes)  # cheap checks before any base64 is decoded
    return scorer.decode([_b64(item, i) for i, item in enumerate(encoded)], classes), classes


async def score_decoded(scorer: RewardScorer, pixels: np.ndarray, classes: list[str], started: float) -> dict:
    """{"scores", "model"} of a decoded request; its latency since `started` goes to the dashboard."""
    result = await scorer.score_pixels(pixels, classes)
    if any(math.isnan(s) for s in result["scores"]):  # NaN: see serve._forward
        raise BadRequest(409, f"model {result['model']} no longer knows a class of this request: retry")
    record_endpoint_latency(time.perf_counter() - started, scorer.app_name)
    return result


async def read_capped(declared: str | None, receive: Receive, limit: int) -> bytes:
    """The body, refused with 413 as soon as Content-Length (`declared`) or the bytes received pass `limit`.

    The chunks are joined once at the end: a body that arrives in one message is not copied at all.
    """
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest(400, f"Content-Length {declared[:40]!r} is not a byte count")
        if int(declared) > limit:
            raise BadRequest(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()  # as Starlette's Request.stream
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body is over the limit of {limit} bytes")
        if chunk:
            chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body: bytes, max_images: int) -> tuple[list, list]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise BadRequest(400, f"body is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(data, dict):
        raise BadRequest(422, f"body must be a JSON object with images and classes, got {type(data).__name__}")
    for key in ("images", "classes"):
        if key not in data:
            raise BadRequest(422, f'{key} is missing: send {{"images": [base64, ...], "classes": [name, ...]}}')
        if not isinstance(data[key], list):
            raise BadRequest(422, f"{key} must be a list, got {type(data[key]).__name__}")
    images, classes = data["images"], data["classes"]
    if len(images) > max_images:
        raise BadRequest(413, f"{len(images)} images in one request; the maximum is {max_images}: split the request")
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise BadRequest(422, f"images[{i}] must be a base64 string, got {type(item).__name__}")
    return images, classes


def _b64(text: str, i: int) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # line-wrapped base64 (76-column encoders) is still base64
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as error:
            raise BadRequest(422, f"images[{i}]: invalid base64 ({error})") from None
