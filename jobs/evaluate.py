"""Evaluate models (fidelity, diversity, utility, plausibility) against a real data set; write a report.

    python jobs/evaluate.py --models runs/pretrain32/model --real runs/pretrain32/data out_dir=runs/pretrain32/report
    python jobs/evaluate.py --models runs/a/model runs/a/samples/round1 sampling.n_per_class=64 prdc_k=3

--models takes exported model folders (sampled into OUT_DIR/samples/NAME) and sample folders
(manifest.parquet); --real a data set folder. Both are flag spellings of the models= and real=
overrides (config.parse_job_args: every top-level key has one); any other key.sub=value overrides
the config.
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.evaluation.evaluate import EvaluateConfig, evaluate


def main(argv=None) -> None:
    config = parse_job_args(EvaluateConfig, argv, "configs/evaluate.yaml", __doc__)
    out_dir = evaluate(config)
    print(f"report written to {out_dir} (report.md, report.html, metrics.json, PNGs)")


if __name__ == "__main__":
    main(sys.argv[1:])
