"""The reward endpoint's two request paths answer alike: `ScoreFastPath` against the FastAPI route, in process.

Both apps are built as a replica builds them, from one scorer that holds a tiny reward model and the
replica's own request checks; no Ray cluster. Each request goes through the FastAPI app alone (the
route) and through `ScoreFastPath` in front of it, and the two answers must match byte for byte.
Also here: the pin on the one private Serve API the endpoint still uses.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import inspect
import json

import httpx
import numpy as np
import pytest
from ray.serve.deployment import Deployment
from test_reward_serve import CLASSES, OVERRIDES, SIZE, _b64, _bad_requests, _make_model

from pathalign_ray.config import load_config
from pathalign_ray.images import encode_png
from pathalign_ray.reward.fast_path import ScoreFastPath
from pathalign_ray.reward.serve import (
    RewardScorer,
    ServeRewardConfig,
    _code_version,
    _forward,
    _load,
    build_app,
    create_app,
)

_Replica = RewardScorer.func_or_class  # the replica's class (Serve's ingress wrapper around ours)


class _Scorer:
    """What both request paths call on a replica, without Serve: the replica's own checks and properties.

    Scoring is one `_forward` per request instead of the batch queue; `scoring` stands in for a
    model swapped under a request, `fail` for a forward pass that raises.
    """

    check_request, decode = _Replica.check_request, _Replica.decode
    current, config = _Replica.current, _Replica.config
    app_name = "test"

    def __init__(self, config: ServeRewardConfig):
        self._config, self._current = config, _load(config.model)
        self.scoring, self.fail = self._current, False

    async def score_pixels(self, pixels: np.ndarray, classes: list[str]) -> dict:
        if self.fail:
            raise RuntimeError("the forward pass broke")
        return {"scores": _forward(self.scoring, [(pixels, classes)])[0], "model": self.scoring.info}


class _Counted:
    """The FastAPI app, counting the requests the fast path hands it (Serve's attributes read through)."""

    def __init__(self, app):
        self.app, self.calls = app, 0

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        self.calls += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    model = _make_model(root / "v1", seed=0, version=1)
    scorer = _Scorer(load_config(ServeRewardConfig, None, [*OVERRIDES, f"model={model}"]))
    # a version swapped in that no longer knows "blast": checked against the serving one, scored by this, 409
    scorer.swapped = dataclasses.replace(scorer.current, class_names=tuple(CLASSES[1:]), info={"id": "x", "version": 2})
    return scorer


def _asgi(request: httpx.Request) -> tuple[dict, list[bytes]]:
    """The ASGI scope and body chunks of an httpx request, as Serve's proxy hands them to a replica."""
    url = request.url
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
        "scheme": "http", "path": url.path, "raw_path": url.raw_path.partition(b"?")[0],
        "query_string": url.query, "root_path": "", "headers": [(k.lower(), v) for k, v in request.headers.raw],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
    }  # fmt: skip
    return scope, [bytes(chunk) for chunk in request.stream]


async def _call(app, scope: dict, chunks: list[bytes], disconnect: bool = False) -> tuple:
    """(status, headers, body, the exception the app raised or None) of one request through `app`.

    status and headers are None when the app sent no response.
    """
    messages = [] if disconnect else [{"type": "http.request", "body": c, "more_body": True} for c in chunks[:-1]]
    if not disconnect:
        messages.append({"type": "http.request", "body": chunks[-1] if chunks else b"", "more_body": False})
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    try:
        await app(dict(scope), receive, send)
        raised = None
    except Exception as error:
        raised = type(error).__name__
    start = next((m for m in sent if m["type"] == "http.response.start"), {"status": None, "headers": None})
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], start["headers"], body, raised


def _cases(png: bytes) -> dict:
    """name -> (request kwargs for httpx.Request, options, status). Options: root_path, scorer changes, disconnect."""
    rng = np.random.default_rng(0)
    images = [encode_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(3)]
    ok = {"images": [_b64(data) for data in images], "classes": CLASSES[:3]}
    text = json.dumps(ok).encode()
    wrapped = base64.encodebytes(images[0]).decode()  # 76-column lines
    post = {"method": "POST", "url": "http://testserver/v1/score"}
    cases = {
        "valid JSON": ({**post, "json": ok}, {}, 200),
        "valid JSON: data: URL, line-wrapped base64": ({**post, "json": {"images": [f"data:image/png;base64,{_b64(png)}", wrapped], "classes": ["blast", "monocyte"]}}, {}, 200),
        "valid JSON with a charset": ({**post, "content": text, "headers": {"content-type": "Application/JSON; charset=utf-8"}}, {}, 200),
        "valid JSON without a Content-Type": ({**post, "content": text}, {}, 200),
        "valid JSON under a route prefix": ({**post, "url": "http://testserver/reward/v1/score", "json": ok}, {"root_path": "/reward"}, 200),
        "valid multipart": ({**post, "files": [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)], "data": {"classes": ",".join(CLASSES[:3])}}, {}, 200),
        "unknown class, not ASCII": ({**post, "json": {**ok, "classes": ["blast", "lymphocyte", "éosinophile"]}}, {}, 422),
        "Content-Length not a number": ({**post, "content": text, "headers": {"content-type": "application/json", "content-length": "12x"}}, {}, 400),
        "model swapped under the request": ({**post, "json": ok}, {"scoring": "swapped"}, 409),
        "forward pass raises": ({**post, "json": ok}, {"fail": True}, 500),
        "client gone before the body": ({**post, "json": ok}, {"disconnect": True}, 500),
        "wrong method": ({"method": "GET", "url": "http://testserver/v1/score"}, {}, 405),
        "PUT": ({"method": "PUT", "url": "http://testserver/v1/score", "json": ok}, {}, 405),
        "trailing slash": ({**post, "url": "http://testserver/v1/score/", "json": ok}, {}, 307),
        "unknown route": ({**post, "url": "http://testserver/v1/scores", "json": ok}, {}, 404),
        "route prefix missing": ({**post, "url": "http://testserver/other/v1/score", "json": ok}, {"root_path": "/reward"}, 404),
        "classes": ({"method": "GET", "url": "http://testserver/v1/classes"}, {}, 200),
        "healthz": ({"method": "GET", "url": "http://testserver/healthz"}, {}, 200),
    }  # fmt: skip
    for name, (request, status, _) in _bad_requests(png).items():  # the list the served endpoint is tested with
        cases[name] = ({**post, **request}, {}, status)
    return cases


# what the fast path hands to FastAPI; it answers every other case itself
FOR_FASTAPI = {
    "valid multipart", "wrong method", "PUT", "trailing slash", "unknown route", "route prefix missing", "classes",
    "healthz", "wrong content type", "multipart without classes", "multipart text as file", "multipart bad image",
}  # fmt: skip


def test_the_fast_path_answers_every_request_as_the_fastapi_route_does(scorer):
    png = encode_png(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))
    route_app = create_app(scorer)
    counted = _Counted(create_app(scorer))
    fast_app = ScoreFastPath(scorer, counted)
    handed_over = set()
    for name, (request, options, status) in _cases(png).items():
        scope, chunks = _asgi(httpx.Request(**request))
        scope["root_path"] = options.get("root_path", "")
        scorer.scoring = getattr(scorer, options.get("scoring", "_current"))
        scorer.fail = options.get("fail", False)
        try:
            route = asyncio.run(_call(route_app, scope, chunks, options.get("disconnect", False)))
            calls = counted.calls
            fast = asyncio.run(_call(fast_app, scope, chunks, options.get("disconnect", False)))
            if counted.calls > calls:
                handed_over.add(name)
        finally:
            scorer.scoring, scorer.fail = scorer._current, False
        assert route[0] == status, f"{name}: the FastAPI route answered {route[0]} {route[2][:300]!r}"
        assert fast == route, f"{name}: fast path {fast!r:.400}\n  FastAPI route {route!r:.400}"
        if status == 200 and "v1/score" in request["url"]:
            assert len(json.loads(route[2])["scores"]) in (2, 3), name
    changed = sorted(handed_over ^ FOR_FASTAPI)
    assert not changed, f"the fast path now hands these to FastAPI, or now answers them itself: {changed}"


def test_build_app_sets_the_code_version_through_serves_private_internal_option(scorer):
    """Pins `RewardScorer.options(_internal=True, version=...)` in build_app: Serve's own builders set the
    version this way; switch_model relies on a version that stays put to reconfigure replicas in place."""
    how = (
        "reward/serve.py build_app sets the deployment's code version with the private "
        "`Deployment.options(_internal=True, version=...)`, so that redeploying with another user_config "
        "reconfigures the running replicas instead of replacing them (test_reward_serve.py "
        "test_a_new_model_version_is_switched_in_place_without_failed_requests checks that end to end)"
    )
    assert "_internal" in inspect.signature(Deployment.options).parameters, f"ray.serve dropped `_internal`: {how}"
    pinned = RewardScorer.options(_internal=True, version="pinned")
    assert pinned.version == "pinned", f"`_internal` no longer sets the version: {how}"
    try:
        RewardScorer.options(version="pinned")
    except ValueError:
        pass  # still refused without `_internal`
    else:
        pytest.fail(f"Serve takes `version` in Deployment.options again: drop `_internal=True` there. {how}")
    versions = {build_app(scorer.config, user_config={"model": m})._bound_deployment.version for m in ("a", "b")}
    assert versions == {_code_version(scorer.config)}, f"build_app's deployments carry {versions}: {how}"
