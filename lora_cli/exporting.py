"""`lora export`: a small shareable PEFT adapter (cast to float16 by default) with a model card."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_cli.errors import UserError, atomic_dir
from lora_cli.inspection import adapter_facts
from lora_cli.lora.adapter import read_adapter_tensors, write_adapter
from lora_cli.lora.peft_format import GGUF_BASE_KEY, KEY_PREFIX, read_adapter_config


def base_size_bytes(ref: str | None) -> int | None:
    """On-disk size of a local base model (safetensors files, or the .gguf file), else None."""
    if not ref:
        return None
    p = Path(ref)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors")) or None
    return None


def export_adapter(adapter_dir: str | Path, output: str | Path, dtype: torch.dtype = torch.float16,
                   force: bool = False) -> dict:
    """Write adapter_config.json, adapter_model.safetensors (in `dtype`) and README.md to `output`."""
    output = Path(output)
    if output.exists() and not force:
        raise UserError(f"--output {output} exists; pass --force to overwrite it")
    config = read_adapter_config(adapter_dir)
    tensors = {KEY_PREFIX + k: v.to(dtype).contiguous() for k, v in read_adapter_tensors(adapter_dir).items()}
    facts = adapter_facts(adapter_dir)
    meta = {GGUF_BASE_KEY: str(config.base_model_name_or_path)} if facts["base_is_gguf"] else {}
    with atomic_dir(output) as tmp:
        write_adapter(tmp, config, tensors, meta)
        (tmp / "README.md").write_text(model_card(facts, adapter_dir, dtype), encoding="utf-8")
    size = (output / "adapter_model.safetensors").stat().st_size
    return {"output": str(output), "size_bytes": size, "base_size_bytes": base_size_bytes(config.base_model_name_or_path)}


def model_card(facts: dict, adapter_dir: str | Path, dtype: torch.dtype) -> str:
    """A Hugging Face style README for the adapter."""
    base = facts["base_model_name_or_path"]
    s = facts.get("train_summary") or {}
    cfg = _train_config(Path(adapter_dir))
    gguf_note = ("\n> The base was a GGUF file, dequantized on load: these weights were trained against the "
                 "dequantized model, not the Hub's original weights.\n" if facts["base_is_gguf"] else "")
    hub_base = base if base and not Path(str(base)).exists() else "BASE_MODEL"

    def num(x, fmt=".4f"):
        return format(x, fmt) if isinstance(x, (int, float)) else "n/a"

    return f"""---
library_name: peft
base_model: {base}
tags: [lora, peft, lora-cli]
---

# LoRA adapter for `{base}`
{gguf_note}
| | |
|---|---|
| base model | `{base}` |
| rank / alpha | {facts['r']} / {facts['lora_alpha']:g} (scaling {facts['scaling']:.4g}{', rsLoRA' if facts['use_rslora'] else ''}) |
| targets | {', '.join(f'`{k}` ×{v}' for k, v in facts['modules'].items())} |
| trainable parameters | {facts['trainable_params']:,} |
| weights dtype | {str(dtype).replace('torch.', '')} |
| training data | `{cfg.get('data', 'n/a')}` |
| steps | {s.get('steps', 'n/a')} |
| final train loss | {num(s.get('final_loss'))} |
| eval loss | {num(s.get('eval_loss'))} |

Made with [`lora`](https://pypi.org/project/lora-cli/), saved in PEFT's format.

## Use it

```bash
lora generate --model {base} --adapter . --prompt "Hello"
```

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{hub_base}"), "path/to/this/folder")
```

```bash
vllm serve {hub_base} --enable-lora --lora-modules my-adapter=path/to/this/folder --max-lora-rank {max(int(k) for k in facts['ranks']) if facts['ranks'] else facts['r']}
```
"""


def _train_config(run_dir: Path) -> dict:
    import yaml

    p = run_dir / "train_config.yaml"
    try:
        return yaml.safe_load(p.read_text()) or {} if p.is_file() else {}
    except yaml.YAMLError:
        return {}
