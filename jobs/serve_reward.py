"""Serve a reward model over HTTP on Ray Serve (127.0.0.1:8000 by default).

    python jobs/serve_reward.py --model runs/demo/reward
    python jobs/serve_reward.py --config configs/serve_reward.yaml --model PATH num_replicas=2 max_batch_size=64

--model PATH (the reward model folder, save_reward_model) is the override model=PATH; every top-level
key has such a flag (config.parse_job_args). Submitted with `ray job submit`, the endpoint is deployed
on the cluster and the job ends; run by hand, it keeps its local Ray cluster up until Ctrl-C.
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.reward.serve import ServeRewardConfig, serve_until_interrupted


def main(argv=None) -> None:
    serve_until_interrupted(parse_job_args(ServeRewardConfig, argv, "configs/serve_reward.yaml", __doc__))


if __name__ == "__main__":
    main(sys.argv[1:])
