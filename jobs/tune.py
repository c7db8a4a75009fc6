"""Ray Tune searches the feedback-loss weights (beta, reward weighting, lr, steps; ddpo: clip range, KL).

    python jobs/tune.py --config configs/tune.yaml
    python jobs/tune.py --config configs/tune.yaml algorithm=optuna num_trials=24 out_dir=runs/pretrain32/tune_optuna

Rerun the same command to resume a stopped search. Then: python jobs/finetune.py --config OUT_DIR/best_feedback.yaml
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.tune import search
from pathalign_ray.tune_config import SearchConfig


def main(argv=None) -> dict:
    config = parse_job_args(SearchConfig, argv, "configs/tune.yaml", __doc__)
    written = search(config)
    print(f"trials: {written['trials']}; Pareto table: {written['pareto']}; plot: {written['plot']}")
    print(f"best config: {written['best_config']} (python jobs/finetune.py --config {written['best_config']})")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
