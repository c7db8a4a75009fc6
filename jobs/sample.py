"""Sample N images per declared class from an exported model, over Ray tasks.

python jobs/sample.py --config configs/sample.yaml model=runs/demo/model n_per_class=16
python jobs/sample.py select=uncertain k=32 reward_model=runs/x/reward   # the 32 the reward model is least sure of
python jobs/sample.py --select uncertain --k 32 reward_model=runs/x/reward   # the same
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.generator.sampling import SampleConfig, sample


def main(argv=None) -> None:
    config = parse_job_args(SampleConfig, argv, "configs/sample.yaml", __doc__)
    out_dir = sample(config)
    print(f"samples written to {out_dir} (manifest.parquet, contact_sheet.png)")


if __name__ == "__main__":
    main(sys.argv[1:])
