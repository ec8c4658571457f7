"""The LoRA core: layer, target resolution, injection/merge, PEFT-format adapter I/O. Torch only."""

from lora_cli.lora.inject import (
    expected_trainable,
    inject_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    param_report,
)
from lora_cli.lora.layer import LoraLinear, lora_scaling
from lora_cli.lora.peft_format import AdapterConfig, read_adapter_config
from lora_cli.lora.targets import peft_target_names, resolve_targets

__all__ = [
    "AdapterConfig",
    "LoraLinear",
    "expected_trainable",
    "inject_lora",
    "lora_layers",
    "lora_scaling",
    "lora_state_dict",
    "merge_lora",
    "param_report",
    "peft_target_names",
    "read_adapter_config",
    "resolve_targets",
]
