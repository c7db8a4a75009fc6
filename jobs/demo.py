"""The end-to-end demo: data set, pretraining on Ray Train + DeepSpeed, sampling, contact sheet.

    python jobs/demo.py --config configs/demo.yaml run_dir=runs/demo
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.demo import DemoConfig, run_demo


def main(argv=None) -> None:
    config = parse_job_args(DemoConfig, argv, "configs/demo.yaml", __doc__)
    samples_dir = run_demo(config)
    print(f"open {samples_dir / 'contact_sheet.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
