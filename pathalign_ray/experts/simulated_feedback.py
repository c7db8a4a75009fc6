"""Simulated experts label a run's samples through the same feedback store the labelling page writes to.

Each image is measured once by the simulated pathologist; each expert then judges the
measurements at its own strictness with its own random flips (see pathologist.SimulatedExpert).
Record ids are derived from (round, expert, sample), so rerunning the job stores nothing twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from pathalign_ray import storage
from pathalign_ray.config import Fraction, Location, PositiveInt, config_dataclass
from pathalign_ray.experts.feedback import FeedbackRecord, FeedbackStore
from pathalign_ray.images import decode_image
from pathalign_ray.progress import bar


@config_dataclass
class SimulateFeedbackConfig:
    run_dir: Location = "runs/demo"  # a path or URI; verdicts go to RUN_DIR/feedback
    samples: str = "samples/pretrained"  # sample folder (jobs/sample.py), relative to run_dir
    experts: PositiveInt = 3  # simulated pathologists, named sim_expert_0..N-1
    flip_rate: Fraction = 0.05  # probability an expert turns a verdict over (disagreement between experts)
    # expert strictness runs evenly from 1 - spread/2 to 1 + spread/2
    strictness_spread: Annotated[float, Field(ge=0, lt=2)] = 0.2
    round: int = 0  # feedback round the verdicts belong to
    seed: int = 0  # the experts' flips
    batch_size: int = 256  # verdicts per durable append


def simulated_experts(config: SimulateFeedbackConfig):
    from pathalign_ray.experts.pathologist import SimulatedExpert  # heavy: pathologist imports scipy

    offsets = np.linspace(-0.5, 0.5, config.experts) if config.experts > 1 else np.zeros(1)
    return [
        SimulatedExpert(
            f"sim_expert_{i}", config.flip_rate, float(1.0 + config.strictness_spread * offset), config.seed
        )
        for i, offset in enumerate(offsets)
    ]


def simulate_feedback(config: SimulateFeedbackConfig) -> dict:
    """Judge every sample each expert has not judged yet; return counts and the plausibility seen."""
    from pathalign_ray.experts.pathologist import measure  # heavy: pathologist imports scipy
    from pathalign_ray.generator.sampling import read_manifest  # heavy: sampling imports torch and diffusers

    samples_dir = storage.join(config.run_dir, config.samples)
    rows = read_manifest(samples_dir).to_pylist()
    store = FeedbackStore(storage.join(config.run_dir, "feedback"))
    experts = simulated_experts(config)
    pending = {
        expert.expert_id: set(store.pending([r["sample_id"] for r in rows], expert.expert_id)) for expert in experts
    }
    records, plausible = [], 0
    for row in bar(len(rows), f"{len(experts)} simulated pathologists judging", "img", iterable=rows):
        waiting = [expert for expert in experts if row["sample_id"] in pending[expert.expert_id]]
        if not waiting:
            continue
        data = storage.read_bytes(storage.join(samples_dir, row["path"]))
        image = decode_image(data, _png_side(data), name=row["path"])
        measurements = measure(image)
        for expert in waiting:
            verdict = expert.judge_measurements(measurements, row["declared_class"], row["sample_id"])
            plausible += verdict.plausible
            records.append(_record(row, verdict, expert.expert_id, data, config))
    for start in range(0, len(records), config.batch_size):
        store.append(records[start : start + config.batch_size])
    return {
        "samples": len(rows),
        "verdicts_stored": len(records),
        "experts": [expert.expert_id for expert in experts],
        "plausibility": plausible / len(records) if records else float("nan"),
    }


def _record(row: dict, verdict, expert_id: str, data: bytes, config: SimulateFeedbackConfig) -> FeedbackRecord:
    key = f"{config.round}/{expert_id}/{row['sample_id']}"
    return FeedbackRecord(
        record_id="sim-" + hashlib.sha256(key.encode()).hexdigest()[:32],
        sample_id=row["sample_id"],
        image_ref=str(Path(config.samples) / row["path"]),
        image_sha256=hashlib.sha256(data).hexdigest(),
        declared_class=row["declared_class"],
        expert_id=expert_id,
        verdict="plausible" if verdict.plausible else "implausible",
        failed_criteria=verdict.failed,
        round=config.round,
    )


def _png_side(data: bytes) -> int:
    """The width of a PNG from its IHDR chunk: samples are square and keep their own size."""
    return int.from_bytes(data[16:20], "big")
