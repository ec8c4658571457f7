"""The fast loss path (head + CE on loss positions only, chunked) equals the model's own forward."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from lora_cli import loss as loss_mod
from lora_cli.data import IGNORE
from lora_cli.lora import inject_lora, lora_layers, resolve_targets
from lora_cli.loss import CausalLMLoss


def batch(vocab=128):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a prompt
    labels[2, 9:] = IGNORE  # padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gpt2", "gpt_neox", "qwen2", "phi3", "opt"])
def test_fused_loss_and_grads_equal_the_plain_forward(arch, monkeypatch):
    monkeypatch.setattr(loss_mod, "chunk_rows", lambda vocab, device: 5)  # force several chunks
    results = []
    for fused in (True, False):
        model = tiny_model(arch)
        torch.manual_seed(1)
        inject_lora(model, resolve_targets(model, "attention"), 4, 8)
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        m = CausalLMLoss(model, fused=fused)
        assert (m.head is not None) == fused
        s, n = m(**batch())
        s.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((s.detach(), n, grads))
    (s1, n1, g1), (s2, n2, g2) = results
    assert n1 == n2 == 2 * 7 + 4  # labels 5..11 on two rows, 5..8 on the padded one
    assert torch.allclose(s1, s2, rtol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_loss_is_hand_computable():
    model = tiny_model("llama")
    b = batch()
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        s, n = CausalLMLoss(model)(**b)
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = b["labels"][:, 1:]
    keep = tgt != IGNORE
    by_hand = -lp[keep].gather(1, tgt[keep][:, None]).sum()
    assert int(n) == int(keep.sum())
    assert abs(float(s) - float(by_hand)) < 1e-3


def test_chunk_rows_keep_cpu_logits_under_the_mmap_limit():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for vocab in (32_000, 49_152, 151_936):
        rows = loss_mod.chunk_rows(vocab, cpu)
        assert rows * vocab * 4 <= 32 << 20 and (rows + 1) * vocab * 4 > loss_mod.CHUNK_BYTES["cpu"]
    assert loss_mod.chunk_rows(49_152, cpu) == 128
    assert loss_mod.chunk_rows(10**7, cpu) == loss_mod.MIN_CHUNK_ROWS
    assert loss_mod.chunk_rows(49_152, cuda) == 5461
