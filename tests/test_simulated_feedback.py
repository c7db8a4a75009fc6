"""jobs/simulate_feedback.py's library side: simulated experts judge real samples through the feedback store."""

from __future__ import annotations

import shutil

import pytest

from pathalign_ray.experts.checklist import CRITERIA
from pathalign_ray.experts.feedback import FeedbackStore
from pathalign_ray.experts.simulated_feedback import SimulateFeedbackConfig, simulate_feedback, simulated_experts

pytestmark = pytest.mark.ray


def test_every_expert_judges_every_sample_once(tiny_samples, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_samples, run_dir / "samples" / "pretrained")
    config = SimulateFeedbackConfig(run_dir=str(run_dir), experts=3, round=2)
    summary = simulate_feedback(config)
    assert summary["samples"] == 12 and summary["verdicts_stored"] == 36
    again = simulate_feedback(config)
    assert again["verdicts_stored"] == 0, "a rerun stores nothing twice"
    rows = FeedbackStore(run_dir / "feedback").records().to_pylist()
    assert len(rows) == 36
    assert {row["expert_id"] for row in rows} == {"sim_expert_0", "sim_expert_1", "sim_expert_2"}
    assert all(row["round"] == 2 and set(row["failed_criteria"]) <= set(CRITERIA) for row in rows)
    assert all(
        (row["verdict"] == "plausible") == (not row["failed_criteria"]) or row["verdict"] == "implausible"
        for row in rows
    )


def test_experts_spread_their_strictness():
    experts = simulated_experts(SimulateFeedbackConfig(experts=3, strictness_spread=0.2))
    assert [expert.strictness for expert in experts] == pytest.approx([0.9, 1.0, 1.1])
    with pytest.raises(ValueError, match=r"experts\n\s+Input should be greater than 0"):
        SimulateFeedbackConfig(experts=0)
