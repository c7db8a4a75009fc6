"""The evaluation's own samples of each exported model: drawn on held-out noise, reused while still valid.

Held-out means noise that no feedback pool, finetuning check or Tune probe of the model's run drew
(the seed namespaces of pathalign_ray.generator.diffusion); `check_noise_held_out` refuses anything else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pathalign_ray.config import PositiveInt, config_dataclass
from pathalign_ray.evaluation.sources import run_dir_of
from pathalign_ray.generator.diffusion import CLASS_NAMES_FILE, MODEL_INFO_FILE, SeedNamespace
from pathalign_ray.generator.sampling import SampleConfig, plan_samples, read_manifest, sample, seeds_drawn_under


@config_dataclass
class EvalSamplingConfig:
    n_per_class: PositiveInt = 32  # images sampled per declared class from each exported model folder
    ddim_steps: PositiveInt = 50  # DDIM steps per image
    eta: float = 0.0  # DDIM stochasticity
    seed: int = 1000  # base seed of the evaluation's noise
    # evaluation: noise no pool, check or probe ever draws. Another namespace is refused where the
    # run a model came from drew the same seeds (a model judged on its own feedback pool is flattered).
    namespace: SeedNamespace = "evaluation"
    batch_size: PositiveInt = 32  # images per Ray sampling task
    reuse: bool = True  # keep REPORT/samples/NAME when it holds this plan from this model, written since the model


def written_after(path: Path, folder: Path) -> bool:
    """Whether `path` was written after every file in `folder`."""
    return all(path.stat().st_mtime >= file.stat().st_mtime for file in folder.rglob("*") if file.is_file())


def sample_model(
    model: Path, out: Path, class_names: list[str], sampling: EvalSamplingConfig, threads: int, device: str
) -> Path:
    """Sample n_per_class images of each class the model and the data set share into `out` (reused if it holds them)."""
    config, plan = _sample_plan(model, out, class_names, sampling, threads, device)
    step = (
        json.loads((model / MODEL_INFO_FILE).read_text()).get("step", -1) if (model / MODEL_INFO_FILE).is_file() else -1
    )
    expected = {row["sample_id"] for row in plan}
    if sampling.reuse and (out / "manifest.parquet").is_file():
        manifest = read_manifest(out)
        same = (
            set(manifest.column("sample_id").to_pylist()) == expected
            and set(manifest.column("model_step").to_pylist()) == {step}
            and set(manifest.column("ddim_steps").to_pylist()) == {sampling.ddim_steps}
            and np.allclose(manifest.column("eta").to_numpy(), sampling.eta)
            and written_after(out / "manifest.parquet", model)  # not a same-named model finetuned again since
        )
        if same:
            print(f"sampling: reusing {out} ({len(expected)} images of step {step})")
            return out
    print(f"sampling {len(expected)} images from {model} into {out}")
    return sample(config)


def check_noise_held_out(model: Path, class_names: list[str], sampling: EvalSamplingConfig, out_dir: Path) -> None:
    """Refuse to judge `model` on noise that a pool, check or probe of the run it came from drew."""
    _, plan = _sample_plan(model, out_dir / "samples", class_names, sampling, 1, "cpu")
    run_dir = run_dir_of(model)
    shared = seeds_drawn_under(run_dir, {row["seed"] for row in plan}, skip=out_dir / "samples")
    if shared:
        where = "; ".join(f"{count} in {path.parent}" for path, count in shared.items())
        raise ValueError(
            f"sampling.namespace={sampling.namespace} sampling.seed={sampling.seed} would judge {model} on noise "
            f"its run {run_dir} already drew ({where}); evaluate on held-out noise: sampling.namespace=evaluation"
        )


def _sample_plan(model: Path, out: Path, class_names: list[str], sampling: EvalSamplingConfig, threads: int, device):
    """(SampleConfig, plan) of the evaluation's samples of `model`: each class it shares with the data set."""
    model_classes = json.loads((model / CLASS_NAMES_FILE).read_text())
    classes = tuple(c for c in model_classes if c in class_names)
    if not classes:
        raise ValueError(f"{model} knows none of the data set's classes {class_names}")
    config = SampleConfig(
        model=str(model),
        out_dir=str(out),
        n_per_class=sampling.n_per_class,
        classes=classes,
        ddim_steps=sampling.ddim_steps,
        eta=sampling.eta,
        seed=sampling.seed,
        namespace=sampling.namespace,
        batch_size=sampling.batch_size,
        threads_per_worker=threads,
        device=device,
        overwrite=True,
    )
    return config, plan_samples(config, model_classes)
