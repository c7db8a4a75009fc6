"""Label a run's pending samples with simulated pathologists, through the feedback store.

python jobs/simulate_feedback.py --config configs/simulate_feedback.yaml run_dir=runs/demo experts=3
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.experts.simulated_feedback import SimulateFeedbackConfig, simulate_feedback


def main(argv=None) -> None:
    config = parse_job_args(SimulateFeedbackConfig, argv, "configs/simulate_feedback.yaml", __doc__)
    summary = simulate_feedback(config)
    print(
        f"{summary['verdicts_stored']} verdicts on {summary['samples']} samples by {len(summary['experts'])} simulated "
        f"experts stored in {config.run_dir}/feedback; plausibility {summary['plausibility']:.1%}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
