"""The paper's Algorithm 4: expert feedback names a concept the generator's labels never did.

    .venv/bin/python bench/new_concept.py [--variants merged unseen] [--rounds 3] [--steps 7200]
        [--pretrained MODEL] [key.sub=value ...]
        # --pretrained: one variant's model pretrained before (models/cells32-merged-bands for merged), not again
        # overrides apply to configs/align.yaml, after the align benchmark's RWL recipe (bench/align_benchmark.py)

Two variants, each its own resumable part (bench/results/new_concept_parts/VARIANT.json, one dated row
per finished round), merged into bench/results/new_concept.json:
- merged (the paper's setting): the pretraining data draws band neutrophils but labels them as their
  parent, segmented neutrophils (MakeDatasetConfig.merge), so the generator can already draw bands
  under the parent's label. The model gets a band class started from the parent's embedding
  (pathalign_ray.generator.concepts.add_class); the loop samples the band class and the parent, simulated
  pathologists judge each against its own criteria, the reward model learns both. Its weak feedback shows
  the parent's real images neither as the parent nor as the band class (reward.data.concept_parents):
  some are bands, and no label says which.
- unseen: no band neutrophil anywhere in pretraining; the class starts between its neighbours in
  maturation (metamyelocyte and segmented neutrophil) and the loop samples it alone.
Every round's model, and the model before the first round, is judged on held-out noise (evaluation
seed namespace, DDIM 50 eta 1): the new class's plausibility with its Wilson 95% interval, the
parent's, and the mean of the other classes'.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from pathlib import Path

import numpy as np
from align_benchmark import OBJECTIVES
from bench_common import RESULTS_DIR, machine, write_result

from pathalign_ray.align import AlignConfig, align
from pathalign_ray.config import load_config
from pathalign_ray.data import procedural
from pathalign_ray.data.make import MakeDatasetConfig, make_dataset
from pathalign_ray.evaluation.metrics import wilson_interval
from pathalign_ray.experts.pathologist import judge
from pathalign_ray.generator.concepts import add_class
from pathalign_ray.generator.pretrain import PretrainConfig, pretrain
from pathalign_ray.generator.sampling import SampleConfig, read_manifest, sample
from pathalign_ray.images import decode_image

CONCEPT, PARENT = "band_neutrophil", "segmented_neutrophil"
PARTS = RESULTS_DIR / "new_concept_parts"
# per variant: the data set's classes and merge, the new class's initial embedding, the classes the loop samples
VARIANTS = {
    "merged": {"classes": procedural.DEFAULT_CELL_TYPES, "merge": {CONCEPT: PARENT},
               "init_from": [PARENT], "sampled": [CONCEPT, PARENT]},
    "unseen": {"classes": tuple(c for c in procedural.DEFAULT_CELL_TYPES if c != CONCEPT), "merge": {},
               "init_from": ["metamyelocyte", PARENT], "sampled": [CONCEPT]},
}  # fmt: skip
EVAL = {"namespace": "evaluation", "seed": 5000, "ddim_steps": 50, "eta": 1.0}


def judged_per_class(model: Path, out_dir: Path, n_per_class: int) -> dict[str, list[bool]]:
    """The simulated pathologist's verdicts on fresh samples of every declared class, on held-out noise."""
    folder = sample(
        SampleConfig(model=str(model), out_dir=str(out_dir), n_per_class=n_per_class, overwrite=True, **EVAL)
    )
    verdicts: dict[str, list[bool]] = {}
    for row in read_manifest(folder).to_pylist():
        image = decode_image((folder / row["path"]).read_bytes(), 32, row["path"])
        verdicts.setdefault(row["declared_class"], []).append(judge(image, row["declared_class"]).plausible)
    return verdicts


def figures(verdicts: dict[str, list[bool]]) -> dict:
    new = verdicts[CONCEPT]
    others = [name for name in verdicts if name not in (CONCEPT, PARENT)]
    return {
        "new_class_plausibility": float(np.mean(new)),
        "new_class_ci": list(wilson_interval(int(np.sum(new)), len(new))),
        "parent_plausibility": float(np.mean(verdicts[PARENT])),
        "parent_ci": list(wilson_interval(int(np.sum(verdicts[PARENT])), len(verdicts[PARENT]))),
        "others_plausibility": float(np.mean([np.mean(verdicts[name]) for name in others])),
        "per_class": {name: float(np.mean(values)) for name, values in verdicts.items()},
    }


def run_variant(
    variant: str, rounds: int, steps: int, n_eval: int, overrides: list[str], pretrained: Path | None = None
) -> dict:
    """Pretrain (or take `pretrained`), add the class, judge the start, then each round not yet in the part;
    returns the part."""
    spec = VARIANTS[variant]
    pre, run = Path(f"runs/concept32-{variant}-pre"), Path(f"runs/concept32-{variant}")
    part_path = PARTS / f"{variant}.json"
    part = json.loads(part_path.read_text()) if part_path.is_file() else {"variant": variant, **spec, "rows": []}
    if part.get("pretraining", {}).get("steps", steps) != steps:
        raise SystemExit(f"{part_path} was pretrained {part['pretraining']['steps']} steps, not {steps}: move it away")
    data_dir = pre / "data"
    if not (data_dir / "dataset.json").is_file():
        make_dataset(
            MakeDatasetConfig(out_dir=str(data_dir), image_size=32, classes=spec["classes"], merge=spec["merge"])
        )
    if pretrained is not None:
        _check_pretrained(pretrained, spec, steps)
        pre_model = pretrained
        part.setdefault("pretraining", {"steps": steps, "model": str(pretrained)})
    else:
        started = time.perf_counter()
        pre_model = pretrain(load_config(PretrainConfig, "configs/pretrain.yaml",
                                         [f"run_dir={pre}", f"data.dataset={data_dir}", f"train.steps={steps}"])).model_dir  # fmt: skip
        part.setdefault("pretraining", {"steps": steps, "wall_s": time.perf_counter() - started})
    if not (run / "model").is_dir():
        add_class(pre_model, CONCEPT, run / "model", init_from=spec["init_from"])
    if not part["rows"]:
        before = judged_per_class(run / "model", run / "eval" / "before", n_eval)
        part["rows"].append({"round": None, "labels": 0, **figures(before), "date": _now(), "machine": machine()})
        _save(part, part_path)
    for round_index in range(len(part["rows"]) - 1, rounds):
        config = load_config(AlignConfig, "configs/align.yaml", [
            f"run_dir={run.resolve()}", f"rounds={round_index + 1}", *OBJECTIVES["rwl"],
            f"sample.classes=[{', '.join(spec['sampled'])}]", "sample.n_per_class=64", f"reward.data.dataset={data_dir.resolve()}",
            f"reward.data.concept_parents={json.dumps(spec['merge'])}", *overrides,
        ])  # fmt: skip
        row = align(config)[round_index]
        after = judged_per_class(run / f"round{round_index}-model", run / "eval" / f"round{round_index}", n_eval)
        part["rows"].append({"round": round_index, "labels": row["labels"], "round_wall_s": row["wall_s"],
                             **figures(after), "date": _now(), "machine": machine()})  # fmt: skip
        _save(part, part_path)
        print(f"[bench] {variant} round {round_index}: {CONCEPT} {part['rows'][-1]['new_class_plausibility']:.1%}")
    last = run / "eval" / f"round{rounds - 1}" / "contact_sheet.png"
    if last.is_file():
        shutil.copy(run / "eval" / "before" / "contact_sheet.png", RESULTS_DIR / f"new_concept_{variant}_before.png")
        shutil.copy(last, RESULTS_DIR / f"new_concept_{variant}_after.png")
    return part


def _check_pretrained(model: Path, spec: dict, steps: int) -> None:
    """Refuse `model` unless it was pretrained `steps` steps on the variant's classes."""
    info = json.loads((model / "pathalign.json").read_text())
    classes = json.loads((model / "class_names.json").read_text())
    expected = [name for name in spec["classes"] if name not in spec["merge"]]
    if classes != expected or info.get("step") != steps:
        raise SystemExit(f"--pretrained {model}: {info.get('step')} steps of {classes}, not {steps} of {expected}")


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _save(part: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(part, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7200, help="pretraining steps (configs/pretrain.yaml's)")
    parser.add_argument("--eval-per-class", type=int, default=64)
    parser.add_argument("--pretrained", type=Path, help="the (one) variant's pretrained model: skip pretraining")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/align.yaml")
    args = parser.parse_args()
    if args.pretrained and len(args.variants) != 1:
        parser.error("--pretrained is one variant's model: name that variant alone with --variants")
    for variant in args.variants:
        run_variant(variant, args.rounds, args.steps, args.eval_per_class, args.overrides, args.pretrained)
    parts = {path.stem: json.loads(path.read_text()) for path in sorted(PARTS.glob("*.json"))}
    write_result("new_concept", {"concept": CONCEPT, "parent": PARENT, "eval_sampling": EVAL,
                                 "eval_per_class": args.eval_per_class, "variants": parts})  # fmt: skip
    print(json.dumps({name: [row["new_class_plausibility"] for row in p["rows"]] for name, p in parts.items()}))


if __name__ == "__main__":
    main()
