"""The feedback loop for R rounds: sample -> feedback -> reward model -> finetune; one row per round.

python jobs/align.py --config configs/align.yaml run_dir=runs/pretrain32 rounds=3
python jobs/align.py --config configs/align.yaml feedback=human quota=200   # experts use jobs/label.py
"""

import sys

from pathalign_ray.align import AlignConfig, align
from pathalign_ray.config import parse_job_args


def main(argv=None) -> None:
    config = parse_job_args(AlignConfig, argv, "configs/align.yaml", __doc__)
    rows = align(config)
    print(f"{len(rows)} rounds in {config.run_dir}/rounds.jsonl")


if __name__ == "__main__":
    main(sys.argv[1:])
