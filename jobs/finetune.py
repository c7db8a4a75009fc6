"""Finetune a pretrained model with the reward on Ray Train + DeepSpeed: reward-weighted likelihood or DDPO.

python jobs/finetune.py --config configs/finetune.yaml objective.kind=rwl objective.beta=0.3
python jobs/finetune.py --config configs/finetune.yaml objective.kind=ddpo name=ddpo
python jobs/finetune.py --config configs/finetune.yaml lora.rank=8 base_model=MODEL   # a LoRA adapter only; any generator
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.generator.finetune import FinetuneConfig, finetune


def main(argv=None) -> None:
    config = parse_job_args(FinetuneConfig, argv, "configs/finetune.yaml", __doc__)
    result = finetune(config)
    print(f"finetuned model exported to {result.model_dir} (diffusers format)")


if __name__ == "__main__":
    main(sys.argv[1:])
