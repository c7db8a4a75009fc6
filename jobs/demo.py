"""The demo: one round of the feedback loop on the shipped generator, judged before and after on held-out noise.

python jobs/demo.py --config configs/demo.yaml run_dir=runs/demo
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.demo import DemoConfig, run_demo
from pathalign_ray.demo_report import headline


def main(argv=None) -> None:
    config = parse_job_args(DemoConfig, argv, "configs/demo.yaml", __doc__)
    result = run_demo(config)
    for line in headline(result.summary):
        print(f"[demo] {line}")
    print(f"[demo] open {result.report}")


if __name__ == "__main__":
    main(sys.argv[1:])
