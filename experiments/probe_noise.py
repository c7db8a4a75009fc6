"""How much the Tune search's probe moves between noise draws of one model: its noise floor.

    .venv/bin/python experiments/probe_noise.py MODEL DATASET [SEED ...]   # seeds of the probe namespace

The probe of configs/tune.yaml (16 samples per class, DDIM 50 eta 1, `evaluation.probe`) on MODEL at its
own seed and at each SEED (default 2001 2002: noise no trial's probe draws), against DATASET's training
split. A trial's FID penalty is real only where it exceeds this spread. Prints one line per seed and
writes bench/results/probe_noise.json.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_common import write_result

from pathalign_ray.config import config_to_dict, load_config
from pathalign_ray.evaluation.probe import build_reference, probe
from pathalign_ray.tune.config import SearchConfig


def main() -> None:
    model, dataset, *seeds = sys.argv[1:]
    config = load_config(SearchConfig, "configs/tune.yaml", ["probe.threads=2"]).probe
    reference = build_reference(dataset, model, config)  # probes the model at the search's own seed
    draws = {config.seed: reference.base}
    for seed in [int(s) for s in seeds] or [2001, 2002]:
        draws[seed] = probe(model, reference, dataclasses.replace(config, seed=seed))
        print(seed, draws[seed], flush=True)
    fids = [draw["fid"] for draw in draws.values()]
    write_result("probe_noise", {
        "model": model, "dataset": dataset, "probe": config_to_dict(config),
        "draws": {str(seed): draw for seed, draw in draws.items()},
        "fid_spread": (max(fids) - min(fids)) / min(fids),
    })  # fmt: skip


if __name__ == "__main__":
    main()
