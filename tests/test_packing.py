"""--packing: records share a sequence without seeing each other."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny import tiny_config, tiny_tokenizer

from lora_cli.data import IGNORE, Encoder, collate, pack
from lora_cli.loss import CausalLMLoss, attention_mask_for


def records():
    return [{"prompt": "hello " * (i + 1), "completion": f"answer {i} is purple"} for i in range(5)]


def test_pack_layout():
    tok = tiny_tokenizer()
    exs, _ = Encoder(tok, 128).encode_all(records())
    packed = pack(exs, 128)
    assert len(packed) < len(exs)
    assert sorted(sum((p.input_ids for p in packed), [])) == sorted(sum((e.input_ids for e in exs), []))
    for p in packed:
        assert len(p.input_ids) <= 128
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0]
        assert all(p.labels[i] == IGNORE for i in starts)  # never predict across a record boundary
    assert sum(p.n_loss for p in packed) == sum(e.n_loss for e in exs)


@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("qwen2", "sdpa")])
def test_packed_logits_equal_alone(arch, impl):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)), attn_implementation=impl).eval()
    exs, _ = Encoder(tok, 128).encode_all(records())
    packed = pack(exs, 128)
    batch = collate(packed, tok.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=attention_mask_for(model, batch["attention_mask"])).logits
        for p_i, p in enumerate(packed):
            for seg in sorted(set(p.segments)):
                idx = [i for i, s in enumerate(p.segments) if s == seg]
                alone = model(input_ids=torch.tensor([[p.input_ids[i] for i in idx]])).logits[0]
                assert (out[p_i, idx] - alone).abs().max() < 1e-5


def test_packed_loss_equals_unpacked_loss():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama", len(tok))).eval()
    exs, _ = Encoder(tok, 128).encode_all(records())
    loss = CausalLMLoss(model)
    with torch.no_grad():
        s1, n1 = loss(**collate(exs, tok.pad_token_id))
        s2, n2 = loss(**collate(pack(exs, 128), tok.pad_token_id))
    assert int(n1) == int(n2)
    assert abs(float(s1) - float(s2)) < 1e-4
