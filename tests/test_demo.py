"""make demo's code path on a tiny config, from the shipped generator: what it writes, and configs/ fitting together."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_evaluation import TINY_CLASSIFIER

TINY_ROUND = [
    "align.sample.n_per_class=2", "align.sample.ddim_steps=2", "align.simulate.experts=2",
    "align.reward.model.channels=[8,16]", "align.reward.model.hidden=16", "align.reward.model.class_embedding=8",
    "align.reward.train.epochs=2", "align.reward.train.steps_per_epoch=2", "align.reward.train.batch_size=8",
    "align.reward.data.test_fraction=0.25", "align.reward.scale.num_workers=1",
    "align.finetune.train.steps=2", "align.finetune.train.batch_size=2", "align.finetune.train.checkpoint_every=2",
    "align.finetune.train.log_every=1", "align.finetune.train.eval_per_class=1", "align.finetune.train.eval_ddim_steps=2",
]  # fmt: skip
TINY_EVALUATION = [
    "evaluate.sampling.n_per_class=2", "evaluate.sampling.ddim_steps=2", "evaluate.prdc_k=2", "evaluate.grid_per_class=2",
    *[f"evaluate.encoder.{o}" for o in TINY_CLASSIFIER], *[f"evaluate.utility.{o}" for o in TINY_CLASSIFIER],
]  # fmt: skip
REPORT_SECTIONS = (
    "Before and after", "Samples, one row per declared cell type", "Plausibility per cell type",
    "Checklist criteria that failed", "Reward model", "Finetuning",
)  # fmt: skip

# Paths in configs/ that are inputs a user gives or another documented command makes, not the demo.
DOCUMENTED_INPUTS = {
    "runs/pretrain32/data": "bench/pretrain32.py --restore (README, the 32 px benchmark)",
    "runs/pretrain32/model": "bench/pretrain32.py --restore",
    "runs/pretrain32/samples/pretrained": "bench/pretrain32.py --restore",
    "runs/pretrain32/reward": "jobs/train_reward.py run_dir=runs/pretrain32 (bench/tune_search.py)",
    "runs/pretrain64/data": "jobs/make_dataset.py image_size=64 (configs/pretrain_64_gpu.yaml's header)",
}
# Each config file, its config class, and the dotted keys that name inputs (relative ones under run_dir).
CONFIG_INPUTS = {
    "align.yaml": ("pathalign_ray.align:AlignConfig", ["run_dir", "reward.data.dataset"]),
    "demo.yaml": ("pathalign_ray.demo:DemoConfig", ["model"]),
    "demo_pretrain.yaml": ("pathalign_ray.demo:DemoConfig", []),
    "evaluate.yaml": ("pathalign_ray.evaluation.evaluate:EvaluateConfig", ["models", "real"]),
    "finetune.yaml": ("pathalign_ray.generator.finetune:FinetuneConfig", ["base_model", "data.samples", "data.real_dataset"]),
    "label.yaml": ("pathalign_ray.experts.labeling.app:LabelConfig", ["run_dir", "run_dir/samples", "run_dir/reference_data"]),
    "make_dataset.yaml": ("pathalign_ray.data.make:MakeDatasetConfig", []),
    "pretrain.yaml": ("pathalign_ray.generator.pretrain:PretrainConfig", ["data.dataset"]),
    "pretrain_64_gpu.yaml": ("pathalign_ray.generator.pretrain:PretrainConfig", ["data.dataset"]),
    "sample.yaml": ("pathalign_ray.generator.sampling:SampleConfig", ["model"]),
    "serve_reward.yaml": ("pathalign_ray.reward.serve:ServeRewardConfig", ["model"]),
    "simulate_feedback.yaml": ("pathalign_ray.experts.simulated_feedback:SimulateFeedbackConfig", ["run_dir", "run_dir/samples"]),
    "train_reward.yaml": ("pathalign_ray.reward.train:TrainRewardConfig", ["run_dir/data.feedback", "data.dataset"]),
    "tune.yaml": ("pathalign_ray.tune.config:SearchConfig", ["finetune.base_model", "finetune.data.samples", "finetune.data.real_dataset", "finetune.reward.model"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(ray_cluster, serve_port, tmp_path_factory):
    from pathalign_ray.config import load_config
    from pathalign_ray.demo import DemoConfig, run_demo

    run_dir = tmp_path_factory.mktemp("demo")
    overrides = [
        f"run_dir={run_dir}",
        "dataset.n_per_class=6",
        f"align.serve.port={serve_port}",
        *TINY_ROUND,
        *TINY_EVALUATION,
    ]
    return run_dir, run_demo(load_config(DemoConfig, "configs/demo.yaml", overrides))


@pytest.mark.ray
def test_the_demo_writes_its_figures_and_a_self_contained_report(demo_run):
    run_dir, result = demo_run
    summary = json.loads((run_dir / "demo.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["labels"] == 32 and summary["rounds"] == 1  # 8 classes x 2 samples x 2 experts
    assert summary["eval_noise"]["namespace"] == "evaluation"
    for side in ("before", "after"):
        figures = summary[side]
        low, high = figures["plausibility_ci"]
        assert 0 <= low <= figures["plausibility"] <= high <= 1
        assert len(figures["per_class"]) == 8 and len(figures["failure_rate"]) == 6
    assert summary["after"]["name"] == "round0-model"
    assert re.fullmatch(r"\d\.\d{3}|n/a: .+", summary["reward_auc_text"])

    page = result.report.read_text()
    assert result.report == run_dir / "report.html"
    for title in REPORT_SECTIONS:
        assert f"<h2>{title}</h2>" in page
    sources = re.findall(r"<img [^>]*src='([^']+)'", page)
    assert len(sources) == 5 and all(src.startswith("data:image/png;base64,") for src in sources)  # nothing linked
    for src in sources:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert not re.search(r"\bnan\b", page, re.IGNORECASE)


@pytest.mark.ray
def test_every_config_loads_and_its_inputs_exist_after_the_demo_or_are_documented(demo_run):
    import importlib

    from pathalign_ray.config import load_config

    run_dir, _ = demo_run
    assert sorted(CONFIG_INPUTS) == sorted(
        p.name for p in Path("configs").glob("*.yaml") if p.name != "serve_reward_app.yaml"
    )
    for name, (target, keys) in CONFIG_INPUTS.items():
        module, cls = target.split(":")
        config = load_config(getattr(importlib.import_module(module), cls), f"configs/{name}")
        for key in keys:
            for path in _paths(config, key):
                located = (
                    Path(str(path).replace("runs/demo", str(run_dir), 1))
                    if str(path).startswith("runs/demo")
                    else Path(path)
                )
                assert located.exists() or str(path) in DOCUMENTED_INPUTS, f"configs/{name}: {key} = {path}"
    app = yaml.safe_load(Path("configs/serve_reward_app.yaml").read_text())["applications"][0]
    for model in (app["args"]["model"], app["deployments"][0]["user_config"]["model"]):
        assert (run_dir / Path(model).relative_to("runs/demo") / "reward.safetensors").is_file()


def _paths(config, key: str) -> list[str]:
    """The path(s) a dotted key holds; "run_dir/KEY" joins KEY's value(s) under run_dir."""
    base, _, key = key.rpartition("/")
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return [str(Path(getattr(config, base)) / v) if base else str(v) for v in values]


def test_a_wrong_input_path_is_named_with_its_key_before_ray_starts(tmp_path):
    import ray

    from pathalign_ray.config import ConfigError, load_config
    from pathalign_ray.demo import DemoConfig
    from pathalign_ray.reward.serve import ServeRewardConfig, start_reward_server

    ray_was_up = ray.is_initialized()
    with pytest.raises(ConfigError, match=f"model: {tmp_path} is not an exported generator"):
        load_config(DemoConfig, "configs/demo.yaml", [f"model={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=f"model={tmp_path}: .*reward.safetensors is missing"):
        start_reward_server(ServeRewardConfig(model=str(tmp_path)))
    assert ray.is_initialized() == ray_was_up
