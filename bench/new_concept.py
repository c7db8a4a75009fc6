"""The paper's Algorithm 4: teach a cell type the pretraining never saw, from expert feedback alone.

    .venv/bin/python bench/new_concept.py [--steps 1800] [--rounds 2] [key.sub=value ...]   # overrides: configs/align.yaml

1. Pretrain the 32 px model on the procedural set WITHOUT one type (band neutrophils by default):
   runs/concept32-pre/.
2. Give the model a new class for it (pathalign_ray.concepts.add_class), its embedding started
   between its neighbours in maturation (metamyelocyte and segmented neutrophil): runs/concept32/model.
3. The align loop, sampling only the new class: simulated pathologists judge its samples against
   what a band neutrophil must look like, a reward model learns their verdicts (no real image of the
   type exists anywhere in the run), and reward-weighted finetuning (beta term on the other types'
   real images) teaches the model.
4. Fresh samples (DDIM 50, eta 1; seeds no round used) of every class, before and after, judged by
   the simulated pathologist. Writes bench/results/new_concept.json and a contact sheet of the new class.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from bench_common import RESULTS_DIR, write_result
from pathalign_ray.align import AlignConfig, align
from pathalign_ray.concepts import add_class
from pathalign_ray.config import load_config
from pathalign_ray.data import procedural
from pathalign_ray.data.make import MakeDatasetConfig, make_dataset
from pathalign_ray.pretrain import PretrainConfig, pretrain
from pathalign_ray.sampling import SampleConfig, read_manifest, sample

PRE = Path("runs/concept32-pre")
RUN = Path("runs/concept32")


def plausibility_per_class(model: Path, out_dir: Path, n_per_class: int) -> dict[str, float]:
    """The simulated pathologist's plausible rate of fresh samples, per declared class."""
    from pathalign_ray.images import decode_image
    from pathalign_ray.pathologist import judge

    folder = sample(SampleConfig(model=str(model), out_dir=str(out_dir), n_per_class=n_per_class, ddim_steps=50,
                                 eta=1.0, seed=5000, overwrite=True))
    verdicts: dict[str, list[bool]] = {}
    for row in read_manifest(folder).to_pylist():
        image = decode_image((folder / row["path"]).read_bytes(), 32, row["path"])
        verdicts.setdefault(row["declared_class"], []).append(judge(image, row["declared_class"]).plausible)
    return {name: float(np.mean(values)) for name, values in verdicts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="band_neutrophil")
    parser.add_argument("--init-from", nargs="+", default=["metamyelocyte", "segmented_neutrophil"])
    parser.add_argument("--steps", type=int, default=1800, help="pretraining steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval-per-class", type=int, default=32)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    started = time.perf_counter()
    known = tuple(name for name in procedural.DEFAULT_CELL_TYPES if name != args.concept)
    data_dir = PRE / "data"
    if not (data_dir / "dataset.json").is_file():
        make_dataset(MakeDatasetConfig(out_dir=str(data_dir), image_size=32, classes=known))
    pre_model = pretrain(load_config(PretrainConfig, "configs/pretrain.yaml",
                                     [f"run_dir={PRE}", f"data.dataset={data_dir}", f"train.steps={args.steps}"]))
    pretrain_s = time.perf_counter() - started
    if not (RUN / "model").is_dir():
        add_class(pre_model, args.concept, RUN / "model", init_from=args.init_from)
    before = plausibility_per_class(RUN / "model", RUN / "eval" / "before", args.eval_per_class)
    align_started = time.perf_counter()
    config = load_config(
        AlignConfig, "configs/align.yaml",
        [f"run_dir={RUN.resolve()}", f"rounds={args.rounds}", f"sample.classes=[{args.concept}]",
         "sample.n_per_class=64", f"reward.data.dataset={data_dir.resolve()}", *args.overrides],
    )
    rows = align(config)
    align_s = time.perf_counter() - align_started
    final = RUN / f"round{args.rounds - 1}-model"
    after = plausibility_per_class(final, RUN / "eval" / "after", args.eval_per_class)
    shutil.copy(RUN / "eval" / "after" / "contact_sheet.png", RESULTS_DIR / "new_concept_after.png")
    shutil.copy(RUN / "eval" / "before" / "contact_sheet.png", RESULTS_DIR / "new_concept_before.png")
    figures = {
        "concept": args.concept,
        "init_from": args.init_from,
        "pretraining": {"classes": list(known), "steps": args.steps, "wall_s": pretrain_s},
        "rounds": rows,
        "labels": rows[-1]["labels"],
        "concept_plausibility_before": before[args.concept],
        "concept_plausibility_after": after[args.concept],
        "other_classes_plausibility_before": float(np.mean([before[name] for name in known])),
        "other_classes_plausibility_after": float(np.mean([after[name] for name in known])),
        "per_class_before": before,
        "per_class_after": after,
        "eval_per_class": args.eval_per_class,
        "align_wall_s": align_s,
        "total_wall_s": time.perf_counter() - started,
    }
    write_result("new_concept", figures)
    print(json.dumps({k: v for k, v in figures.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
