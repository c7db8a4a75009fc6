"""The feedback loop on the 32 px benchmark, judged on held-out noise, round after round, over seeds.

    .venv/bin/python bench/align_benchmark.py [--objectives rwl ddpo] [--seeds 0 1 2] [--rounds 3]
        [--select all|uncertain] [--allocation even|weakest_first] [--tag NAME] [--base MODEL --data DATASET]
        [--merge-only] [key.sub=value ...]
        # overrides apply to configs/align.yaml, after the objective's recipe; --tag names them (a part and row
        # apart), and names another base model and data set (for example one drawn with make_dataset's artefacts)

Each (objective, seed) is its own resumable part: the align loop in runs/align32-OBJ-sSEED (started
from models/cells32 on the procedural 32 px data set in runs/pretrain32/data, made here if missing)
and bench/results/align_rounds_parts/OBJ-sSEED.json, one dated row per finished round. A stopped
run resumes at its first unfinished round, so the table fills over several sessions. A seed moves
the pool's noise (pool seed namespace), the simulated experts' flips, the reward model's split and
initial weights, and the finetuning's noise; every round's model is judged on the same held-out
noise (evaluation namespace, EVAL_SAMPLING) under both EVAL_SAMPLERS, beside the base model.

The parts merge into bench/results/align_rounds.json: per objective and round, the labels spent,
plausibility (mean over seeds, 95% t-interval), domain FID and coverage relative to the base model,
the change in utility accuracy, wall time; eval_noise_disjoint is checked against every manifest
of every part's run (pathalign_ray.generator.sampling.seeds_drawn_under).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import time
from pathlib import Path

from bench_common import RESULTS_DIR, machine, write_result

from pathalign_ray.align import AlignConfig, align, read_rounds
from pathalign_ray.config import load_config
from pathalign_ray.data.make import MakeDatasetConfig, make_dataset
from pathalign_ray.evaluation.evaluate import EvaluateConfig, evaluate
from pathalign_ray.evaluation.metrics import mean_interval
from pathalign_ray.generator.diffusion import namespaced_seed
from pathalign_ray.generator.sampling import SampleConfig, sample, seeds_drawn_under

BASE_MODEL = Path("models/cells32")
DATA = Path("runs/pretrain32/data")
PARTS = RESULTS_DIR / "align_rounds_parts"
EVAL_SAMPLING = {"namespace": "evaluation", "seed": 1000, "n_per_class": 32}
# DDIM 50 eta 1: the pools' sampler and the base model's best; DDIM 10 eta 1: the one DDPO trains on
EVAL_SAMPLERS = {"ddim50_eta1": (50, 1.0), "ddim10_eta1": (10, 1.0)}
# One round: 256 samples (DDIM 50, eta 1) judged by 3 simulated pathologists (768 labels).
ROUND_SAMPLES = 256
UNCERTAIN_POOL = 3  # select=uncertain draws this many times the samples its experts judge
ROUND = ["sample.n_per_class=32", "sample.ddim_steps=50", "sample.eta=1.0",
         "finetune.train.eval_ddim_steps=50", "finetune.train.eval_eta=1.0"]  # fmt: skip
OBJECTIVES = {
    # centred reward weights, each synthetic loss relative to the round's starting model, clipped to 1 +- 0.3
    "rwl": [*ROUND, "finetune.objective.weighting=centred", "finetune.objective.ratio_clip=0.3",
            "finetune.train.lr=0.0001", "finetune.train.steps=600"],
    # the control: rwl's run with every synthetic weight 0 (a threshold above any reward), so only the beta
    # term trains: the same steps on real images alone, to tell what the feedback adds to more training
    "real_only": [*ROUND, "finetune.objective.weighting=threshold", "finetune.objective.threshold=2.0",
                  "finetune.train.lr=0.0001", "finetune.train.steps=600"],
    # 8 trajectories per class a step (2 workers x 32), lr 3e-5 after 5 warm-up steps, an EMA that follows
    "ddpo": [*ROUND, "finetune.objective.kind=ddpo", "finetune.objective.beta=0", "finetune.objective.kl_coef=0.1",
             "finetune.objective.clip_range=0.0001", "finetune.objective.trajectories_per_step=32",
             "finetune.objective.ddim_steps=10", "finetune.train.lr=0.00003", "finetune.train.steps=80",
             "finetune.train.warmup_steps=5", "finetune.train.ema_decay=0.9"],
}  # fmt: skip


def seed_overrides(seed: int) -> list[str]:
    """Everything random in a round, moved by one seed (the evaluation's noise stays put)."""
    keys = ("sample.seed", "simulate.seed", "reward.data.seed", "reward.train.seed", "finetune.train.seed")
    return [f"{key}={seed}" for key in keys]


def part_name(objective: str, seed: int | None, select: str, allocation: str, tag: str = "") -> str:
    """OBJ[-sSEED][-uncertain][-weakest_first][-TAG]: a part's name, or (seed None) its table row's."""
    choices = [c for c in (select, allocation, tag) if c not in ("all", "even", "")]
    return "-".join([objective, *([f"s{seed}"] if seed is not None else []), *choices])


def part_run(name: str) -> Path:
    """The align loop's run folder of part `name` (absolute)."""
    return Path(f"runs/align32-{name}").resolve()


def selection_overrides(samples: int, select: str, round_index: int, run_dir: Path) -> list[str]:
    """A round whose experts judge `samples` images: a fresh pool of that many, or (select uncertain, from
    round 1 on) the `samples` the last reward model is least sure of among UNCERTAIN_POOL times as many."""
    per_class = samples // len(json.loads((BASE_MODEL / "class_names.json").read_text()))
    if select == "all" or round_index == 0:
        return [f"sample.n_per_class={per_class}"]
    return ["sample.select=uncertain", f"sample.n_per_class={UNCERTAIN_POOL * per_class}", f"sample.k={samples}",
            f"sample.reward_model={run_dir / 'reward'}"]  # fmt: skip


def run_part(
    objective: str,
    seed: int,
    round_samples: list[int],
    select: str,
    allocation: str,
    overrides: list[str],
    parts_dir: Path = PARTS,
    tag: str = "",
    base: Path = BASE_MODEL,
    data: Path = DATA,
    round0_from: Path | None = None,
) -> Path:
    """Rounds not yet in the part's file (round r's experts judge round_samples[r] images): run each (align
    resumes) and judge its model; returns the part file, parts_dir/NAME.json. round0_from: the file of a
    part whose round 0 this one shares (it differs only from round 1 on: select, allocation)."""
    name = part_name(objective, seed, select, allocation, tag)
    settings = {"overrides": [*OBJECTIVES[objective], *seed_overrides(seed), *overrides], "select": select,
                "allocation": allocation}  # fmt: skip
    run_dir, part_path = part_run(name), parts_dir / f"{name}.json"
    new_part = {"name": name, "objective": objective, "seed": seed, "tag": tag, "base": str(base), "data": str(data)}
    part = json.loads(part_path.read_text()) if part_path.is_file() else {**new_part, "rows": []}
    shares = {**new_part, "overrides": settings["overrides"], "round0_samples": round_samples[0]}
    if round0_from is not None and not part["rows"] and (row := shared_round0(round0_from, shares, run_dir)):
        part["rows"].append(row)
        write_part(part_path, part, settings, round_samples[:1])
    if not (run_dir / "model").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model").symlink_to(base.resolve())
    for round_index in range(len(part["rows"]), len(round_samples)):
        selection = selection_overrides(round_samples[round_index], select, round_index, run_dir)
        config = load_config(
            AlignConfig, "configs/align.yaml",
            [f"run_dir={run_dir}", f"reward.data.dataset={data.resolve()}", f"rounds={round_index + 1}",
             f"allocation={allocation}", *settings["overrides"], *selection],
        )  # fmt: skip
        started = time.perf_counter()
        row = align(config)[round_index]
        model = run_dir / f"round{round_index}-model"
        judged = {s: judge(model, run_dir / f"eval-{s}", s, base, data) for s in EVAL_SAMPLERS}
        part["rows"].append(
            {**row, "judged": judged, "eval_noise_disjoint": noise_disjoint(run_dir), "round_wall_s": row["wall_s"],
             "evaluation_wall_s": time.perf_counter() - started - row["wall_s"],
             "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine()}
        )  # fmt: skip
        write_part(part_path, part, settings, round_samples[: round_index + 1])
        print(
            f"[bench] {name} round {round_index}: "
            + json.dumps({s: j["model"]["plausibility"] for s, j in judged.items()})
        )
    return part_path


def write_part(path: Path, part: dict, settings: dict, round_samples: list[int]) -> None:
    part.update(settings, round_samples=round_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(part, indent=2) + "\n")


def shared_round0(source: Path, shares: dict, run_dir: Path) -> dict | None:
    """Round 0's row of the part in `source` and its run folder copied to run_dir (paths in it are relative
    to the run), or None (round 0 runs here) where that run is not on this machine or has gone past round 0:
    its feedback store and reward model are then no longer round 0's. `shares`: what round 0 depends on."""
    other = json.loads(source.read_text())
    other_shares = {**other, "round0_samples": other["round_samples"][0]}
    if differ := [key for key in shares if key != "name" and other_shares[key] != shares[key]]:
        raise ValueError(f"{source} differs from part {shares['name']} in {differ}: a part shares round 0 only "
                         "with one that differs from round 1 on (select, allocation)")  # fmt: skip
    other_run = part_run(other["name"])
    finished = len(read_rounds(str(other_run))) if other_run.is_dir() else 0
    if finished != 1 or run_dir.exists():
        why = f"{run_dir} exists" if run_dir.exists() else f"{other_run}: {finished} round(s) finished"
        print(f"[bench] {shares['name']}: round 0 runs here, not shared ({why})")
        return None
    shutil.copytree(other_run, run_dir, symlinks=True)
    return {**other["rows"][0], "shared_from": other["name"]}


def judge(model: Path, out_dir: Path, sampler: str, base: Path = BASE_MODEL, data: Path = DATA) -> dict:
    """The base model and `model` on the held-out noise under one sampler: {"base": figures, "model": figures}.

    Every figure of a column depends on its own samples alone, so the base model, the same on the same
    noise in every round and seed, is judged once per sampler and kept in PARTS/base/BASE-SAMPLER.json.
    """
    base_path = PARTS / "base" / f"{base.name}-{sampler}.json"
    if not base_path.is_file():
        base_path.parent.mkdir(parents=True, exist_ok=True)
        figures = {**evaluated(base, out_dir.with_name(f"eval-base-{sampler}"), sampler, data),
                "date": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        base_path.write_text(json.dumps(figures, indent=2) + "\n")
    return {"base": json.loads(base_path.read_text()), "model": evaluated(model, out_dir, sampler, data)}


def evaluated(model: Path, out_dir: Path, sampler: str, data: Path = DATA) -> dict:
    """One model's figures on the held-out noise under one sampler, against the real images of `data`."""
    steps, eta = EVAL_SAMPLERS[sampler]
    sampling = [f"sampling.{key}={value}" for key, value in EVAL_SAMPLING.items()]
    config = load_config(
        EvaluateConfig, "configs/evaluate.yaml", [*sampling, f"sampling.ddim_steps={steps}", f"sampling.eta={eta}"]
    )
    report = evaluate(dataclasses.replace(config, models=(str(model),), real=str(data), out_dir=str(out_dir)))
    metrics = json.loads((report / "metrics.json").read_text())
    return figures(metrics, metrics["columns"][0])


def figures(metrics: dict, column: str) -> dict:
    simulated = metrics["plausibility"]["simulated"][column]
    return {
        "plausibility": simulated["plausible"]["rate"],
        "plausibility_ci": [simulated["plausible"]["low"], simulated["plausible"]["high"]],
        "per_class": {name: value["rate"] for name, value in simulated["per_class"].items()},
        "domain_fid": metrics["fidelity"]["domain"][column]["frechet_distance"],
        "coverage": metrics["diversity"]["domain"][column]["coverage"],
        "utility_accuracy": metrics["utility"][column]["accuracy"],
        # the real test images of each class the classifier trained on the model's images gets right
        "utility_recall": {
            name: row[i] / max(1, sum(row))
            for i, (name, row) in enumerate(
                zip(metrics["sets"][column]["per_class"], metrics["utility"][column]["confusion"])
            )
        },
    }


def noise_disjoint(run_dir: Path) -> bool:
    """Whether no manifest of the run (pools, any sample folder) drew a seed of the held-out evaluation noise."""
    classes = json.loads((BASE_MODEL / "class_names.json").read_text())
    seeds = {
        namespaced_seed(EVAL_SAMPLING["namespace"], EVAL_SAMPLING["seed"], c, j)
        for c in range(len(classes))
        for j in range(EVAL_SAMPLING["n_per_class"])
    }
    return not seeds_drawn_under(run_dir, seeds)


def merge(parts: list[dict]) -> dict:
    """Per objective (and selection, allocation, tag), one row per round over the seeds that reached it."""
    table = {}
    keys = {
        p["name"]: (p["objective"], p.get("select", "all"), p.get("allocation", "even"), p.get("tag", ""))
        for p in parts
    }
    for key in sorted(set(keys.values())):
        mine = [p for p in parts if keys[p["name"]] == key]
        rows = []
        for round_index in range(max(len(p["rows"]) for p in mine)):
            reached = [p["rows"][round_index] for p in mine if len(p["rows"]) > round_index]
            rows.append({"round": round_index, "seeds": [p["seed"] for p in mine if len(p["rows"]) > round_index],
                         "labels": reached[0]["labels"], "wall_s": mean_interval([r["round_wall_s"] for r in reached])[0],
                         **{sampler: over_seeds([r["judged"][sampler] for r in reached]) for sampler in EVAL_SAMPLERS}})  # fmt: skip
        table[part_name(key[0], None, *key[1:])] = rows
    return table


def over_seeds(judged: list[dict]) -> dict:
    """The Must-show's figures of one round under one sampler, mean and 95% interval over seeds."""
    mean, low, high = mean_interval([j["model"]["plausibility"] for j in judged])
    return {
        "plausibility_mean": mean,
        "plausibility_ci": [low, high] if len(judged) > 1 else None,  # one seed has no interval over seeds
        "base_plausibility_mean": mean_interval([j["base"]["plausibility"] for j in judged])[0],
        "fid_ratio": mean_interval([j["model"]["domain_fid"] / j["base"]["domain_fid"] for j in judged])[0],
        "coverage_ratio": mean_interval([j["model"]["coverage"] / j["base"]["coverage"] for j in judged])[0],
        "utility_delta": mean_interval(
            [j["model"]["utility_accuracy"] - j["base"]["utility_accuracy"] for j in judged]
        )[0],
        "per_class": {
            c: mean_interval([j["model"]["per_class"][c] for j in judged])[0] for c in judged[0]["model"]["per_class"]
        },
    }


def held_out_sheet(model: Path, name: str) -> Path:
    """RESULTS_DIR/align_rounds_NAME.png: 8 images per class of `model` on the held-out noise (DDIM 50, eta 1)."""
    steps, eta = EVAL_SAMPLERS["ddim50_eta1"]
    held_out = {**EVAL_SAMPLING, "n_per_class": 8}  # the first 8 of every class's judged noise
    folder = sample(SampleConfig(model=str(model), out_dir=f"runs/align32-sheets/{name}", overwrite=True,
                                 ddim_steps=steps, eta=eta, **held_out))  # fmt: skip
    path = RESULTS_DIR / f"align_rounds_{name}.png"
    path.write_bytes((folder / "contact_sheet.png").read_bytes())
    return path


def plot_rounds(table: dict, path: Path) -> Path:
    """Plausibility on held-out noise against labels spent, per objective and selection, both samplers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EVAL_SAMPLERS), figsize=(5 * len(EVAL_SAMPLERS), 3.6), sharey=True)
    for ax, sampler in zip(axes, EVAL_SAMPLERS):
        for name, rows in table.items():
            labels = [0] + [row["labels"] for row in rows]  # labels spent so far
            means = [rows[0][sampler]["base_plausibility_mean"]] + [row[sampler]["plausibility_mean"] for row in rows]
            spread = [[0.0, 0.0]] + [
                [m - (row[sampler]["plausibility_ci"] or [m, m])[0], (row[sampler]["plausibility_ci"] or [m, m])[1] - m]
                for m, row in zip(means[1:], rows)
            ]
            seeds = "/".join(str(len(row["seeds"])) for row in rows)  # per round: later rounds may have fewer
            ax.errorbar(
                labels, means, yerr=list(zip(*spread)), marker="o", capsize=3, label=f"{name} (seeds per round {seeds})"
            )
        ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8, label="target 90%")
        ax.set(title=f"judged under {sampler}", xlabel="labels spent", ylabel="plausible (held-out noise)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_base_arguments(parser: argparse.ArgumentParser) -> None:
    """--base, --data and --tag: the benchmark on another model and data set, its parts kept apart by the tag."""
    parser.add_argument("--tag", default="", help="a name for the overrides: their parts and rows are kept apart")
    parser.add_argument("--base", type=Path, default=BASE_MODEL, help="the model round 0 starts from (with --tag)")
    parser.add_argument("--data", type=Path, default=DATA, help="the real images: reward, beta term, evaluation")


def check_base_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.base, args.data) != (BASE_MODEL, DATA) and not args.tag:
        parser.error("--base and --data need a --tag: their rows must not merge with the default benchmark's")
    if not (DATA / "dataset.json").is_file():
        make_dataset(MakeDatasetConfig(out_dir=str(DATA), image_size=32, n_per_class=160))
    if not (args.data / "dataset.json").is_file():
        parser.error(f"--data {args.data} holds no data set: make it with jobs/make_dataset.py out_dir={args.data} ...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--select", default="all", choices=["all", "uncertain"], help="which samples experts see from round 1 on"
    )
    parser.add_argument(
        "--allocation",
        default="even",
        choices=["even", "weakest_first"],
        help="how later rounds split the pool over classes",
    )
    add_base_arguments(parser)
    parser.add_argument(
        "--round0-from",
        type=Path,
        help="a parts folder: each part shares round 0 of the plain (all, even) part of its objective and seed there "
        "if that part's run is on this machine and has finished round 0 alone (for --select or --allocation)",
    )
    parser.add_argument("--merge-only", action="store_true", help="merge the parts already written; run nothing")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/align.yaml")
    args = parser.parse_args()
    check_base_arguments(parser, args)
    sources = {
        (objective, seed): args.round0_from / f"{part_name(objective, seed, 'all', 'even', args.tag)}.json"
        for objective in args.objectives
        for seed in args.seeds
        if args.round0_from
    }
    if missing := [str(path) for path in sources.values() if not path.is_file()]:
        parser.error(f"--round0-from: no part file {', '.join(missing)}")
    if not args.merge_only:
        for objective in args.objectives:
            for seed in args.seeds:
                run_part(
                    objective,
                    seed,
                    [ROUND_SAMPLES] * args.rounds,
                    args.select,
                    args.allocation,
                    args.overrides,
                    tag=args.tag,
                    base=args.base,
                    data=args.data,
                    round0_from=sources.get((objective, seed)),
                )
    parts = [json.loads(path.read_text()) for path in sorted(PARTS.glob("*.json"))]
    rows = [row for part in parts for row in part["rows"]]
    write_result("align_rounds", {
        "table": merge(parts),
        "seeds": sorted({part["seed"] for part in parts}),
        "eval_seed_namespace": EVAL_SAMPLING["namespace"],
        "eval_sampling": {**EVAL_SAMPLING, "samplers": EVAL_SAMPLERS},
        "eval_noise_disjoint": bool(rows) and all(row["eval_noise_disjoint"] for row in rows),
        "parts": {p["name"]: [r["date"] for r in p["rows"]] for p in parts},
        "objective_overrides": {name: OBJECTIVES[name] for name in args.objectives},
    })  # fmt: skip
    for tag in sorted({part.get("tag", "") for part in parts}):  # one plot per base and data set
        name = f"align_rounds-{tag}" if tag else "align_rounds"
        plot_rounds(merge([p for p in parts if p.get("tag", "") == tag]), RESULTS_DIR / f"{name}.png")
    base_sheet = "base" if args.base == BASE_MODEL else f"{args.tag}_base"
    if not (RESULTS_DIR / f"align_rounds_{base_sheet}.png").is_file():
        held_out_sheet(args.base, base_sheet)
    for part in parts:  # the last round of each part whose run is on this machine
        last = part_run(part["name"]) / f"round{len(part['rows']) - 1}-model"
        if part["rows"] and last.is_dir():
            held_out_sheet(last, f"{part['name']}_round{len(part['rows']) - 1}")
    print(json.dumps(merge(parts), indent=1)[:4000])


if __name__ == "__main__":
    main()
