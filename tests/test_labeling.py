"""The labelling page on a real Ray Serve endpoint: sign-in, the queue, verdicts, bad requests, a real browser."""

from __future__ import annotations

import contextlib
import shutil

import httpx
import pytest

from pathalign_ray.experts.feedback import FeedbackStore
from pathalign_ray.experts.labeling.app import LabelConfig
from pathalign_ray.experts.labeling.serve import start_labeling

pytestmark = pytest.mark.ray

TOKEN_A = "token-for-alice-0123456789"
TOKEN_B = "token-for-bob-0123456789ab"


@pytest.fixture
def labeling(tiny_samples, tiny_dataset, serve_port, tmp_path):
    """A fresh run directory holding the tiny samples, served at /label; yields (url, run_dir)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_samples, run_dir / "samples" / "pretrained")
    config = LabelConfig(
        run_dir=str(run_dir),
        reference_data=str(tiny_dataset),
        port=serve_port,
        experts={"alice": TOKEN_A, "bob": TOKEN_B},
    )
    yield start_labeling(config), run_dir


@contextlib.contextmanager
def _signed_in(url: str, expert: str, token: str):
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("api/session", json={"expert_id": expert, "token": token})
        assert response.status_code == 200, response.text
        yield client


def test_without_a_valid_token_nothing_is_shown_or_stored(labeling):
    url, run_dir = labeling
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        assert anonymous.post("api/session", json={"expert_id": "alice", "token": TOKEN_B}).status_code == 401
        assert anonymous.post("api/session", json={"expert_id": "mallory", "token": TOKEN_A}).status_code == 401
        assert anonymous.get("api/next").status_code == 401
        assert anonymous.get("summary").status_code == 401
        verdict = {"sample_id": "x", "verdict": "plausible", "nonce": "abcdef0123"}
        assert anonymous.post("api/verdicts", json=verdict).status_code == 401
        anonymous.cookies.set("pathalign_session", "forged-token-0000000000")
        assert anonymous.get("api/next").status_code == 401
    assert len(FeedbackStore(run_dir / "feedback").records()) == 0


def test_queue_verdicts_and_bad_requests(labeling):
    url, run_dir = labeling
    with _signed_in(url, "alice", TOKEN_A) as alice:
        first = alice.get("api/next").json()
        assert first["progress"] == {"done": 0, "total": 12}
        assert alice.get(first["image_url"]).headers["content-type"] == "image/png"
        assert len(first["reference_urls"]) >= 1
        assert alice.get(first["reference_urls"][0]).status_code == 200
        verdict = {
            "sample_id": first["sample_id"],
            "verdict": "implausible",
            "failed_criteria": ["nucleus_shape", "granules"],
            "nonce": first["nonce"],
        }
        assert alice.post("api/verdicts", json=verdict).status_code == 201
        replay = alice.post("api/verdicts", json=verdict)
        assert replay.status_code == 409 and "replayed" in replay.json()["detail"]
        bad_requests = {
            "unknown sample": ({**verdict, "sample_id": "nope", "nonce": "n0000001"}, 404, "unknown sample"),
            "unknown criterion": ({**verdict, "failed_criteria": ["smell"], "nonce": "n0000002"}, 422, "smell"),
            "unknown verdict": ({**verdict, "verdict": "maybe", "nonce": "n0000003"}, 422, "maybe"),
            "unknown believed class": ({**verdict, "believed_class": "basophil", "nonce": "n0000004"}, 422, "basophil"),
            "plausible with criteria": ({**verdict, "verdict": "plausible", "nonce": "n0000005"}, 422, "plausible"),
            "bad nonce": ({**verdict, "nonce": "x"}, 422, "nonce"),
        }
        for name, (body, status, needle) in bad_requests.items():
            response = alice.post("api/verdicts", json=body)
            assert response.status_code == status, name
            assert needle in response.text, name
        malformed = alice.post("api/verdicts", content=b"{not json", headers={"content-type": "application/json"})
        assert malformed.status_code == 422
        assert alice.get("api/images/nope").status_code == 404
        assert alice.get("api/references/basophil/0").status_code == 404

        second = alice.get("api/next").json()
        assert second["sample_id"] != first["sample_id"] and second["progress"]["done"] == 1
        reopened = alice.post("api/undo").json()
        assert reopened["sample_id"] == first["sample_id"]
        alice.post(
            "api/verdicts", json={"sample_id": first["sample_id"], "verdict": "plausible", "nonce": reopened["nonce"]}
        )

    with _signed_in(url, "bob", TOKEN_B) as bob:
        assert bob.get("api/next").json()["sample_id"] == first["sample_id"], "bob's queue is his own"
        assert bob.post("api/undo").status_code == 404
        summary = bob.get("api/summary").json()
    store = FeedbackStore(run_dir / "feedback")
    assert len(store.records()) == 2, "only the two accepted verdicts are stored"
    latest = store.latest().to_pylist()
    assert [row["verdict"] for row in latest] == ["plausible"]
    assert summary["verdicts"] == 1 and summary["experts"] == ["alice"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (make test installs it)")
def test_an_expert_labels_ten_images_in_a_real_browser(labeling):
    from playwright.sync_api import sync_playwright

    url, run_dir = labeling
    plan = []  # (verdict, failed criteria) in the order the images are judged
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=_chromium(),
            args=[
                "--no-sandbox",
                "--headless",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(url)
            page.fill("#expert", "alice")
            page.fill("#token", TOKEN_A)
            page.click("#signin-button")
            page.wait_for_selector("#labeling:not(.hidden)")
            for i in range(10):
                sample_id = page.get_attribute("#sample", "data-sample-id")
                if i % 3 == 0:
                    page.click("#plausible")
                    plan.append((sample_id, "plausible", []))
                elif i % 3 == 1:
                    page.check("#criterion-nucleus_shape")
                    page.click("#implausible")
                    plan.append((sample_id, "implausible", ["nucleus_shape"]))
                else:
                    page.keyboard.press("2")
                    page.keyboard.press("4")
                    page.keyboard.press("i")
                    plan.append((sample_id, "implausible", ["nucleus_shape", "cytoplasm_colour"]))
                page.wait_for_function(
                    f"document.querySelector('#sample').dataset.sampleId !== {sample_id!r}"
                    " || !document.querySelector('#finished').classList.contains('hidden')"
                )
            assert page.inner_text("#progress") == "11 of 12 this round"
        finally:
            browser.close()
    stored = FeedbackStore(run_dir / "feedback").records().to_pylist()
    assert len(stored) == 10
    by_sample = {row["sample_id"]: row for row in stored}
    assert len(by_sample) == 10
    for sample_id, verdict, failed in plan:
        assert by_sample[sample_id]["verdict"] == verdict
        assert list(by_sample[sample_id]["failed_criteria"]) == failed
        assert by_sample[sample_id]["expert_id"] == "alice"
