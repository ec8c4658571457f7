"""The LoRA core: layer, target resolution, injection/merge, PEFT-format adapter I/O. Torch only.

Names are loaded lazily, so `lora_cli.lora.peft_format` (used by `inspect`) never pulls in torch.
"""

from importlib import import_module

_EXPORTS = {
    "expected_trainable": "inject", "inject_lora": "inject", "lora_layers": "inject", "lora_state_dict": "inject",
    "merge_lora": "inject", "param_report": "inject", "unload_lora": "inject",
    "LoraLinear": "layer", "lora_scaling": "layer",
    "AdapterConfig": "peft_format", "read_adapter_config": "peft_format",
    "peft_target_names": "targets", "resolve_targets": "targets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"lora_cli.lora.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
