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


def _own_loss(model, b):
    """The model's own summed cross-entropy over the label positions (its forward, its logits)."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    keep = b["labels"][:, 1:] != IGNORE
    return torch.nn.functional.cross_entropy(logits[keep], b["labels"][:, 1:][keep], reduction="sum")


def _capped_gemma():
    """RecurrentGemma soft-caps its logits under a name (`logits_soft_cap`) of its own; made to exceed the cap,
    as trained models' logits do."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.RecurrentGemmaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=1, intermediate_size=96, lru_width=64, head_dim=16,
                                     attention_window_size=16, conv1d_width=4, block_types=["recurrent", "attention"])
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.final_norm.weight.add_(40.0)
    return model


def _bert_decoder():
    """BERT-style causal LMs put a dense + LayerNorm between the body and the output embedding."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, is_decoder=True, hidden_dropout_prob=0, attention_probs_dropout_prob=0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("make", [_capped_gemma, _bert_decoder, lambda: tiny_model("llama"), lambda: tiny_model("opt")],
                         ids=["soft-capped", "head-transform", "plain", "plain-called-as-decoder"])
def test_the_fused_head_is_used_only_where_it_gives_the_models_own_loss(make):
    """The fused path computes body → output embedding → CE. It trained RecurrentGemma on uncapped logits (a
    step-1 loss of 93.9 against the model's 28.2) and BERT-style heads without their transform; a forward of a
    few tokens now decides, and the loss is the model's own either way."""
    from lora_cli.loss import head_is_last

    model = make()
    b = batch()
    fused = head_is_last(model, b["input_ids"][:1, :4])  # (asked before the weights are frozen, as train does)
    model.requires_grad_(False)
    assert fused == (make not in (_capped_gemma, _bert_decoder))
    with torch.no_grad():
        ours, _ = CausalLMLoss(model, fused=fused)(**b)
        own = _own_loss(model, b)
        assert torch.allclose(ours, own, rtol=1e-5), (ours, own)
        if not fused:  # (what the fast path would have trained on)
            wrong, _ = CausalLMLoss(model, fused=True)(**b)
            assert not torch.allclose(wrong, own, rtol=1e-3)
