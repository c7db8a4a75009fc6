"""The reward model r(x, c) as an HTTP endpoint on Ray Serve, with dynamic batching across requests.

    POST /v1/score    {"images": [base64 PNG/JPEG, ...], "classes": [declared class, ...]}
                      or multipart/form-data: `files` parts and `classes` fields
                      -> {"scores": [P(plausible), ...], "model": {"id": ..., "version": ...}}
    GET  /v1/classes  the declared classes the model knows, its image size and version
    GET  /healthz     200 while the replica can score
    GET  /openapi.json

Every image is decoded and brought to the model's size and RGB (`decode_image`) in the request
handler (`fast_path.ScoreFastPath` for JSON bodies to /v1/score, FastAPI for the rest); the images of
concurrent requests (HTTP or handle calls to `score`) then share one forward pass through
`@serve.batch`, counted in images, not requests. A bad request is a 4xx whose message names the
fault; it never reaches the batch. A new model version arrives through
`user_config={"model": PATH}`: `reconfigure` loads it beside the serving one and swaps them
between two batches, so no request is dropped and each response names the version that scored it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from pathalign_ray.cluster import init_ray, keep_serving
from pathalign_ray.config import (
    Location,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
    config_to_dict,
)
from pathalign_ray.images import ImageError, decode_image, normalise_array, to_model_range
from pathalign_ray.metrics import record_endpoint_batch, record_endpoint_latency
from pathalign_ray.reward import fast_path
from pathalign_ray.reward.fast_path import (
    SCORE_ROUTE,
    BadRequest,
    ScoreFastPath,
    decode_json,
    is_json,
    read_capped,
    score_decoded,
)

APP_NAME = "reward"
DEPLOYMENT_NAME = "RewardScorer"
# The forward thread gives up the GIL inside every torch kernel and must win it back from the busy
# event loop after each one; at Python's default 5 ms switch interval it waits up to that long per
# kernel (a batch-5 forward beside a busy Python thread: 189 ms against 38 ms alone; at 0.2 ms: 50 ms).
GIL_SWITCH_INTERVAL_S = 0.0002


@config_dataclass
class RewardAutoscaling:
    min_replicas: NonNegativeInt = 1  # replicas kept up when idle
    max_replicas: PositiveInt = 2  # upper bound; each replica reserves threads_per_replica Ray CPUs
    # per replica: a full batch, so replicas are added only once batches fill
    target_ongoing_requests: PositiveFloat = 32.0

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: {self.min_replicas} is above max_replicas {self.max_replicas}")


@config_dataclass
class ServeRewardConfig:
    model: Location = ""  # reward model folder read by every replica (save_reward_model): a URI, or a shared path
    host: str = "127.0.0.1"  # HTTP address of the Serve proxy; 0.0.0.0 to reach it from other machines
    port: int = 8000
    # the routes are PREFIX/v1/score, PREFIX/v1/classes, PREFIX/healthz
    route_prefix: Annotated[str, Field(pattern="^/")] = "/"
    num_replicas: PositiveInt = 1  # fixed replica count; unused when `autoscaling` is set
    autoscaling: RewardAutoscaling | None = None  # scale replicas with load instead of num_replicas
    threads_per_replica: PositiveInt = 1  # torch intra-op threads per replica, also the Ray CPUs it reserves
    max_batch_size: PositiveInt = 32  # images per forward pass, summed over the requests batched together
    batch_wait_timeout_s: NonNegativeFloat = 0.01  # s a forming batch waits for more while a forward runs; 0 when idle
    # requests in flight per replica; 2x max_batch_size: the next batch forms meanwhile
    max_ongoing_requests: PositiveInt = 64
    max_images_per_request: PositiveInt = 32  # one request's images must fit in one batch: <= max_batch_size
    # request bodies above this are refused with 413 before they are read in full
    max_body_bytes: PositiveInt = 8 * 2**20
    access_log: bool = False  # Serve's per-request access log; off, it costs about 5 ms per request on 2 cores

    def __post_init__(self) -> None:
        if self.max_images_per_request > self.max_batch_size:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) must be <= max_batch_size "
                f"({self.max_batch_size}): one request's images are scored in one batch"
            )


@dataclasses.dataclass(frozen=True)
class _LoadedModel:
    model: Any  # RewardModel, eval mode
    path: str
    info: dict  # {"id", "version"} as reported in every response
    class_names: tuple[str, ...]
    image_size: int


def _load(path: str) -> _LoadedModel:
    from pathalign_ray.reward.model import load_reward_model  # heavy: reward.model imports torch and diffusers

    model, meta = load_reward_model(path)
    info = {"id": str(meta.get("id", Path(path).name)), "version": meta.get("version")}
    return _LoadedModel(model, str(path), info, tuple(model.class_names), int(model.config.image_size))


def _images_in(batch: list[tuple[np.ndarray, list[str]]]) -> int:
    return sum(len(images) for images, _ in batch)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class RewardScorer:
    """One replica: a plain RewardModel, a batch queue, and the FastAPI app of `create_app` behind `ScoreFastPath`."""

    def __init__(self, config: ServeRewardConfig):
        import torch

        torch.set_num_threads(config.threads_per_replica)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the replica's process: see GIL_SWITCH_INTERVAL_S
        self._config = config
        # One thread runs every forward pass, so the replica's event loop keeps reading and
        # decoding requests while a batch computes.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-forward")
        self._current = _load(config.model)
        self._stats = {"batches": 0, "images": 0, "requests": 0}
        self.app_name = serve.get_replica_context().app_name  # the tag of this replica's dashboard metrics
        self._score_batch.set_max_batch_size(config.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(0.0)  # idle: a lone request runs at once (see _score_batch)

    def __serve_build_asgi_app__(self):
        return ScoreFastPath(self, create_app(self))

    async def reconfigure(self, user_config: dict) -> None:
        """user_config {"model": PATH}: load that version while the serving one keeps scoring, then swap.

        A batch reads the model once when it starts, so it is scored by one version whole; the next
        batch gets the new one. A failed load raises, and Serve reports the update as failed;
        `switch_model` checks the folder before it asks.
        """
        path = (user_config or {}).get("model")
        if not path or str(path) == self._current.path:
            return
        self._current = await asyncio.to_thread(_load, str(path))

    # -- what the routes and handle callers use ---------------------------------------------

    @property
    def current(self) -> _LoadedModel:
        return self._current

    @property
    def config(self) -> ServeRewardConfig:
        return self._config

    async def score(self, images: np.ndarray | list[bytes], classes: list[str]) -> dict:
        """Handle entry point: (N, H, W, 3) uint8 or N encoded images -> {"scores": [N floats], "model": info}.

        A bad input raises BadRequest (a ValueError) naming the fault.
        """
        started = time.perf_counter()
        if isinstance(images, np.ndarray):
            pixels = self.validate_arrays(images, classes)
        else:
            pixels = self.decode(list(images), classes)
        result = await self.score_pixels(pixels, list(classes))
        record_endpoint_latency(time.perf_counter() - started, self.app_name)
        return result

    def stats(self) -> dict:
        """Batches run, images and requests scored by this replica (for benchmarks and the dashboard)."""
        replica = serve.get_replica_context().replica_id.unique_id
        mean = self._stats["images"] / max(1, self._stats["batches"])
        return dict(self._stats, mean_batch_size=mean, replica=replica)

    def check_request(self, n_images: int, classes: list[str]) -> None:
        limit = self._config.max_images_per_request
        if n_images == 0:
            raise BadRequest(422, "images is empty: send at least one image")
        if n_images > limit:
            raise BadRequest(413, f"{n_images} images in one request; the maximum is {limit}: split the request")
        if len(classes) != n_images:
            raise BadRequest(422, f"images and classes differ in length: {n_images} images, {len(classes)} classes")
        known = self._current.class_names
        for i, name in enumerate(classes):
            if not isinstance(name, str):
                raise BadRequest(422, f"classes[{i}] must be a string, got {type(name).__name__}")
            if name not in known:
                message = f"classes[{i}]: unknown class {name[:100]!r}; the reward model knows {', '.join(known)}"
                raise BadRequest(422, message)

    def decode(self, encoded: list[bytes], classes: list[str], field: str = "images") -> np.ndarray:
        """Encoded images -> (N, S, S, 3) uint8 at the serving model's size S; BadRequest names a bad one."""
        self.check_request(len(encoded), classes)
        size = self._current.image_size
        pixels = []
        for i, data in enumerate(encoded):
            try:
                pixels.append(decode_image(data, size, f"{field}[{i}]"))
            except ImageError as error:
                raise BadRequest(422, str(error)) from None
            except Exception as error:  # a decoder tripping over hostile bytes is still the request's fault
                message = f"{field}[{i}]: unreadable image data ({type(error).__name__}: {str(error)[:200]})"
                raise BadRequest(422, message) from None
        return np.stack(pixels)

    def validate_arrays(self, images: np.ndarray, classes: list[str]) -> np.ndarray:
        if images.ndim != 4:
            raise BadRequest(422, f"images must be (N, H, W, C), got shape {images.shape}")
        self.check_request(len(images), classes)
        size = self._current.image_size
        try:
            return np.stack([normalise_array(image, size, f"images[{i}]") for i, image in enumerate(images)])
        except ImageError as error:
            raise BadRequest(422, str(error)) from None

    async def score_pixels(self, pixels: np.ndarray, classes: list[str]) -> dict:
        scores, info = await self._score_batch((pixels, classes))
        return {"scores": scores, "model": info}

    # -- the batch ------------------------------------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_images_in)
    async def _score_batch(self, batch: list[tuple[np.ndarray, list[str]]]) -> list[tuple[list[float], dict]]:
        loaded = self._current  # one version scores the whole batch, even if a swap lands meanwhile
        # While this forward pass runs, the next batch may wait up to batch_wait_timeout_s for
        # requests to join it; once the model is idle again, a new request does not wait at all.
        self._score_batch.set_batch_wait_timeout_s(self._config.batch_wait_timeout_s)
        try:
            scores = await asyncio.get_running_loop().run_in_executor(self._executor, _forward, loaded, batch)
        finally:
            self._score_batch.set_batch_wait_timeout_s(0.0)
        self._stats["batches"] += 1
        self._stats["images"] += sum(len(s) for s in scores)
        self._stats["requests"] += len(batch)
        record_endpoint_batch(sum(len(s) for s in scores), self.app_name)
        return [(s, loaded.info) for s in scores]


def _forward(loaded: _LoadedModel, batch: list[tuple[np.ndarray, list[str]]]) -> list[list[float]]:
    """One forward pass over the images of every request in the batch; scores split back per request."""
    import torch

    index = {name: i for i, name in enumerate(loaded.class_names)}
    pixels, class_ids, unknown = [], [], []
    for images, classes in batch:
        if images.shape[1] != loaded.image_size:  # decoded before a swap to a model of another size
            images = np.stack([normalise_array(image, loaded.image_size) for image in images])
        pixels.append(images)
        class_ids.extend(index.get(name, 0) for name in classes)
        unknown.append(any(name not in index for name in classes))
    x = torch.from_numpy(to_model_range(np.concatenate(pixels)))
    with torch.inference_mode():
        scores = loaded.model.score(x, torch.tensor(class_ids, dtype=torch.int64)).tolist()
    out, start = [], 0
    for (images, _), bad in zip(batch, unknown):
        # A class the new version no longer knows: NaN, reported as 409 by the route.
        out.append([float("nan")] * len(images) if bad else scores[start : start + len(images)])
        start += len(images)
    return out


# -- the HTTP app ------------------------------------------------------------------------------


class ModelInfo(BaseModel):
    id: str
    version: Any = None


class ScoreRequest(BaseModel):
    images: list[str] = Field(description="base64 PNG or JPEG (a data: URL prefix is accepted)")
    classes: list[str] = Field(description="declared class of each image, same length as images")


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="P(plausible as the declared class) per image, in [0, 1]")
    model: ModelInfo


def create_app(scorer: RewardScorer) -> FastAPI:
    """The FastAPI app of one replica; its routes call the replica's methods."""
    limit = scorer.config.max_body_bytes
    app = FastAPI(
        title="pathalign_ray reward model",
        description="r(x, c): the probability that an expert judges image x plausible as declared cell type c.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, error: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "; ".join(str(e.get("msg")) for e in error.errors())}, status_code=422)

    multipart_schema = {
        "type": "object",
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "classes": {
                "type": "array",
                "items": {"type": "string"},
                "description": "a field per file, or comma-separated",
            },
        },
        "required": ["files", "classes"],
    }
    errors = {
        "400": {"description": "malformed body: not JSON, bad multipart, bad Content-Length"},
        "409": {"description": "the model version changed under the request and no longer knows a class"},
        "413": {"description": "body over max_body_bytes, or more images than max_images_per_request"},
        "415": {"description": "Content-Type is neither application/json nor multipart/form-data"},
        "422": {
            "description": "bad base64, not an image, truncated, unknown class, lengths differ, empty, wrong types"
        },
    }

    @app.post(
        SCORE_ROUTE,
        response_model=ScoreResponse,
        responses=errors,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": ScoreRequest.model_json_schema()},
                    "multipart/form-data": {"schema": multipart_schema},
                },
            }
        },
    )
    async def score(request: Request):
        """Score images against their declared classes, batched with concurrent requests."""
        started = time.perf_counter()
        body = await read_capped(request.headers.get("content-length"), request.receive, limit)
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            encoded, classes = await _parse_multipart(request, body)
            pixels = scorer.decode(encoded, classes, field="files")
        elif is_json(content_type):
            pixels, classes = decode_json(scorer, body)
        else:
            raise BadRequest(415, f"Content-Type {content_type[:80]!r}: send application/json or multipart/form-data")
        return JSONResponse(await score_decoded(scorer, pixels, classes, started))

    @app.get("/v1/classes")
    async def classes() -> dict:
        """The declared classes the serving model knows, its input size and version."""
        current = scorer.current
        return {"classes": list(current.class_names), "image_size": current.image_size, "model": current.info}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": scorer.current.info}

    return app


async def _parse_multipart(request: Request, body: bytes) -> tuple[list[bytes], list[str]]:
    """`files` parts and `classes` fields of a multipart body already read (and capped)."""
    from starlette.datastructures import UploadFile

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as error:  # python-multipart and starlette raise several types for a bad body
        message = getattr(error, "detail", None) or getattr(error, "message", None) or str(error)
        raise BadRequest(400, f"malformed multipart body: {str(message)[:200]}") from None
    try:
        files, classes = [], []
        for key, value in form.multi_items():
            if key == "files":
                if not isinstance(value, UploadFile):
                    raise BadRequest(422, "files must be file parts (with a filename), not text fields")
                files.append(await value.read())
            elif key == "classes":
                if not isinstance(value, str):
                    raise BadRequest(422, "classes must be text fields, not files")
                classes.extend(name.strip() for name in value.split(",") if name.strip())
            else:
                raise BadRequest(422, f"unknown form field {key[:80]!r}: send files and classes")
        return files, classes
    finally:
        await form.close()


# -- deploying ---------------------------------------------------------------------------------


def build_app(config: ServeRewardConfig, user_config: dict | None = None):
    """The Serve application: RewardScorer with the replica, batching and resource settings of `config`."""
    if not config.model:
        raise ValueError("model is required: the reward model folder written by save_reward_model")
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.threads_per_replica},
        "logging_config": {"enable_access_log": config.access_log},
    }
    if config.autoscaling is not None:
        options["autoscaling_config"] = dataclasses.asdict(config.autoscaling)
    else:
        options["num_replicas"] = config.num_replicas
    if user_config is not None:
        options["user_config"] = user_config
    # A version that changes with the code and the config but not with user_config: redeploying
    # the same config with another {"model": PATH} then reconfigures the running replicas in
    # place (Serve's lightweight update) instead of replacing them. Serve leaves `version` to
    # itself since 2.x (a random one per serve.run); `_internal` is how its own builders set it.
    return RewardScorer.options(_internal=True, version=_code_version(config), **options).bind(config)


def _code_version(config: ServeRewardConfig) -> str:
    from pathalign_ray.reward import model  # heavy: reward.model imports torch and diffusers

    digest = hashlib.sha256(json.dumps(config_to_dict(config), sort_keys=True).encode())
    for module in (__file__, fast_path.__file__, model.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:16]


def app_builder(args: dict):
    """Import path for Serve config files (`serve run configs/serve_reward_app.yaml`); args: ServeRewardConfig fields.

    host, port and route_prefix come from the file's http_options and application entry there.
    """
    return build_app(ServeRewardConfig(**dict(args)))


def start_reward_server(config: ServeRewardConfig) -> str:
    """Deploy the reward endpoint and return its base URL. It outlives this call; `serve.delete(APP_NAME)` ends it."""
    _check_model(config.model)  # here, before Ray: a replica failing to load would be retried over and over
    init_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix=config.route_prefix)
    return f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}/"


def _check_model(model: str) -> None:
    from pathalign_ray.reward.model import reward_model_folder  # heavy: reward.model imports torch and diffusers

    try:
        reward_model_folder(model)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"model={model}: {error} (jobs/train_reward.py or make demo writes one)") from None


def switch_model(config: ServeRewardConfig, model: str) -> None:
    """Roll the endpoint deployed with `config` to the model folder `model`, in place and without dropping requests.

    Replicas load the new version beside the serving one (`reconfigure`) and swap between two batches.
    Deployed from a Serve config file instead, change `user_config: {model: PATH}` there and `serve deploy` it.
    """
    _check_model(model)  # here: a replica failing to load would be restarted over and over
    serve.run(build_app(config, user_config={"model": model}), name=APP_NAME, route_prefix=config.route_prefix)


def serve_until_interrupted(config: ServeRewardConfig) -> None:
    """jobs/serve_reward.py: deploy and print the URL; on a local cluster, keep it up until Ctrl-C."""
    url = start_reward_server(config)
    print(f"reward endpoint: {url}v1/score (classes: {url}v1/classes, OpenAPI: {url}openapi.json)")
    keep_serving(APP_NAME)
