"""DoRA: W' = m ⊙ (W + sBA) / ‖W + sBA‖_row, against PEFT and a closed form."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny import tiny_model
from transformers import AutoModelForCausalLM

from lora_cli.lora import (
    inject_lora,
    lora_layers,
    merge_lora,
    param_report,
    peft_target_names,
    resolve_targets,
)
from lora_cli.lora.adapter import load_adapter
from lora_cli.lora.inject import expected_trainable

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7], [3, 4, 8, 16, 32, 64, 100, 120]])


def logits(m):
    with torch.no_grad():
        return m.eval()(input_ids=IDS).logits


def dora_model(arch, seed=1):
    model = tiny_model(arch)
    paths = resolve_targets(model, "attention")
    inject_lora(model, paths, 4, 8, use_dora=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.lora_magnitude_vector.shape, generator=g))
    return model, paths


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_init_identity_and_forward_equals_peft(arch):
    base = tiny_model(arch)
    fresh = copy.deepcopy(base)
    inject_lora(fresh, resolve_targets(fresh, "attention"), 4, 8, use_dora=True)
    assert torch.equal(logits(base), logits(fresh))
    assert param_report(fresh).trainable == expected_trainable(fresh)

    ours, paths = dora_model(arch)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_target_names(ours, paths), use_dora=True,
                          fan_in_fan_out=arch == "gpt2")
    theirs = peft.get_peft_model(tiny_model(arch), cfg)
    with torch.no_grad():
        for p, layer in lora_layers(ours).items():
            m = theirs.base_model.model.get_submodule(p)
            m.lora_A["default"].weight.copy_(layer.lora_A.weight)
            m.lora_B["default"].weight.copy_(layer.lora_B.weight)
            m.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    assert (logits(ours) - logits(theirs)).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_closed_form(arch):
    model, _ = dora_model(arch)
    before = logits(model)
    layer = next(iter(lora_layers(model).values()))
    w = layer.base_layer.weight.detach().clone()
    w_oi = w.T if layer.fan_in_fan_out else w
    v = w_oi + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    expected = layer.lora_magnitude_vector[:, None] * v / v.norm(dim=1, keepdim=True)
    for lay in lora_layers(model).values():
        lay.merge()
    got = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight
    assert torch.allclose(got, expected, atol=1e-6)
    assert (logits(model) - before).abs().max() < 1e-4
    for lay in lora_layers(model).values():
        lay.unmerge()
    assert (layer.base_layer.weight - w).abs().max() < 1e-6
    merge_lora(model)
    assert (logits(model) - before).abs().max() < 1e-4


def test_train_dora_loads_in_peft_and_merges(cli, tiny_llama, chat_data, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--dora",
                       "--max-steps", "4", "--lr", "1e-2", "--dropout", "0.1")
    assert code == 0, err
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run)
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama)
    load_adapter(ours, run)
    ref = logits(ours)
    assert (logits(theirs) - ref).abs().max() < 1e-5
    assert not torch.equal(ref, logits(AutoModelForCausalLM.from_pretrained(tiny_llama)))
    assert cli("merge", run, "--output", tmp_path / "m")[0] == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (logits(merged) - ref).abs().max() / ref.abs().max() < 1e-4
    code, _, err = cli("export", run, "--portable", "--output", tmp_path / "p")
    assert code == 1 and "DoRA" in err
    assert cli("export", run, "--output", tmp_path / "x")[0] == 0  # its card says to merge it for vLLM
    card = (tmp_path / "x/README.md").read_text()
    assert "vLLM cannot serve an adapter with DoRA: merge it" in card and "--enable-lora" not in card
    code, out, _ = cli("inspect", run, "--json")
    assert '"use_dora": true' in out


def test_peft_made_dora_adapter_loads_in_ours(tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = tiny_model("llama")
    load_adapter(ours, tmp_path)
    assert (logits(ours) - logits(theirs)).abs().max() < 1e-5
