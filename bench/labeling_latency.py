"""Latency of the labelling page's "next image" on Ray Serve, against a trivial endpoint on the same Serve.

    flock /tmp/pathalign_heavy.lock .venv/bin/python bench/labeling_latency.py [--requests 300] [--samples 400]

A temporary run directory holds SAMPLES procedural 32 px images as a sample folder (PNGs and a
manifest, as jobs/sample.py writes them) and a small reference data set. The page is deployed as
jobs/label.py deploys it (start_labeling) on a local Ray cluster, Serve's proxy on 127.0.0.1 at a
free port. One expert signs in with httpx (one keep-alive connection, as a browser tab) and labels
REQUESTS samples in a row, as the page does: GET api/next, GET the sample image it names (timed
together: "next image"), then the reference images it names (timed apart: the same 6 URLs for every
sample of a class), then POST the verdict (timed apart), so every "next" is a new sample and the feedback
store grows. Baseline, interleaved request by request: the same three calls to a FastAPI app with
fixed answers (the same JSON and PNG bytes), deployed on the same Serve instance. Prints
p50/p95/p99 and writes bench/results/labeling_latency.json; shuts Serve and Ray down at the end.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_common import write_result
from fastapi import FastAPI, Response
from ray import serve

from pathalign_ray.data import procedural
from pathalign_ray.data.shards import write_dataset
from pathalign_ray.experts.labeling.app import LabelConfig
from pathalign_ray.experts.labeling.serve import start_labeling
from pathalign_ray.generator.sampling import MANIFEST_FILE
from pathalign_ray.images import encode_png

SIZE = 32  # px, as the pretrained model's samples
TOKEN = "bench-token-0123456789abcdef"
WARMUP = 10  # requests of each kind before timing

baseline_app = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(baseline_app)
class Baseline:
    """Fixed answers of the page's shapes: what Serve's proxy and FastAPI cost with no work behind them."""

    def __init__(self, payload: dict, image: bytes):
        self._payload, self._image = payload, image

    @baseline_app.get("/api/next")
    def next_sample(self) -> dict:
        return self._payload

    @baseline_app.get("/api/images/{sample_id}")
    def sample_image(self, sample_id: str) -> Response:
        return Response(self._image, media_type="image/png")

    @baseline_app.post("/api/verdicts", status_code=201)
    def add_verdict(self, body: dict) -> dict:
        return {"record_id": body.get("nonce")}


def make_run_dir(root: Path, samples: int) -> Path:
    """RUN_DIR/samples/pretrained (PNGs + manifest) and RUN_DIR/data (the reference data set)."""
    run_dir = root / "run"
    folder = run_dir / "samples" / "pretrained"
    (folder / "images").mkdir(parents=True)
    classes = procedural.DEFAULT_CELL_TYPES
    data = procedural.generate(-(-samples // len(classes)), SIZE, seed=77, classes=classes)
    rows = []
    for j in range(samples):  # classes interleaved, as an expert's queue mixes them
        index = (j % len(classes)) * len(data) // len(classes) + j // len(classes)
        row = {"sample_id": f"bench-{j:05d}", "declared_class": classes[data.labels[index]], "seed": j}
        row.update(model_id="procedural", model_step=-1, path=f"images/{row['sample_id']}.png")
        (folder / row["path"]).write_bytes(encode_png(data.images[index]))
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), folder / MANIFEST_FILE)
    reference = procedural.generate(8, SIZE, seed=78, classes=classes)
    write_dataset(reference, run_dir / "data", test_fraction=0.25, seed=0, source="bench")
    return run_dir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return 1000 * (time.perf_counter() - started)


def label_one(client: httpx.Client) -> tuple[float, float, float, dict]:
    """(next image ms, references ms, verdict ms, the next payload) for one sample, as the page does it."""
    started = time.perf_counter()
    response = client.get("api/next")
    response.raise_for_status()
    payload = response.json()
    client.get(payload["image_url"]).raise_for_status()
    next_image = 1000 * (time.perf_counter() - started)
    references = timed(lambda: [client.get(url).raise_for_status() for url in payload.get("reference_urls", [])])
    verdict = {"sample_id": payload["sample_id"], "verdict": "plausible", "nonce": payload["nonce"]}
    posted = timed(lambda: client.post("api/verdicts", json=verdict).raise_for_status())
    return next_image, references, posted, payload


def percentiles(values: list[float]) -> dict:
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50_ms": round(p50, 2),
        "p95_ms": round(p95, 2),
        "p99_ms": round(p99, 2),
        "mean_ms": round(statistics.fmean(values), 2),
        "n": len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="samples labelled (timed), after the warm-up")
    parser.add_argument("--samples", type=int, default=400, help="samples in the run's queue")
    args = parser.parse_args()
    if args.samples < args.requests + WARMUP:
        parser.error("--samples must exceed --requests by the warm-up, so that every next is a new sample")

    from pathalign_ray.cluster import init_ray

    root = Path(tempfile.mkdtemp(prefix="labeling_latency_"))
    try:
        run_dir = make_run_dir(root, args.samples)
        port = free_port()
        init_ray(num_cpus=2, dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = LabelConfig(run_dir=str(run_dir), port=port, experts={"bench": TOKEN})
        url = start_labeling(config)
        page = httpx.Client(base_url=url, timeout=30)
        page.post("api/session", json={"expert_id": "bench", "token": TOKEN}).raise_for_status()
        first = page.get("api/next").json()
        image = page.get(first["image_url"]).content
        serve.run(Baseline.bind(first, image), name="latency_baseline", route_prefix="/baseline")
        baseline = httpx.Client(base_url=f"http://127.0.0.1:{port}/baseline/", timeout=30)

        def baseline_one():
            started = time.perf_counter()
            payload = baseline.get("api/next").raise_for_status().json()
            baseline.get(payload["image_url"]).raise_for_status()
            next_image = 1000 * (time.perf_counter() - started)
            verdict = {"sample_id": payload["sample_id"], "verdict": "plausible", "nonce": payload["nonce"]}
            return next_image, timed(lambda: baseline.post("api/verdicts", json=verdict).raise_for_status())

        for _ in range(WARMUP):
            label_one(page), baseline_one()
        timings = {
            "page_next_image": [],
            "page_references": [],
            "page_verdict": [],
            "baseline_next_image": [],
            "baseline_verdict": [],
        }
        seen = set()
        started = time.perf_counter()
        for i in range(args.requests):  # interleaved, and which goes first alternates: the same noise on both
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    next_image, references, posted, payload = label_one(page)
                    seen.add(payload["sample_id"])
                    timings["page_next_image"].append(next_image)
                    timings["page_references"].append(references)
                    timings["page_verdict"].append(posted)
                else:
                    next_image, posted = baseline_one()
                    timings["baseline_next_image"].append(next_image)
                    timings["baseline_verdict"].append(posted)
        elapsed = time.perf_counter() - started
        assert len(seen) == args.requests, "every next image must be a new sample"
        page.close(), baseline.close()
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    figures = {name: percentiles(values) for name, values in timings.items()}
    figures["p95_page_over_baseline"] = round(
        figures["page_next_image"]["p95_ms"] / figures["baseline_next_image"]["p95_ms"], 2
    )
    figures.update(
        samples=args.samples,
        requests=args.requests,
        image_px=SIZE,
        image_bytes=len(image),
        references_per_sample=len(first["reference_urls"]),
        seconds=round(elapsed, 1),
    )
    print(f"{'':28} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name in timings:
        row = figures[name]
        print(f"{name:28} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['mean_ms']:>8.1f}")
    print(f"next image p95, page / baseline: {figures['p95_page_over_baseline']}")
    print(f"wrote {write_result('labeling_latency', figures)}")


if __name__ == "__main__":
    main()
