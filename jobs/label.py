"""Serve the labelling page for a run's samples on Ray Serve (127.0.0.1 by default).

    python jobs/label.py --config configs/label.yaml run_dir=runs/demo samples=samples/pretrained

Submitted with `ray job submit`, the page is deployed on the cluster and the job ends; run by hand,
it keeps its local Ray cluster up until Ctrl-C.
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.experts.labeling.app import LabelConfig
from pathalign_ray.experts.labeling.serve import serve_until_interrupted


def main(argv=None) -> None:
    serve_until_interrupted(parse_job_args(LabelConfig, argv, "configs/label.yaml", __doc__))


if __name__ == "__main__":
    main(sys.argv[1:])
