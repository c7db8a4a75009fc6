"""Pretrain the class-conditional diffusion model on Ray Train + DeepSpeed; rerun to resume.

python jobs/pretrain.py --config configs/pretrain.yaml train.steps=4000 scale.num_workers=2
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.generator.pretrain import PretrainConfig, pretrain


def main(argv=None) -> None:
    config = parse_job_args(PretrainConfig, argv, "configs/pretrain.yaml", __doc__)
    result = pretrain(config)
    print(
        f"model exported to {result.model_dir} (diffusers format), final loss {result.final.get('loss', float('nan')):.4f}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
