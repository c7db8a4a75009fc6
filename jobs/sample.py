"""Sample N images per declared class from an exported model, over Ray tasks.

    python jobs/sample.py --config configs/sample.yaml model=runs/demo/model n_per_class=16
    python jobs/sample.py select=uncertain k=32 reward_model=runs/x/reward   # the 32 the reward model is least sure of
    python jobs/sample.py --select uncertain --k 32 reward_model=runs/x/reward   # the same
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.sampling import SampleConfig, sample

FLAGS = ("--select", "--k")  # flag spellings of the select= and k= overrides


def flags_to_overrides(argv: list[str]) -> list[str]:
    """`--select uncertain --k 32` (or `--k=32`) -> `select=uncertain k=32`; everything else unchanged."""
    out, args = [], iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in FLAGS:
            value = value if eq else next(args, "")
            out.append(f"{name[2:]}={value}")
        else:
            out.append(arg)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_job_args(SampleConfig, flags_to_overrides(argv), "configs/sample.yaml", __doc__)
    out_dir = sample(config)
    print(f"samples written to {out_dir} (manifest.parquet, contact_sheet.png)")


if __name__ == "__main__":
    main(sys.argv[1:])
