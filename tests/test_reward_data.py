"""The reward model's training set: expert verdicts, weak feedback, the split by image, balance. No Ray."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from pathalign_ray.experts.feedback import FeedbackRecord, FeedbackStore
from pathalign_ray.images import encode_png
from pathalign_ray.reward.data import (
    RewardDataConfig,
    balanced_weights,
    build_examples,
    label_counts,
    split_examples,
    unknown_pairs,
    weak_examples,
)

CLASSES = ("myeloblast", "promyelocyte", "myelocyte", "metamyelocyte")  # tiny_dataset's
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _real(n_per_class: int = 6, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    return rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8), labels


def _run(tmp_path, votes: dict[str, list[tuple]], size: int = 8):
    """A run folder with one PNG per sample and the votes {sample_id: [(expert, verdict, failed, round)]}."""
    rng = np.random.default_rng(1)
    records, t = [], T0
    for i, (sample_id, sample_votes) in enumerate(votes.items()):
        path = tmp_path / "samples" / "images" / f"{sample_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
        for expert, verdict, failed, round_ in sample_votes:
            t += timedelta(seconds=1)
            records.append(
                FeedbackRecord(
                    sample_id=sample_id,
                    image_ref=f"samples/images/{sample_id}.png",
                    image_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                    declared_class=CLASSES[i % len(CLASSES)],
                    expert_id=expert,
                    verdict=verdict,
                    failed_criteria=failed,
                    round=round_,
                    timestamp=t,
                )
            )
    FeedbackStore(tmp_path / "feedback").append(records)
    return tmp_path


VOTES = {
    "s0": [("ann", "plausible", (), 0), ("bob", "plausible", (), 0), ("cat", "implausible", ("chromatin",), 0)],
    "s1": [("ann", "implausible", ("cell_size", "granules"), 0), ("bob", "implausible", (), 0)],
    "s2": [("ann", "plausible", (), 1)],
    "s3": [("ann", "implausible", ("inclusions",), 1), ("bob", "plausible", (), 1)],
}


def test_weak_feedback_labels():
    images, labels = _real()
    weak = weak_examples(images, labels, CLASSES, n=20, wrong_class_fraction=0.25, seed=0)
    true, wrong = weak.sources == "weak_true", weak.sources == "weak_wrong"
    assert true.sum() == 15 and wrong.sum() == 5
    rows = np.array([int(g.rsplit("-", 1)[1]) for g in weak.groups])
    assert (weak.labels[true] == 1).all() and (weak.class_ids[true] == labels[rows[true]]).all()
    assert (weak.labels[wrong] == 0).all() and (weak.class_ids[wrong] != labels[rows[wrong]]).all()
    assert np.array_equal(weak.images, images[rows])
    assert weak.criteria_mask[true].all() and not weak.criteria_mask[wrong].any() and not weak.criteria.any()
    assert len(set(rows[true].tolist())) == 15, "no image repeats before every image has been used"
    assert set(rows[wrong]) <= set(rows[true]), "the wrong-class images are the true-class ones, relabelled"
    again = weak_examples(images, labels, CLASSES, n=20, wrong_class_fraction=0.25, seed=0)
    assert np.array_equal(again.class_ids, weak.class_ids) and np.array_equal(again.groups, weak.groups)
    with pytest.raises(ValueError, match="at least two classes"):
        weak_examples(images[:2], np.zeros(2, np.int64), CLASSES[:1], n=2, wrong_class_fraction=0.5, seed=0)


def test_wrong_classes_cover_every_other_class():
    images, labels = _real(n_per_class=50)
    weak = weak_examples(images, labels, CLASSES, n=400, wrong_class_fraction=1.0, seed=3)
    rows = np.array([int(g.rsplit("-", 1)[1]) for g in weak.groups])
    pairs = set(zip(labels[rows].tolist(), weak.class_ids.tolist()))
    assert pairs == {(a, b) for a in range(4) for b in range(4) if a != b}


def test_consensus_rows_match_the_store(tmp_path):
    run = _run(tmp_path, VOTES)
    config = RewardDataConfig(feedback=("feedback",), dataset="")
    examples = build_examples(config, run, image_size=8)
    consensus = {row["sample_id"]: row for row in FeedbackStore(run / "feedback").consensus().to_pylist()}
    assert examples.sample_ids.tolist() == sorted(VOTES) and (examples.sources == "expert").all()
    for i, sample_id in enumerate(examples.sample_ids):
        assert examples.labels[i] == pytest.approx(consensus[sample_id]["plausibility"])
        assert examples.groups[i] == consensus[sample_id]["image_sha256"]
    assert examples.class_names == tuple(sorted(CLASSES)), "without a data set, the declared classes sorted"
    s0, s1 = examples.criteria[0], examples.criteria[1]
    assert s0.tolist() == pytest.approx([0, 0, 1 / 3, 0, 0, 0]) and examples.criteria_mask[0].all()
    # s1: bob's implausible vote names nothing, so only ann's checklist counts
    assert s1.tolist() == [1, 0, 0, 0, 1, 0] and examples.criteria_mask[1].all()
    assert examples.rounds.tolist() == [0, 0, 1, 1]
    assert examples.images.shape == (4, 8, 8, 3)


def test_verdict_rows_rounds_and_latest(tmp_path):
    votes = {**VOTES, "s2": VOTES["s2"] + [("ann", "implausible", ("chromatin",), 2)]}  # ann changes her mind
    run = _run(tmp_path, votes)
    examples = build_examples(RewardDataConfig(feedback=("feedback",), label="verdict"), run, image_size=8)
    assert len(examples) == 8, "one row per expert per sample: ann's latest verdict on s2 only"
    s2 = examples.sample_ids == "s2"
    assert examples.labels[s2].tolist() == [0.0] and examples.rounds[s2].tolist() == [2]
    assert set(examples.labels.tolist()) == {0.0, 1.0}
    only_0 = build_examples(RewardDataConfig(feedback=("feedback",), label="verdict", rounds=(0,)), run, 8)
    assert sorted(set(only_0.sample_ids.tolist())) == ["s0", "s1"]


def test_missing_or_empty_feedback_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*data.feedback=\[\]"):
        build_examples(RewardDataConfig(feedback=("feedback",)), tmp_path, 8)
    (tmp_path / "feedback").mkdir()
    with pytest.raises(ValueError, match=r"no verdicts.*weak feedback alone"):
        build_examples(RewardDataConfig(feedback=("feedback",)), tmp_path, 8)
    run = _run(tmp_path / "run", VOTES)
    with pytest.raises(ValueError, match=r"no verdicts in rounds \[7\]"):
        build_examples(RewardDataConfig(feedback=("feedback",), rounds=(7,)), run, 8)
    with pytest.raises(ValueError, match="nothing to learn from"):
        RewardDataConfig(feedback=(), dataset="")


def test_a_changed_image_is_refused(tmp_path):
    run = _run(tmp_path, VOTES)
    (run / "samples" / "images" / "s1.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(ValueError, match="s1.png is not the image judged as sample 's1'"):
        build_examples(RewardDataConfig(feedback=("feedback",)), run, 8)


def test_mix_with_weak_feedback_from_a_dataset(tmp_path, tiny_dataset):
    run = _run(tmp_path, VOTES, size=16)
    config = RewardDataConfig(feedback=("feedback",), dataset=str(tiny_dataset), weak_per_expert=2.5)
    examples = build_examples(config, run, image_size=16)
    counts = label_counts(examples)
    assert counts["expert"]["rows"] == 4 and counts["weak_true"]["rows"] + counts["weak_wrong"]["rows"] == 10
    assert counts["weak_true"]["plausible"] == 5 and counts["weak_wrong"]["implausible"] == 5
    assert examples.class_names == CLASSES, "the data set's class list"
    weak_only = build_examples(RewardDataConfig(feedback=(), dataset=str(tiny_dataset)), run, image_size=16)
    assert (weak_only.sources != "expert").all() and len(weak_only) == 24, "one weak example per real image"
    exact = build_examples(RewardDataConfig(feedback=(), dataset=str(tiny_dataset), weak_examples=7), run, 16)
    assert len(exact) == 7
    resized = build_examples(RewardDataConfig(feedback=(), dataset=str(tiny_dataset)), run, image_size=8)
    assert resized.images.shape[1:] == (8, 8, 3)


def test_split_keeps_each_image_whole_and_is_deterministic():
    images, labels = _real(n_per_class=10)
    weak = weak_examples(images, labels, CLASSES, n=80, wrong_class_fraction=0.5, seed=0)
    train, test = split_examples(weak, test_fraction=0.25, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(weak)
    assert not set(weak.groups[train]) & set(weak.groups[test]), "no image on both sides"
    assert not set(weak.sample_ids[train]) & set(weak.sample_ids[test])
    assert len(set(weak.groups[test])) == 10, "a quarter of the 40 images"
    again = split_examples(weak, test_fraction=0.25, seed=0)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(split_examples(weak, test_fraction=0.25, seed=1)[1], test)
    tiny = weak.take(np.flatnonzero(np.isin(weak.groups, weak.groups[:2])))
    assert len(set(tiny.groups[split_examples(tiny, 0.01, 0)[1]])) == 1, "two images: one held out"
    assert len(split_examples(weak, 0.0, 0)[1]) == 0


def test_split_holds_out_expert_and_weak_images_separately(tmp_path):
    run = _run(tmp_path, {f"s{i}": [("ann", "implausible" if i % 3 else "plausible", (), 0)] for i in range(10)})
    expert = build_examples(RewardDataConfig(feedback=("feedback",)), run, 8)
    images, labels = _real()
    both = type(expert).concat([expert, weak_examples(images, labels, expert.class_names, 10, 0.5, 0)])
    _, test = split_examples(both, 0.2, 0)
    assert (both.sources[test] == "expert").sum() == 2 and (both.sources[test] != "expert").sum() >= 2


def test_balanced_weights():
    images, labels = _real(n_per_class=10)
    weak = weak_examples(images, labels, CLASSES, n=30, wrong_class_fraction=0.2, seed=0)
    weights = balanced_weights(weak)
    assert weights.mean() == pytest.approx(1.0)
    for source in ("weak_true", "weak_wrong"):
        rows = weak.sources == source
        assert weights[rows].sum() == pytest.approx(rows.sum()), "each source keeps its share of the mix"
        per_class = [weights[rows & (weak.class_ids == c)].sum() for c in np.unique(weak.class_ids[rows])]
        assert np.allclose(per_class, per_class[0]), "classes weigh the same within a source"


def test_balanced_weights_balance_rare_plausible_verdicts(tmp_path):
    votes = {f"s{i}": [("ann", "plausible" if i in (0, 4) else "implausible", (), 0)] for i in range(16)}
    expert = build_examples(RewardDataConfig(feedback=("feedback",)), _run(tmp_path, votes), 8)
    weights = balanced_weights(expert)
    plausible = expert.labels > 0.5
    assert plausible.sum() == 2
    # class 0 of the sorted names holds s0, s4 (plausible) and s8, s12: its two cells weigh the same
    first = expert.class_ids == expert.class_ids[expert.sample_ids.tolist().index("s0")]
    assert weights[first & plausible].sum() == pytest.approx(weights[first & ~plausible].sum())
    assert weights.sum() == pytest.approx(len(expert))


def test_a_concepts_parent_is_shown_as_neither():
    """Class 1's images hold concept 3 unlabelled: never a weak example as class 1 or as class 3."""
    images, labels = _real(n_per_class=20)
    images, labels = images[labels < 3], labels[labels < 3]  # the real data set has classes 0-2
    unknown = unknown_pairs({CLASSES[3]: CLASSES[1]}, CLASSES[:3], CLASSES)
    assert unknown == {1: {1, 3}}
    weak = weak_examples(images, labels, CLASSES, n=400, wrong_class_fraction=0.5, seed=3, unknown=unknown)
    rows = np.array([int(g.rsplit("-", 1)[1]) for g in weak.groups])
    pairs = set(zip(labels[rows].tolist(), weak.class_ids.tolist(), weak.labels.tolist()))
    assert {(1, 0, 0.0), (1, 2, 0.0)} <= pairs and not {(1, 1, 1.0), (1, 3, 0.0)} & pairs
    assert {(0, 0, 1.0), (0, 3, 0.0), (2, 1, 0.0)} <= pairs
    assert (weak.sources == "weak_true").sum() == 200
    assert unknown_pairs({CLASSES[3]: CLASSES[1]}, CLASSES[:3], CLASSES[:3]) == {1: {1}}, "no verdict on it yet"
    with pytest.raises(ValueError, match="concept_parents: the parent of 'metamyelocyte'"):
        unknown_pairs({CLASSES[3]: "nucleus"}, CLASSES[:3], CLASSES)
