"""Evaluate models (fidelity, diversity, utility, plausibility) against a real data set; write a report.

    python jobs/evaluate.py --models runs/pretrain32/model --real runs/pretrain32/data out_dir=runs/pretrain32/report
    python jobs/evaluate.py --models runs/a/model runs/a/samples/round1 sampling.n_per_class=64 prdc_k=3

--models takes exported model folders (sampled into OUT_DIR/samples/NAME) and sample folders
(manifest.parquet); --real a data set folder. Both are flag spellings of the models= and real=
overrides; any other key.sub=value overrides the config.
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.evaluation.evaluate import EvaluateConfig, evaluate


def flags_to_overrides(argv: list[str]) -> list[str]:
    """`--models A B --real D` -> `models=[A, B]`, `real=D`. A value ends at the next flag or at a
    key=value override (a path holding "=" must be given as models=[...] instead)."""
    out, models, real, current = [], None, None, None
    for arg in argv:
        if arg in ("--models", "--real"):
            current = arg
            if arg == "--models":
                models = [] if models is None else models
        elif arg.startswith(("--models=", "--real=")):
            name, _, value = arg.partition("=")
            if name == "--models":
                models = (models or []) + [value]
            else:
                real = value
            current = None
        elif current is not None and "=" not in arg and not arg.startswith("--"):
            if current == "--models":
                models.append(arg)
            else:
                real, current = arg, None
        else:
            current = None
            out.append(arg)
    if models is not None:
        out.append("models=[" + ", ".join(_quote(m) for m in models) + "]")
    if real is not None:
        out.append(f"real={_quote(real)}")
    return out


def _quote(path: str) -> str:
    """A YAML double-quoted scalar, so a path is never read as a number, a bool or a list."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_job_args(EvaluateConfig, flags_to_overrides(argv), "configs/evaluate.yaml", __doc__)
    out_dir = evaluate(config)
    print(f"report written to {out_dir} (report.md, report.html, metrics.json, PNGs)")


if __name__ == "__main__":
    main(sys.argv[1:])
