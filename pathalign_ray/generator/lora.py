"""LoRA adapters on a diffusers UNet through peft, as diffusers integrates them (Hu et al. 2021).

Only the adapter trains: W x + (alpha / r) B A x, with A (r, d_in), B (d_out, r), B = 0 at the start,
so an adapter added to a model changes none of its outputs until it trains. The reference model
(the ratio clip, the KL term) is the same UNet with the adapter disabled: no second copy in memory.

Files: the adapter is written by diffusers' own `save_lora_weights` (pytorch_lora_weights.safetensors, keys
"unet.<module>.lora_A.weight", the LoraConfig in the metadata under "unet.<field>"), which `load_lora_weights` and
`UNet2DConditionModel.load_lora_adapter(..., prefix="unet")` read. `UNet2DModel` has no peft mixin in
diffusers, so `load_lora` here injects the adapter through peft directly, for either UNet.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from pathalign_ray.config import FractionBelowOne, PositiveFloat, PositiveInt, config_dataclass

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER_NAME = "default"
_PREFIX = "unet."  # the key prefix diffusers' StableDiffusionLoraLoaderMixin gives the UNet's layers
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection, as diffusers' LoRA scripts
RESNET_TARGETS = ("conv1", "conv2", "time_emb_proj")  # a UNet without attention: its ResNet blocks


@config_dataclass
class LoraSettings:
    rank: PositiveInt = 8  # r: the adapter's inner dimension
    alpha: PositiveFloat = 8.0  # the update is scaled by alpha / rank; alpha = rank keeps lr comparable across ranks
    dropout: FractionBelowOne = (
        0.0  # dropout on the adapter's input; 0 keeps the policy deterministic for DDPO's ratios
    )
    target_modules: tuple[str, ...] = ()  # module name suffixes; empty: attention projections, else ResNet convs


def default_targets(unet: torch.nn.Module) -> tuple[str, ...]:
    """Attention projections when the UNet has any, else its ResNet convolutions and time projections."""
    names = [name for name, _ in unet.named_modules()]
    if any(name.endswith(".to_q") for name in names):
        return ATTENTION_TARGETS
    return RESNET_TARGETS


def lora_config(settings: LoraSettings, unet: torch.nn.Module):
    """peft's LoraConfig for `settings` on `unet`."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules or default_targets(unet)),
        init_lora_weights=True,  # A Kaiming-uniform, B = 0: the adapter starts as the identity
    )


def add_lora(unet: torch.nn.Module, config) -> None:
    """Inject the adapter `config` (a peft LoraConfig) into `unet` in place; only its parameters train.

    diffusers' `add_adapter` where the UNet has it (UNet2DConditionModel), so its own
    disable_adapters/save_lora_adapter work too; peft's `inject_adapter_in_model` otherwise.
    """
    unet.requires_grad_(False)
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(".lora_" in name)


def has_lora(unet: torch.nn.Module) -> bool:
    return any(_is_tuner_layer(module) for module in unet.modules())


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, `unet` computes with its base weights only (the reference model); outside, with its adapters."""
    layers = [module for module in unet.modules() if _is_tuner_layer(module)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def trainable_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in unet.parameters() if parameter.requires_grad]


def adapter_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's format ("<module>.lora_A.weight"), detached, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {
        key: value.detach().cpu().contiguous()
        for key, value in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()
    }


def adapter_config(unet: torch.nn.Module) -> dict:
    """The injected adapter's LoraConfig as a dict (what the file's metadata holds)."""
    config = getattr(unet, "peft_config", {}).get(ADAPTER_NAME)
    if config is None:
        raise ValueError("the UNet holds no LoRA adapter added by add_lora")
    return {key: (sorted(value) if isinstance(value, set) else value) for key, value in config.to_dict().items()}


def save_lora(unet: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the adapter as diffusers' `save_lora_weights` does: out_dir/pytorch_lora_weights.safetensors."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    out_dir = Path(out_dir)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        out_dir,
        unet_lora_layers=adapter_state_dict(unet),
        unet_lora_adapter_metadata=adapter_config(unet),
        weight_name=LORA_WEIGHT_NAME,
    )
    return out_dir / LORA_WEIGHT_NAME


def load_lora(unet: torch.nn.Module, folder: str | Path) -> None:
    """Add the adapter that `save_lora` (or diffusers' save_lora_weights, UNet part) wrote to `unet`, in place."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    path = Path(folder) / LORA_WEIGHT_NAME
    with safe_open(path, "pt") as file:
        metadata = file.metadata() or {}
        state = {key[len(_PREFIX) :]: file.get_tensor(key) for key in file.keys() if key.startswith(_PREFIX)}  # noqa: SIM118, safe_open has no __iter__
    if _METADATA_KEY not in metadata:
        raise ValueError(f"{path} holds no LoRA config in its metadata (rank, alpha, target modules)")
    fields = {f for f in LoraConfig.__dataclass_fields__ if LoraConfig.__dataclass_fields__[f].init}
    stored = {k.removeprefix(_PREFIX): v for k, v in json.loads(metadata[_METADATA_KEY]).items()}  # "unet.r": 4
    config = LoraConfig(**{k: v for k, v in stored.items() if k in fields})
    add_lora(unet, config)
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{path}: keys that match no adapter layer, e.g. {unexpected[0]}")


def plain_state_dict(unet: torch.nn.Module, merged: bool = False) -> dict[str, torch.Tensor]:
    """The UNet's weights under its plain diffusers names, adapters left out (merged=False: the base model)
    or folded in (merged=True: W + (alpha / r) B A, the finetuned model). Loads into a UNet built from its config."""
    deltas = {}
    if merged:
        for name, module in unet.named_modules():
            if _is_tuner_layer(module):
                for adapter in module.active_adapters:
                    delta = module.get_delta_weight(adapter)
                    deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + delta
    plain = {}
    for key, value in unet.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        value = value.detach()
        plain[key] = (value + deltas[key].to(value.dtype) if key in deltas else value).cpu().contiguous()
    return plain


def plain_copy(unet: torch.nn.Module, merged: bool = False) -> torch.nn.Module:
    """A new UNet of the same class and config without adapters: the base model, or the merged one."""
    copy = type(unet).from_config(unet.config)
    copy.load_state_dict(plain_state_dict(unet, merged), strict=True)
    return copy.eval()


def _is_tuner_layer(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)
