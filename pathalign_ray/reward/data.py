"""The reward model's training set: expert verdicts on synthetic images plus the paper's weak feedback.

One table, `RewardExamples`, one row per (image, declared class) example, from two sources:

- "expert": verdicts in feedback stores on synthetic images (images read from RUN_DIR/<image_ref>,
  checked against the sha256 the expert saw). label="consensus" gives one row per sample whose
  label is its plausibility, the share of plausible votes (a soft label, as FeedbackStore.consensus);
  label="verdict" gives one 0/1 row per expert verdict (the latest of each expert on each sample).
- "weak_true" / "weak_wrong": real images of a data set folder, free labels (paper, section 4):
  with their true class they are plausible (1); paired with a random DIFFERENT class, implausible (0).
  A class whose images hold an unlabelled concept (concept_parents) is shown as neither of the two.

Criteria targets, (N, 6) in CRITERIA order, are the share of votes failing each criterion, with a
mask where no vote says: a plausible verdict passes all six; an implausible one with criteria
named fails those and passes the rest (the expert went through the checklist); an implausible one
naming none says nothing; a real image as its true class passes all six; as a wrong class, unknown.

The held-out split is by image (`groups`: the image's sha256 for synthetic images, its row for
real ones), so no image, hence no sample_id, is in both splits; it is deterministic per seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from pathalign_ray import storage
from pathalign_ray.config import (
    Fraction,
    FractionBelowOne,
    Location,
    NonNegativeFloat,
    NonNegativeInt,
    config_dataclass,
)
from pathalign_ray.data.shards import read_dataset
from pathalign_ray.experts.checklist import CRITERIA
from pathalign_ray.experts.feedback import FeedbackStore
from pathalign_ray.images import decode_image, normalise_array

SOURCES = ("expert", "weak_true", "weak_wrong")


@config_dataclass
class RewardDataConfig:
    # feedback store folders or URIs, relative to run_dir unless absolute; empty: weak feedback alone
    feedback: tuple[Location, ...] = ("feedback",)
    label: Literal["consensus", "verdict"] = "consensus"  # one soft row per sample, or one 0/1 row per verdict
    rounds: tuple[int, ...] = ()  # feedback rounds to learn from; empty: every round
    dataset: Location = ""  # real images for weak feedback (a jobs/make_dataset.py folder or URI); empty: none
    dataset_split: str = "train"  # the split of `dataset` the weak examples come from
    # weak examples per expert example (per sample, or per verdict with label=verdict)
    weak_per_expert: NonNegativeFloat = 2.0
    # > 0: exactly this many weak examples; 0: weak_per_expert, or one per real image alone
    weak_examples: NonNegativeInt = 0
    wrong_class_fraction: Fraction = 0.5  # share of the weak examples paired with a wrong class (labelled implausible)
    # new concept -> the real class whose images hold it unlabelled (a data set made with MakeDatasetConfig.merge):
    # some of that class's images are the concept, so weak feedback shows them neither as their label nor as
    # the concept, only as the other classes (e.g. {band_neutrophil: segmented_neutrophil})
    concept_parents: dict[str, str] = dataclasses.field(default_factory=dict)
    expert_train: bool = True  # false: expert verdicts are only held out and scored (the weak-only baseline)
    test_fraction: FractionBelowOne = 0.2  # share of the images held out, per source kind (expert, weak)
    balance: bool = True  # draw training examples class-balanced (balanced_weights); false: uniformly
    seed: int = 0  # the weak pairs and the split

    def __post_init__(self) -> None:
        if not self.feedback and not self.dataset:
            raise ValueError("nothing to learn from: give feedback stores, a dataset for weak feedback, or both")
        if not self.expert_train and not self.dataset:
            raise ValueError("expert_train=false trains on weak feedback only: it needs a dataset")


@dataclasses.dataclass(frozen=True)
class RewardExamples:
    """N training examples for r(x, c); every field is an (N, ...) array, row i one example."""

    images: np.ndarray  # (N, S, S, 3) uint8
    class_ids: np.ndarray  # (N,) int64: the declared class, an index into class_names
    labels: np.ndarray  # (N,) float32 in [0, 1]: P(plausible); soft for consensus rows
    criteria: np.ndarray  # (N, 6) float32 in [0, 1]: share of votes failing each criterion, CRITERIA order
    criteria_mask: np.ndarray  # (N, 6) bool: whether any vote said anything about the criterion
    sources: np.ndarray  # (N,) str: one of SOURCES
    sample_ids: np.ndarray  # (N,) str: the feedback sample_id, or "real-<split>-<row>-as-<class>"
    groups: np.ndarray  # (N,) str: the image (sha256, or "real-<split>-<row>"); the split keeps each whole
    rounds: np.ndarray  # (N,) int64: the latest feedback round of the row's votes; -1 for weak rows
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.images)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "class_names" and len(value) != n:
                raise ValueError(f"{f.name} has {len(value)} rows, images has {n}")

    def __len__(self) -> int:
        return len(self.images)

    def take(self, index: np.ndarray) -> RewardExamples:
        index = np.asarray(index, dtype=np.int64)
        return RewardExamples(
            **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self) if f.name != "class_names"},
            class_names=self.class_names,
        )

    @staticmethod
    def concat(parts: Sequence[RewardExamples]) -> RewardExamples:
        names = {part.class_names for part in parts}
        if len(names) != 1:
            raise ValueError(f"cannot join examples over different class lists: {sorted(names)}")
        return RewardExamples(
            **{
                f.name: np.concatenate([getattr(part, f.name) for part in parts])
                for f in dataclasses.fields(RewardExamples)
                if f.name != "class_names"
            },
            class_names=parts[0].class_names,
        )


def build_examples(config: RewardDataConfig, run_dir: str | Path, image_size: int) -> RewardExamples:
    """Every example the config names, expert rows first; images at image_size px.

    A feedback store that does not exist, or holds no verdicts (in `rounds`), is an error: to train
    on weak feedback alone, set feedback to [].
    """
    real = read_dataset(config.dataset, config.dataset_split) if config.dataset else None
    parts = []
    if config.feedback:
        votes = read_votes([_resolve(run_dir, store) for store in config.feedback], config.rounds)
        class_names = known_and_new_classes(real.class_names if real is not None else (), votes)
        parts.append(expert_examples(votes, run_dir, class_names, image_size, config.label))
    else:
        class_names = real.class_names
    if real is not None:
        if real.images.shape[1] != image_size:
            real = dataclasses.replace(real, images=np.stack([normalise_array(im, image_size) for im in real.images]))
        if config.weak_examples:
            n_weak = config.weak_examples
        elif parts:
            n_weak = int(round(config.weak_per_expert * len(parts[0])))
        else:
            n_weak = len(real)
        parts.append(
            weak_examples(
                real.images,
                real.labels,
                class_names,
                n_weak,
                config.wrong_class_fraction,
                config.seed,
                config.dataset_split,
                unknown_pairs(config.concept_parents, real.class_names, class_names),
            )
        )
    return RewardExamples.concat(parts)


def unknown_pairs(
    concept_parents: dict[str, str], real_classes: Sequence[str], class_names: Sequence[str]
) -> dict[int, set[int]]:
    """{real label: declared classes no one can say its images are or are not}: a parent class whose images
    hold an unlabelled concept is unknown as itself and as the concept (when the concept is a class yet)."""
    pairs: dict[int, set[int]] = {}
    for concept, parent in concept_parents.items():
        if parent not in real_classes:
            raise ValueError(
                f"reward.data.concept_parents: the parent of {concept!r}, {parent!r}, is not a class of the data set "
                f"({', '.join(real_classes)})"
            )
        parent_id = list(class_names).index(parent)
        pairs.setdefault(parent_id, {parent_id}).update([class_names.index(concept)] if concept in class_names else [])
    return pairs


def known_and_new_classes(real_classes: Sequence[str], votes: list[dict]) -> tuple[str, ...]:
    """The real data set's classes, then (sorted) the declared classes only feedback knows of.

    A new concept (pathalign_ray.generator.concepts) has verdicts but no real image; the real classes keep
    their indices, so weak feedback's labels still point at the right names.
    """
    new = sorted({v["declared_class"] for v in votes} - set(real_classes))
    return (*real_classes, *new)


def read_votes(stores: Sequence[str | Path], rounds: Sequence[int] = ()) -> list[dict]:
    """The latest verdict of each expert on each sample over the stores, among `rounds` if given.

    Rows of FeedbackStore.records(); as FeedbackStore.latest, over several stores at once.
    """
    rows = []
    for store in stores:
        if not storage.exists(store):
            raise FileNotFoundError(
                f"feedback store {store} does not exist: collect verdicts first (jobs/label.py, "
                "jobs/simulate_feedback.py), or set data.feedback=[] to train on weak feedback alone"
            )
        rows += FeedbackStore(store).records().to_pylist()
    latest = {}
    for row in sorted(rows, key=lambda row: row["timestamp"]):  # stable: a store's own order breaks ties
        if not rounds or row["round"] in rounds:
            latest[row["sample_id"], row["expert_id"]] = row
    votes = list(latest.values())
    if not votes:
        where = ", ".join(map(str, stores))
        within = f" in rounds {list(rounds)}" if rounds else ""
        raise ValueError(
            f"no verdicts{within} in the feedback store(s) {where}: collect some first, "
            "or set data.feedback=[] to train on weak feedback alone"
        )
    return sorted(votes, key=lambda row: (row["sample_id"], row["expert_id"]))


def expert_examples(
    votes: list[dict], run_dir: str | Path, class_names: Sequence[str], image_size: int, label: str = "consensus"
) -> RewardExamples:
    """Examples from votes (read_votes rows): one per sample (consensus) or one per vote (verdict)."""
    unknown = sorted({v["declared_class"] for v in votes} - set(class_names))
    if unknown:
        raise ValueError(f"feedback declares class {unknown[0]!r}, not among the data set's {list(class_names)}")
    by_sample: dict[str, list[dict]] = {}
    for vote in votes:
        by_sample.setdefault(vote["sample_id"], []).append(vote)
    rows = []  # (votes of one example)
    for sample_id, sample_votes in by_sample.items():
        first = sample_votes[0]
        for vote in sample_votes[1:]:
            if (vote["declared_class"], vote["image_sha256"]) != (first["declared_class"], first["image_sha256"]):
                raise ValueError(f"sample_id {sample_id!r} is stored with two declared classes or images")
        rows += [sample_votes] if label == "consensus" else [[vote] for vote in sample_votes]
    images: dict[str, np.ndarray] = {}
    for group in rows:
        vote = group[0]
        if vote["image_sha256"] not in images:
            images[vote["image_sha256"]] = decode_image(_image_bytes(run_dir, vote), image_size, vote["image_ref"])
    criteria, mask = zip(*(_criteria_target(group) for group in rows)) if rows else ((), ())
    return RewardExamples(
        images=np.stack([images[g[0]["image_sha256"]] for g in rows]) if rows else _no_images(image_size),
        class_ids=np.array([list(class_names).index(g[0]["declared_class"]) for g in rows], np.int64),
        labels=np.array([np.mean([v["verdict"] == "plausible" for v in g]) for g in rows], np.float32),
        criteria=np.array(criteria, np.float32).reshape(-1, len(CRITERIA)),
        criteria_mask=np.array(mask, bool).reshape(-1, len(CRITERIA)),
        sources=np.array(["expert"] * len(rows), dtype=str),
        sample_ids=np.array([g[0]["sample_id"] for g in rows], dtype=str),
        groups=np.array([g[0]["image_sha256"] for g in rows], dtype=str),
        rounds=np.array([max(v["round"] for v in g) for g in rows], np.int64),
        class_names=tuple(class_names),
    )


def weak_examples(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    n: int,
    wrong_class_fraction: float,
    seed: int,
    split: str = "train",
    unknown: Mapping[int, set[int]] | None = None,
) -> RewardExamples:
    """n weak examples from real (M, S, S, 3) images with true labels (M,).

    round(wrong_class_fraction * n) of them pair an image with a class drawn uniformly from the
    OTHER classes (label 0); the rest keep the true class (label 1). Both kinds walk one random
    order of the images, so the same image is shown as its class and as another (only the class
    branch can tell them apart), and an image repeats within a kind only once all have been used.
    `unknown` (unknown_pairs) names, per label, the classes its images are never shown as: such images
    are left out of the true kind (which walks the others) and are shown wrong only as the remaining classes.
    """
    unknown = unknown or {}
    if n and not len(images):
        raise ValueError("weak feedback needs real images, and the data set split is empty")
    n_wrong = int(round(wrong_class_fraction * n))
    n_true = n - n_wrong
    if n_wrong and len(class_names) < 2:
        raise ValueError("wrong-class weak feedback needs at least two classes")
    rng = np.random.default_rng([seed, 0x5EED])
    order = _walk(rng, len(images), max(n_true, n_wrong))
    true_rows, wrong_rows = order[:n_true], order[:n_wrong]  # the same images both ways: the class decides
    wrong_classes = _wrong_classes(rng, labels[wrong_rows], len(class_names), unknown)
    shown_as_label = np.array([label not in unknown.get(label, ()) for label in labels.tolist()], bool)
    if not shown_as_label.all():
        true_rows = np.flatnonzero(shown_as_label)[_walk(rng, int(shown_as_label.sum()), n_true)]
    rows = np.concatenate([true_rows, wrong_rows])
    class_ids = np.concatenate([labels[true_rows], wrong_classes]).astype(np.int64)
    plausible = np.r_[np.ones(n_true), np.zeros(n_wrong)]
    groups = np.array([f"real-{split}-{row:06d}" for row in rows], dtype=str)
    return RewardExamples(
        images=images[rows],
        class_ids=class_ids,
        labels=plausible.astype(np.float32),
        criteria=np.zeros((n, len(CRITERIA)), np.float32),
        criteria_mask=np.repeat(plausible.astype(bool)[:, None], len(CRITERIA), axis=1),
        sources=np.array(["weak_true"] * n_true + ["weak_wrong"] * n_wrong, dtype=str),
        sample_ids=np.array([f"{g}-as-{class_names[c]}" for g, c in zip(groups, class_ids)], dtype=str),
        groups=groups,
        rounds=np.full(n, -1, np.int64),
        class_names=tuple(class_names),
    )


def _wrong_classes(rng: np.random.Generator, labels: np.ndarray, k: int, unknown: Mapping[int, set[int]]) -> np.ndarray:
    """A class for each label, uniform over the classes that are neither the label nor unknown for it."""
    offsets = {label: [o for o in range(1, max(k, 2)) if (label + o) % max(k, 1) not in unknown.get(label, ())]
               for label in set(labels.tolist())}  # fmt: skip
    if any(not choices for choices in offsets.values()):
        raise ValueError("weak feedback: a real class has no class left to be shown as wrongly")
    choice = rng.integers(0, np.array([len(offsets[label]) for label in labels.tolist()], np.int64))
    shift = np.array([offsets[label][i] for label, i in zip(labels.tolist(), choice.tolist())], np.int64)
    return (labels + shift) % max(k, 1)


def split_examples(examples: RewardExamples, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), sorted: whole images (groups) held out, per source kind.

    Within each kind (expert; weak), round(test_fraction * images) images go to test, at least
    one and at most all but one when the kind has two or more: those whose hash of (seed, group)
    is smallest. Deterministic per seed; as feedback grows, held-out images mostly stay held out.
    """
    test = np.zeros(len(examples), bool)
    kinds = np.where(examples.sources == "expert", "expert", "weak")
    for kind in ("expert", "weak"):
        groups = sorted(set(examples.groups[kinds == kind].tolist()))
        n_test = int(round(test_fraction * len(groups)))
        if test_fraction > 0 and len(groups) >= 2:
            n_test = min(max(n_test, 1), len(groups) - 1)
        held_out = sorted(groups, key=lambda group: _hash(seed, group))[:n_test]
        test |= (kinds == kind) & np.isin(examples.groups, held_out)
    return np.flatnonzero(~test), np.flatnonzero(test)


def balanced_weights(examples: RewardExamples) -> np.ndarray:
    """(N,) sampling weights, mean 1: declared class x verdict balanced within each source.

    Within each source (SOURCES), every (declared class, label >= 0.5) cell that has examples gets
    the same share of that source's weight, and each source keeps a weight equal to its row count,
    so the mix of sources stays what the config asked for while, say, a class the experts rejected
    96 % of the time shows its few plausible images as often as its implausible ones.
    """
    weights = np.zeros(len(examples), np.float64)
    hard = examples.labels >= 0.5
    for source in SOURCES:
        in_source = examples.sources == source
        cells = {(c, h) for c, h in zip(examples.class_ids[in_source].tolist(), hard[in_source].tolist())}
        for c, h in cells:
            cell = in_source & (examples.class_ids == c) & (hard == h)
            weights[cell] = in_source.sum() / len(cells) / cell.sum()
    return weights


def label_counts(examples: RewardExamples) -> dict:
    """Counts per source: rows, plausible rows (label > 0.5), implausible rows (< 0.5), ties, images."""
    counts = {}
    for source in SOURCES:
        rows = examples.sources == source
        labels = examples.labels[rows]
        counts[source] = {
            "rows": int(rows.sum()),
            "plausible": int((labels > 0.5).sum()),
            "implausible": int((labels < 0.5).sum()),
            "ties": int((labels == 0.5).sum()),
            "images": len(set(examples.groups[rows].tolist())),
        }
    return counts


def _criteria_target(votes: list[dict]) -> tuple[list[float], list[bool]]:
    """Share of the votes that fail each criterion, among the votes that say; and whether any says."""
    said = [v for v in votes if v["verdict"] == "plausible" or v["failed_criteria"]]
    if not said:
        return [0.0] * len(CRITERIA), [False] * len(CRITERIA)
    return [float(np.mean([c in (v["failed_criteria"] or ()) for v in said])) for c in CRITERIA], [True] * len(CRITERIA)


def _image_bytes(run_dir: str | Path, vote: dict) -> bytes:
    """The image an expert judged, read from RUN_DIR/<image_ref> (a path or a URI) and checked against its sha256."""
    path = _resolve(run_dir, vote["image_ref"])
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"the image of sample {vote['sample_id']!r} is missing: {path}") from None
    if hashlib.sha256(data).hexdigest() != vote["image_sha256"]:
        raise ValueError(f"{path} is not the image judged as sample {vote['sample_id']!r}: its sha256 differs")
    return data


def _resolve(run_dir: str | Path, path: str) -> str:
    """`path` if it is a URI or absolute, else RUN_DIR/path."""
    return str(path) if storage.is_uri(path) or Path(path).is_absolute() else storage.join(run_dir, path)


def _walk(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """n indices into range(m): a random order of all m, repeated (each repeat reshuffled) until n."""
    if not n:
        return np.zeros(0, np.int64)
    return np.concatenate([rng.permutation(m) for _ in range(-(-n // m))])[:n].astype(np.int64)


def _hash(seed: int, group: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x1f{group}".encode(), digest_size=8).digest()


def _no_images(size: int) -> np.ndarray:
    return np.zeros((0, size, size, 3), np.uint8)
