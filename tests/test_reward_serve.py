"""The reward endpoint on a real Ray Serve instance: scores, bad input, fuzzing, a model switch, the clients."""

from __future__ import annotations

import base64
import contextlib
import http.server
import importlib.util
import io
import json
import threading
import time
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pathalign_ray.config import load_config
from pathalign_ray.images import decode_image, encode_png, to_model_range
from pathalign_ray.reward.client import HandleRewardClient, RewardClient, RewardRequestError, RewardServiceError
from pathalign_ray.reward.model import RewardModel, RewardModelConfig, load_reward_model, save_reward_model
from pathalign_ray.reward.serve import APP_NAME, ServeRewardConfig, start_reward_server, switch_model

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["blast", "segmented_neutrophil", "lymphocyte", "monocyte"]
SIZE = 16
MAX_IMAGES = 8
MAX_BODY = 64 * 1024
OVERRIDES = ["max_batch_size=8", f"max_images_per_request={MAX_IMAGES}", f"max_body_bytes={MAX_BODY}"]


def _make_model(path: Path, seed: int, version: int) -> Path:
    torch.manual_seed(seed)
    model = RewardModel(RewardModelConfig(image_size=SIZE, channels=(8, 16), class_embedding=8, hidden=16), CLASSES)
    return save_reward_model(model.eval(), path, {"id": "test-reward", "version": version})


def _in_process(model_dir: Path, encoded: list[bytes], classes: list[str]) -> np.ndarray:
    model, _ = load_reward_model(model_dir)
    pixels = np.stack([decode_image(data, SIZE, "x") for data in encoded])
    return model.score(torch.from_numpy(to_model_range(pixels)), model.class_ids(classes)).numpy()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    return _make_model(root / "v1", seed=0, version=1), _make_model(root / "v2", seed=1, version=2)


@pytest.fixture(scope="module")
def served(ray_cluster, serve_port, models):
    """The reward app at / on the session's Serve instance: (url, config); deleted after the module."""
    from ray import serve

    overrides = [*OVERRIDES, f"model={models[0]}", f"port={serve_port}"]
    config = load_config(ServeRewardConfig, ROOT / "configs" / "serve_reward.yaml", overrides)
    yield start_reward_server(config), config
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def images():
    """Eight encoded images: exact-size PNGs, and ones that need converting (size, mode, JPEG)."""
    rng = np.random.default_rng(0)
    encoded = [encode_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(4)]
    for mode, shape, fmt in [
        ("L", (40, 30), "PNG"),
        ("RGBA", (12, 20, 4), "PNG"),
        ("RGB", (24, 24, 3), "JPEG"),
        ("P", (16, 16), "PNG"),
    ]:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=None if mode == "P" else mode).convert(
            mode
        ).save(buffer, fmt)
        encoded.append(buffer.getvalue())
    return encoded


def test_scores_over_http_and_through_a_handle_equal_in_process_scores(served, models, images):
    from ray import serve

    url, _ = served
    classes = [CLASSES[i % len(CLASSES)] for i in range(len(images))]
    expected = _in_process(models[0], images, classes)
    with httpx.Client(base_url=url, timeout=60) as http:
        response = http.post("v1/score", json={"images": [_b64(b) for b in images], "classes": classes})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == {"id": "test-reward", "version": 1}
        np.testing.assert_allclose(response.json()["scores"], expected, atol=1e-5)

        files = [("files", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
        multipart = http.post("v1/score", files=files, data={"classes": ",".join(classes)})
        assert multipart.status_code == 200, multipart.text
        np.testing.assert_allclose(multipart.json()["scores"], expected, atol=1e-5)

        listed = http.get("v1/classes").json()
        assert listed["classes"] == CLASSES and listed["image_size"] == SIZE
        assert http.get("healthz").status_code == 200
        spec = http.get("openapi.json").json()
        assert {"/v1/score", "/v1/classes", "/healthz"} <= set(spec["paths"])
        assert set(spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]) == {
            "application/json",
            "multipart/form-data",
        }

    many, many_classes = images * 3, classes * 3  # 24 images: 3 requests of 8 at most, sent at once
    with RewardClient(url, max_batch=5) as client:
        np.testing.assert_allclose(client.score(many, many_classes), np.tile(expected, 3), atol=1e-5)
        assert client.last_model["version"] == 1
    pixels = np.stack([decode_image(data, SIZE, "x") for data in images])
    handle_client = HandleRewardClient(serve.get_app_handle(APP_NAME), max_batch=3)
    np.testing.assert_allclose(handle_client.score(pixels, classes), expected, atol=1e-5)
    np.testing.assert_allclose(handle_client.score(images, classes), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown class 'basophil'"):
        handle_client.score(pixels[:1], ["basophil"])


def _bad_requests(png: bytes) -> dict:
    """name -> (request kwargs for httpx, status, words the message must hold)."""
    ok = {"images": [_b64(png)], "classes": ["blast"]}

    def chunks():
        for _ in range(MAX_BODY // 1024 + 8):
            yield b" " * 1024

    return {
        "invalid base64": ({"json": {**ok, "images": ["not base64!!"]}}, 422, "images[0]: invalid base64"),
        "not an image": (
            {"json": {**ok, "images": [_b64(b"just some text, no pixels")]}},
            422,
            "images[0]: not an image",
        ),
        "truncated PNG": ({"json": {**ok, "images": [_b64(png[: len(png) // 2])]}}, 422, "images[0]: truncated"),
        "unknown class": ({"json": {**ok, "classes": ["basophil"]}}, 422, "unknown class 'basophil'"),
        "lengths differ": ({"json": {**ok, "classes": ["blast", "blast"]}}, 422, "1 images, 2 classes"),
        "empty list": ({"json": {"images": [], "classes": []}}, 422, "images is empty"),
        "too many images": ({"json": {"images": ok["images"] * 9, "classes": ["blast"] * 9}}, 413, "maximum is 8"),
        "body over the limit": (
            {"content": b" " * (MAX_BODY + 1), "headers": {"content-type": "application/json"}},
            413,
            "over the limit",
        ),
        "streamed body over the limit": (
            {"content": chunks(), "headers": {"content-type": "application/json"}},
            413,
            "over the limit",
        ),
        "not JSON": (
            {"content": b"{images: oops", "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON",
        ),
        "JSON list": ({"json": [1, 2]}, 422, "JSON object"),
        "images not a list": ({"json": {**ok, "images": _b64(png)}}, 422, "images must be a list"),
        "image not a string": ({"json": {**ok, "images": [3]}}, 422, "images[0] must be a base64 string"),
        "class not a string": ({"json": {**ok, "classes": [None]}}, 422, "classes[0] must be a string"),
        "classes missing": ({"json": {"images": ok["images"]}}, 422, "classes is missing"),
        "wrong content type": ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "text/plain"),
        "multipart without classes": ({"files": [("files", ("a.png", png, "image/png"))]}, 422, "1 images, 0 classes"),
        "multipart text as file": (
            {"files": {"files": (None, "abc"), "classes": (None, "blast")}},
            422,
            "files must be file parts",
        ),
        "multipart bad image": (
            {"files": [("files", ("a.png", b"GIF89a...", "image/gif"))], "data": {"classes": "blast"}},
            422,
            "files[0]",
        ),
    }


def test_each_bad_input_is_a_4xx_that_names_the_problem(served, images):
    url, _ = served
    with httpx.Client(base_url=url, timeout=60) as http:
        for name, (request, status, words) in _bad_requests(images[0]).items():
            response = http.post("v1/score", **request)
            assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
            assert words in response.json()["detail"], f"{name}: {response.json()['detail']}"
            assert http.get("healthz").status_code == 200, name
        assert http.post("v1/score", json={"images": [_b64(images[0])], "classes": ["blast"]}).status_code == 200


def _malformed(rng: np.random.Generator, png: bytes, jpeg: bytes) -> dict:
    """One random malformed request (kwargs for httpx)."""
    good = {"images": [_b64(png)], "classes": ["blast"]}
    text = json.dumps(good).encode()
    kind = int(rng.integers(12))
    as_json = {"content-type": "application/json"}
    if kind == 0:  # random bytes
        return {"content": rng.bytes(int(rng.integers(0, 2000))), "headers": as_json}
    if kind == 1:  # truncated JSON
        return {"content": text[: int(rng.integers(0, len(text)))], "headers": as_json}
    if kind == 2:  # JSON with random bytes flipped
        body = bytearray(text)
        for i in rng.integers(0, len(body), int(rng.integers(1, 20))):
            body[i] = int(rng.integers(256))
        return {"content": bytes(body), "headers": as_json}
    if kind == 3:  # wrong types anywhere
        junk = [None, 1, -1.5, True, "x", [], {}, [1, 2], {"a": 1}, "é" * 50, 1e308, [[_b64(png)]]]
        body = dict(good)
        body[str(rng.choice(["images", "classes", "extra"]))] = junk[int(rng.integers(len(junk)))]
        return {"json": body if rng.random() < 0.8 else junk[int(rng.integers(len(junk)))]}
    if kind == 4:  # random base64 of random bytes
        return {"json": {"images": [_b64(rng.bytes(int(rng.integers(0, 500))))], "classes": ["blast"]}}
    if kind == 5:  # a PNG or JPEG with bytes mutated, truncated or cut at random
        data = bytearray(png if rng.random() < 0.5 else jpeg)
        for i in rng.integers(0, len(data), int(rng.integers(1, 8))):
            data[i] = int(rng.integers(256))
        data = data[: int(rng.integers(1, len(data) + 1))]
        return {"json": {"images": [_b64(bytes(data))], "classes": ["blast"]}}
    if kind == 6:  # huge lists
        n = int(rng.choice([MAX_IMAGES + 1, 1000, 20000]))
        return {"json": {"images": [""] * n, "classes": ["blast"] * n}}
    if kind == 7:  # deep nesting
        depth = int(rng.choice([100, 10000, 30000]))
        return {"content": b"[" * depth + b"]" * depth, "headers": as_json}
    if kind == 8:  # random multipart
        files = [
            ("files", ("x", rng.bytes(int(rng.integers(0, 300))), "image/png")) for _ in range(int(rng.integers(0, 4)))
        ]
        data = {"classes": str(rng.choice(["blast", "", ",,,", "blast,nope", "é"]))} if rng.random() < 0.7 else {}
        return {"files": files or [("other", ("y", b"z", "text/plain"))], "data": data}
    if kind == 9:  # a multipart header with a broken body
        return {"content": rng.bytes(200), "headers": {"content-type": "multipart/form-data; boundary=xyz"}}
    if kind == 10:  # random content types
        ctype = str(rng.choice(["text/plain", "application/xml", "image/png", "", "application/json; charset=latin-1"]))
        return {"content": text if rng.random() < 0.5 else rng.bytes(64), "headers": {"content-type": ctype}}
    n_images, n_classes = int(rng.integers(0, 4)), int(rng.integers(0, 4))  # lists of different or zero lengths
    return {
        "json": {"images": [_b64(png)] * n_images, "classes": [str(rng.choice(["blast", "monocyte", "?"]))] * n_classes}
    }


def test_hundreds_of_malformed_requests_never_get_a_5xx(served, images):
    url, _ = served
    rng = np.random.default_rng(1234)
    requests = [_malformed(rng, images[0], images[6]) for _ in range(520)]
    statuses: dict[int, int] = {}

    def send(batch):
        with httpx.Client(base_url=url, timeout=60) as http:
            for request in batch:
                response = http.post("v1/score", **request)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, f"{request!r:.300}: {response.status_code} {response.text[:300]}"

    workers = [threading.Thread(target=send, args=(requests[i::4],)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sum(statuses.values()) == len(requests), statuses  # a failed assert in a thread shows up here
    assert all(status < 500 for status in statuses), statuses
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("healthz").status_code == 200
        assert http.post("v1/score", json={"images": [_b64(images[0])], "classes": ["blast"]}).status_code == 200


def test_a_new_model_version_is_switched_in_place_without_failed_requests(served, models, images):
    from ray import serve

    url, config = served
    handle = serve.get_app_handle(APP_NAME)
    replica_before = handle.stats.remote().result()["replica"]
    body = {"images": [_b64(data) for data in images[:4]], "classes": CLASSES}
    seen: list[list] = [[] for _ in range(3)]
    failures: list[str] = []
    stop = threading.Event()

    def load(out: list) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                response = http.post("v1/score", json=body)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                else:
                    out.append((response.json()["model"]["version"], response.json()["scores"]))

    workers = [threading.Thread(target=load, args=(out,)) for out in seen]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        switch_model(config, str(models[1]))
        deadline = time.time() + 30
        while time.time() < deadline and not all(out and out[-1][0] == 2 for out in seen):
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert not failures, failures[:3]
    expected = {1: _in_process(models[0], images[:4], CLASSES), 2: _in_process(models[1], images[:4], CLASSES)}
    for out in seen:
        versions = [version for version, _ in out]
        assert versions[0] == 1 and versions[-1] == 2, versions
        assert versions == sorted(versions)  # never back to the old version
        for version, scores in out:
            np.testing.assert_allclose(scores, expected[version], atol=1e-5)
    assert handle.stats.remote().result()["replica"] == replica_before  # reconfigured, not replaced
    switch_model(config, str(models[0]))
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("healthz").json()["model"]["version"] == 1


def test_the_job_deploys_onto_a_cluster_and_exits(served, models, serve_port, monkeypatch, capsys):
    url, _ = served
    spec = importlib.util.spec_from_file_location("serve_reward_job", ROOT / "jobs" / "serve_reward.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # as under `ray job submit`: deploy, print, return
    job.main(
        [
            "--config",
            str(ROOT / "configs" / "serve_reward.yaml"),
            "--model",
            str(models[0]),
            f"port={serve_port}",
            *OVERRIDES,
        ]
    )
    assert f"{url}v1/score" in capsys.readouterr().out
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("healthz").json()["model"]["version"] == 1


def test_the_serve_config_file_builds_and_serves_the_app(served, models, images):
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    url, _ = served
    raw = yaml.safe_load((ROOT / "configs" / "serve_reward_app.yaml").read_text())
    app_config = ServeDeploySchema.model_validate(raw).applications[0]
    assert app_config.name == APP_NAME and app_config.deployments[0].name == "RewardScorer"
    args = {**app_config.args, "model": str(models[1])}
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_config.import_path), args)
    serve.run(app, name="reward_from_yaml", route_prefix="/from-yaml")
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            response = http.post("from-yaml/v1/score", json={"images": [_b64(images[0])], "classes": ["blast"]})
            assert response.status_code == 200, response.text
            assert response.json()["model"]["version"] == 2
    finally:
        serve.delete("reward_from_yaml")


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers POST /v1/score from a script of statuses; counts requests."""

    script: ClassVar[list[int]] = []
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        self.rfile.read(int(self.headers.get("content-length", 0)))
        status = self.script.pop(0) if self.script else 200
        body = (
            {"scores": [0.25], "model": {"id": "stub", "version": 0}}
            if status == 200
            else {"detail": f"stub says {status}"}
        )
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _stub_server(script: list[int]):
    _Stub.script, _Stub.calls = list(script), 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_the_client_retries_on_503_and_429_but_never_on_4xx():
    png = encode_png(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))
    with _stub_server([503, 429, 503]) as url, RewardClient(url, retries=3, backoff_s=0.01) as client:
        assert client.score([png], ["blast"]).tolist() == [0.25]
        assert _Stub.calls == 4
    with _stub_server([503] * 10) as url, RewardClient(url, retries=2, backoff_s=0.01) as client:
        with pytest.raises(RewardServiceError, match="3 attempts"):
            client.score([png], ["blast"])
        assert _Stub.calls == 3
    for status in (400, 413, 422):
        with _stub_server([status]) as url, RewardClient(url, retries=3, backoff_s=0.01) as client:
            with pytest.raises(RewardRequestError, match=f"stub says {status}"):
                client.score([png], ["blast"])
            assert _Stub.calls == 1
    with _stub_server([]) as url:
        pass  # the server is gone: connection refused, retried, then a clear error
    with (
        RewardClient(url, retries=1, backoff_s=0.01) as client,
        pytest.raises(RewardServiceError, match="ConnectError"),
    ):
        client.score([png], ["blast"])


def test_the_config_sets_replicas_or_autoscaling_and_rejects_what_cannot_work(models):
    from pathalign_ray.config import ConfigError
    from pathalign_ray.reward.serve import build_app

    fixed = build_app(ServeRewardConfig(model=str(models[0]), num_replicas=2, threads_per_replica=2))
    deployment = fixed._bound_deployment
    assert deployment.num_replicas == 2 and deployment.ray_actor_options["num_cpus"] == 2
    scaled = build_app(
        load_config(
            ServeRewardConfig,
            None,
            [f"model={models[0]}", "autoscaling.max_replicas=3", "autoscaling.target_ongoing_requests=16"],
        )
    )
    autoscaling = scaled._bound_deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 3, 16)
    with pytest.raises(ConfigError, match="max_images_per_request"):
        load_config(ServeRewardConfig, None, ["max_images_per_request=64", "max_batch_size=32"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ServeRewardConfig, None, ["max_batch=8"])
    with pytest.raises(FileNotFoundError, match="model=.*missing: no such folder"):
        switch_model(ServeRewardConfig(model=str(models[0])), str(models[0].parent / "missing"))
