"""The CUDA paths: bf16, fp16 with loss scaling, a 4-bit (QLoRA) base, gradient checkpointing.

Skipped where there is no CUDA GPU (CI); run on a GPU with `pytest tests/test_cuda.py` (results in
docs/scaling.md)."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_cli.lora.adapter import load_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAST = ["--max-steps", "12", "--lr", "1e-2", "--dropout", "0", "--batch-size", "4"]


def train(cli, model, data, run, *extra):
    code, _, err = cli("train", "--model", model, "--data", data, "--output", run, *FAST, *extra)
    assert code == 0, err
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    return losses, json.loads((run / "train_summary.json").read_text())


def logits(model):
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]], device=model.device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def fp32_base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_trains_on_the_gpu_and_loads_in_peft(cli, tiny_llama, chat_data, tmp_path, dtype):
    """bf16 autocast, and fp16 with loss scaling: the same first loss as fp32, a falling loss, fp32 LoRA
    weights, and an adapter PEFT loads with our logits."""
    ref, _ = train(cli, tiny_llama, chat_data, tmp_path / "fp32", "--dtype", "float32", "--max-steps", "1")
    losses, summary = train(cli, tiny_llama, chat_data, tmp_path / "run", "--dtype", dtype)
    assert summary["device"].startswith("cuda") and summary["device_name"] == torch.cuda.get_device_name(0)
    assert summary["peak_memory_bytes"] > 0
    assert losses[0] == pytest.approx(ref[0], rel=2e-2)  # before any update: only rounding differs
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0]
    assert {t.dtype for t in load_file(str(tmp_path / "run" / "adapter_model.safetensors")).values()} == {torch.float32}
    theirs = peft.PeftModel.from_pretrained(fp32_base(tiny_llama), tmp_path / "run").eval()
    ours = fp32_base(tiny_llama)
    load_adapter(ours, tmp_path / "run")
    assert (logits(ours.eval()) - logits(theirs)).abs().max() < 1e-4


def test_gradient_checkpointing_on_the_gpu_trains_the_same(cli, tiny_llama, chat_data, tmp_path):
    a, _ = train(cli, tiny_llama, chat_data, tmp_path / "a", "--dtype", "float32")
    b, _ = train(cli, tiny_llama, chat_data, tmp_path / "b", "--dtype", "float32", "--gradient-checkpointing")
    assert a == pytest.approx(b, rel=1e-3)
    ta, tb = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-4) for k in ta)


def test_4bit_base_trains_loads_in_peft_and_merges_into_the_16bit_base(cli, tiny_llama, chat_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lora_cli.models import quantization_4bit

    run = tmp_path / "run"
    losses, _ = train(cli, tiny_llama, chat_data, run, "--load-in-4bit")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0]

    def q4():
        return AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=quantization_4bit(torch.bfloat16),
                                                    device_map={"": 0})

    ours = q4()
    load_adapter(ours, run)
    assert type(ours.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"  # wraps the 4-bit linear
    theirs = peft.PeftModel.from_pretrained(q4(), run).eval()
    mine = logits(ours.eval())
    assert (mine - logits(theirs)).abs().max() < 2e-2 * mine.abs().max()

    code, _, err = cli("merge", run, "--output", tmp_path / "merged")
    assert code == 0, err
    assert "unquantized" in err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # the base's dtype, not 4-bit
    assert getattr(merged.config, "quantization_config", None) is None
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama)
    load_adapter(ref, run)
    assert (logits(merged.eval()) - logits(ref.eval())).abs().max() < 1e-4
