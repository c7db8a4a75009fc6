"""Ray Tune searches the feedback objective's form and weights: branches of rwl (raw, threshold, class-normalised,
centred with the ratio clip) and ddpo, each with its own fields, lr and steps (configs/tune.yaml's space).

    python jobs/tune.py --config configs/tune.yaml
    python jobs/tune.py --config configs/tune.yaml algorithm=tpe num_trials=24 out_dir=runs/pretrain32/tune_tpe

Rerun the same command to resume a stopped search. Then: python jobs/finetune.py --config OUT_DIR/best_feedback.yaml
out_dir and the finetune section's inputs may be URIs (s3://bucket/prefix, gs://..., file://...): the experiment,
the trials' runs and the results then live on the bucket, and the search resumes from there.
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.tune.config import SearchConfig
from pathalign_ray.tune.search import search


def main(argv=None) -> dict:
    config = parse_job_args(SearchConfig, argv, "configs/tune.yaml", __doc__)
    written = search(config)
    print(f"trials: {written['trials']}; Pareto front: {written['pareto']}; plot: {written['plot']}")
    print(f"best config: {written['best_config']} (python jobs/finetune.py --config {written['best_config']})")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
