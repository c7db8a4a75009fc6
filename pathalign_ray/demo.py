"""The end-to-end demo on a local Ray cluster: make the data set, pretrain, sample, contact sheet,
then the feedback loop (simulated pathologists -> reward model -> finetuning) for a few rounds.

Every path comes from run_dir, so one setting moves the whole run. Rerunning reuses the data set,
resumes pretraining from its last checkpoint, replaces the samples and skips finished rounds.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pathalign_ray.align import AlignConfig, align
from pathalign_ray.config import config_dataclass
from pathalign_ray.data.make import MakeDatasetConfig, make_dataset
from pathalign_ray.pretrain import PretrainConfig, pretrain
from pathalign_ray.sampling import SampleConfig, sample


@config_dataclass
class DemoConfig:
    run_dir: str = "runs/demo"  # data/, pretrain/ (checkpoints), model/, samples/ go under it
    dataset: MakeDatasetConfig = dataclasses.field(default_factory=MakeDatasetConfig)  # out_dir is set from run_dir
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)  # run_dir and data from run_dir
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)  # model and out_dir from run_dir
    align: AlignConfig = dataclasses.field(default_factory=AlignConfig)  # run_dir and the real data set from run_dir


def run_demo(config: DemoConfig) -> Path:
    """Returns the samples folder."""
    run_dir = Path(config.run_dir)
    data_dir = run_dir / "data"
    started = time.perf_counter()
    if (data_dir / "dataset.json").is_file():
        print(f"[demo] reusing the data set in {data_dir}")
    else:
        make_dataset(dataclasses.replace(config.dataset, out_dir=str(data_dir)))
        print(f"[demo] data set written to {data_dir}")
    pretrain_config = dataclasses.replace(
        config.pretrain, run_dir=str(run_dir), data=dataclasses.replace(config.pretrain.data, dataset=str(data_dir))
    )
    model_dir = pretrain(pretrain_config)
    print(f"[demo] model exported to {model_dir}")
    samples_dir = sample(
        dataclasses.replace(
            config.sample, model=str(model_dir), out_dir=str(run_dir / "samples" / "pretrained"), overwrite=True
        )
    )
    print(f"[demo] samples and contact sheet in {samples_dir}")
    reward = dataclasses.replace(
        config.align.reward, data=dataclasses.replace(config.align.reward.data, dataset=str(data_dir))
    )
    rows = align(dataclasses.replace(config.align, run_dir=str(run_dir), reward=reward))
    for row in rows:
        print(
            f"[demo] round {row['round']}: plausibility {row['plausibility']:.1%} of its samples, "
            f"{row['fresh_plausibility_after']:.1%} after finetuning"
        )
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; rounds in {run_dir / 'rounds.jsonl'}")
    return samples_dir
