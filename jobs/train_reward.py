"""Train the reward model r(x, c) on a run's expert verdicts plus weak feedback from real images, on Ray Train.

python jobs/train_reward.py --config configs/train_reward.yaml run_dir=runs/demo data.dataset=runs/demo/data
python jobs/train_reward.py data.feedback=[] data.dataset=runs/demo/data   # weak feedback alone
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.reward.train import TrainRewardConfig, train_reward


def main(argv=None) -> None:
    config = parse_job_args(TrainRewardConfig, argv, "configs/train_reward.yaml", __doc__)
    result = train_reward(config)
    print(f"reward model written to {result.model_dir} (reward.safetensors, reward.json with label counts and metrics)")


if __name__ == "__main__":
    main(sys.argv[1:])
