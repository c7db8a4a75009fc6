"""The labelling page: experts judge synthetic samples against their declared cell type.

`create_app(config)` is a plain FastAPI app over a run directory: the samples folder written by
jobs/sample.py, the data set for reference images, and the feedback store in RUN_DIR/feedback.
`LabelingPage` hosts it on Ray Serve. Experts sign in with a name and the access token the config
gives them; the session is an HttpOnly cookie, so images load with it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import secrets
import uuid
from functools import cache
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Cookie, FastAPI, HTTPException, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from pathalign_ray import storage
from pathalign_ray.config import Location, config_dataclass
from pathalign_ray.data.shards import read_dataset
from pathalign_ray.experts.agreement import agreement_table
from pathalign_ray.experts.checklist import CRITERIA
from pathalign_ray.experts.feedback import FeedbackRecord, FeedbackStore
from pathalign_ray.images import encode_png

SESSION_COOKIE = "pathalign_session"
COMPACT_EVERY = 200  # appends between compactions of the feedback store: reads stay fast, files stay few
PAGE = Path(__file__).parent / "static" / "index.html"
AccessToken = Annotated[str, Field(min_length=16)]  # an expert's secret on the labelling page


@config_dataclass
class LabelConfig:
    run_dir: Location = "runs/demo"  # a path or URI: the run whose samples are judged; verdicts go to RUN_DIR/feedback
    samples: str = "samples/pretrained"  # sample folder (jobs/sample.py), relative to run_dir
    reference_data: str = (
        "data"  # data set folder (jobs/make_dataset.py) for real reference images, relative to run_dir
    )
    round: int = 0  # feedback round the verdicts belong to
    host: str = "127.0.0.1"  # HTTP address of the Serve proxy
    port: int = 8000
    route_prefix: Annotated[str, Field(pattern="^/")] = "/label"  # the page lives at http://HOST:PORT/label/
    # expert_id -> access token, one each; at least one expert
    experts: Annotated[dict[str, AccessToken], Field(min_length=1)] = dataclasses.field(default_factory=dict)
    references_per_class: int = 6  # real images shown beside each sample

    def __post_init__(self) -> None:
        if len(set(self.experts.values())) != len(self.experts):
            raise ValueError("experts: two experts share an access token")


class SessionRequest(BaseModel):
    expert_id: str = Field(min_length=1, max_length=128)
    token: str = Field(min_length=1, max_length=512)


class VerdictRequest(BaseModel):
    sample_id: str = Field(min_length=1, max_length=256)
    verdict: str
    failed_criteria: list[str] = Field(default_factory=list, max_length=len(CRITERIA))
    believed_class: str | None = Field(default=None, max_length=128)
    note: str | None = Field(default=None, max_length=2000)
    nonce: str = Field(
        min_length=8, max_length=64, pattern=r"^[0-9a-zA-Z_-]+$"
    )  # one per shown sample: a replay is refused


def create_app(config: LabelConfig) -> FastAPI:
    from pathalign_ray.generator.sampling import read_manifest  # heavy: sampling imports ray, torch and diffusers

    samples_dir = storage.join(config.run_dir, config.samples)
    manifest = {row["sample_id"]: row for row in read_manifest(samples_dir).to_pylist()}
    order = list(manifest)
    reference = read_dataset(storage.join(config.run_dir, config.reference_data), "train")
    references = {
        name: [
            encode_png(image) for image in reference.images[reference.labels == index][: config.references_per_class]
        ]
        for index, name in enumerate(reference.class_names)
    }
    store = FeedbackStore(storage.join(config.run_dir, "feedback"))
    experts_by_token = {token: expert for expert, token in config.experts.items()}
    appends = itertools.count(1)
    app = FastAPI(title="pathalign_ray labelling", docs_url=None, redoc_url=None)

    def expert_of(session: str | None) -> str:
        expert = experts_by_token.get(session or "")
        if expert is None:
            raise HTTPException(401, "sign in first: no valid session")
        return expert

    @cache
    def image_bytes(sample_id: str) -> bytes:
        return storage.read_bytes(storage.join(samples_dir, manifest[sample_id]["path"]))

    def sample_payload(sample_id: str, expert: str) -> dict:
        row = manifest[sample_id]
        count = len(references.get(row["declared_class"], []))
        judged = store.judged_by(expert) & manifest.keys()
        return {
            "done": False,
            "sample_id": sample_id,
            "declared_class": row["declared_class"],
            "image_url": f"api/images/{sample_id}",
            "reference_urls": [f"api/references/{row['declared_class']}/{i}" for i in range(count)],
            "progress": {"done": len(judged), "total": len(order)},
            "nonce": uuid.uuid4().hex,
        }

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.post("/api/session")
    def sign_in(request: SessionRequest, response: Response) -> dict:
        token = config.experts.get(request.expert_id, "")
        if not secrets.compare_digest(token.encode(), request.token.encode()) or not token:
            raise HTTPException(401, "unknown expert or wrong access token")
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict")
        return {"expert_id": request.expert_id}

    @app.get("/api/session")
    def session(pathalign_session: str | None = Cookie(default=None)) -> dict:
        return {"expert_id": expert_of(pathalign_session)}

    @app.get("/api/next")
    def next_sample(pathalign_session: str | None = Cookie(default=None)) -> dict:
        expert = expert_of(pathalign_session)
        pending = store.pending(order, expert)
        if not pending:
            return {"done": True, "progress": {"done": len(order), "total": len(order)}}
        return sample_payload(pending[0], expert)

    @app.post("/api/undo")
    def undo(pathalign_session: str | None = Cookie(default=None)) -> dict:
        """Reopen this expert's latest verdict of the round; the next verdict on it supersedes it."""
        expert = expert_of(pathalign_session)
        latest = store.latest().to_pylist()
        mine = [
            r for r in latest if r["expert_id"] == expert and r["round"] == config.round and r["sample_id"] in manifest
        ]
        if not mine:
            raise HTTPException(404, "nothing to undo in this round")
        return sample_payload(max(mine, key=lambda r: r["timestamp"])["sample_id"], expert)

    @app.get("/api/images/{sample_id}")
    def sample_image(sample_id: str, pathalign_session: str | None = Cookie(default=None)) -> Response:
        expert_of(pathalign_session)
        if sample_id not in manifest:
            raise HTTPException(404, f"unknown sample {sample_id!r}")
        return Response(image_bytes(sample_id), media_type="image/png")

    @app.get("/api/references/{class_name}/{index}")
    def reference_image(class_name: str, index: int, pathalign_session: str | None = Cookie(default=None)) -> Response:
        expert_of(pathalign_session)
        if class_name not in references:
            raise HTTPException(404, f"unknown class {class_name!r}; known: {', '.join(references)}")
        if not 0 <= index < len(references[class_name]):
            raise HTTPException(404, f"class {class_name!r} has {len(references[class_name])} reference images")
        return Response(references[class_name][index], media_type="image/png")

    @app.post("/api/verdicts", status_code=201)
    def add_verdict(request: VerdictRequest, pathalign_session: str | None = Cookie(default=None)) -> dict:
        expert = expert_of(pathalign_session)
        row = manifest.get(request.sample_id)
        if row is None:
            raise HTTPException(404, f"unknown sample {request.sample_id!r}")
        if request.believed_class is not None and request.believed_class not in references:
            raise HTTPException(422, f"unknown class {request.believed_class!r}; known: {', '.join(references)}")
        try:
            record = FeedbackRecord(
                record_id=request.nonce,
                sample_id=request.sample_id,
                image_ref=str(Path(config.samples) / row["path"]),
                image_sha256=hashlib.sha256(image_bytes(request.sample_id)).hexdigest(),
                declared_class=row["declared_class"],
                expert_id=expert,
                verdict=request.verdict,
                failed_criteria=tuple(request.failed_criteria),
                believed_class=request.believed_class,
                note=request.note,
                round=config.round,
            )
            result = store.append([record])
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        if result.duplicates:
            raise HTTPException(409, f"verdict {request.nonce} was already stored: a replayed request")
        if next(appends) % COMPACT_EVERY == 0:
            store.compact()
        return {"record_id": request.nonce}

    @app.get("/api/summary")
    def summary_json(pathalign_session: str | None = Cookie(default=None)) -> dict:
        expert_of(pathalign_session)
        return summarise(store, list(manifest.values()))

    @app.get("/summary", response_class=HTMLResponse)
    def summary_page(pathalign_session: str | None = Cookie(default=None)) -> str:
        expert_of(pathalign_session)
        return render_summary(summarise(store, list(manifest.values())))

    @app.get("/api", include_in_schema=False)
    def api_root() -> RedirectResponse:
        return RedirectResponse("./")

    return app


def summarise(store: FeedbackStore, samples: list[dict]) -> dict:
    """Counts and plausibility per declared class, failed criteria, and agreement between experts."""
    latest = store.latest()
    rows = latest.to_pylist()
    per_class: dict[str, dict] = {}
    for row in rows:
        entry = per_class.setdefault(row["declared_class"], {"verdicts": 0, "plausible": 0})
        entry["verdicts"] += 1
        entry["plausible"] += row["verdict"] == "plausible"
    for entry in per_class.values():
        entry["plausibility"] = entry["plausible"] / entry["verdicts"]
    failed = {name: sum(name in (row["failed_criteria"] or []) for row in rows) for name in CRITERIA}
    return {
        "samples": len(samples),
        "verdicts": len(rows),
        "experts": sorted({row["expert_id"] for row in rows}),
        "per_class": per_class,
        "failed_criteria": failed,
        "agreement": agreement_table(latest) if len(rows) else {},
    }


def render_summary(summary: dict) -> str:
    class_rows = "".join(
        f"<tr><td>{name}</td><td>{entry['verdicts']}</td><td>{entry['plausibility']:.0%}</td></tr>"
        for name, entry in sorted(summary["per_class"].items())
    )
    criteria_rows = "".join(
        f"<tr><td>{name}</td><td>{count}</td></tr>" for name, count in summary["failed_criteria"].items()
    )
    agreement = summary["agreement"]
    overall = agreement.get("overall", {}) if isinstance(agreement, dict) else {}
    agreement_rows = "".join(f"<tr><td>{key}</td><td>{_fmt(value)}</td></tr>" for key, value in overall.items())
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>feedback summary</title>
<style>body{{font:15px system-ui,sans-serif;margin:24px}}table{{border-collapse:collapse;margin:0 0 24px}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}</style></head><body>
<p><a href="./">back to labelling</a></p>
<h1>Feedback summary</h1>
<p>{summary["verdicts"]} verdicts on {summary["samples"]} samples by {len(summary["experts"])} experts
({", ".join(summary["experts"])}).</p>
<h2>Plausibility per declared class</h2>
<table><tr><th>class</th><th>verdicts</th><th>plausible</th></tr>{class_rows}</table>
<h2>Failed criteria</h2><table><tr><th>criterion</th><th>times failed</th></tr>{criteria_rows}</table>
<h2>Agreement between experts</h2><table>{agreement_rows}</table>
</body></html>"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.3f}"
    return str(value)
