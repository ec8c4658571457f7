"""--packing: records share a sequence without seeing each other."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny import tiny_config, tiny_tokenizer

from lora_cli import loss as loss_mod
from lora_cli.data import IGNORE, Encoder, Example, collate, first_fit, pack
from lora_cli.errors import UserError
from lora_cli.loss import CausalLMLoss, attention_mask_for
from lora_cli.training import check_packing, stateful_layers


def records():
    return [{"prompt": "hello " * (i + 1), "completion": f"answer {i} is purple"} for i in range(5)]


def test_pack_layout():
    tok = tiny_tokenizer()
    exs, _ = Encoder(tok, 128).encode_all(records())
    packed = pack(exs, 128)
    assert len(packed) < len(exs)
    assert sorted(sum((p.input_ids.tolist() for p in packed), [])) == sorted(sum((e.input_ids.tolist() for e in exs), []))
    for p in packed:
        assert len(p.input_ids) <= 128
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0]
        assert all(p.labels[i] == IGNORE for i in starts)  # never predict across a record boundary
    assert sum(p.n_loss for p in packed) == sum(e.n_loss for e in exs)


def test_first_fit_puts_each_record_where_a_scan_over_the_bins_would():
    """The tree gives the scan's bins exactly (packing did not change), without its O(records × bins) time."""
    import random

    def scan(sizes, capacity):
        bins, room = [], []
        for i, n in enumerate(sizes):
            k = next((b for b, r in enumerate(room) if r >= n), None)
            if k is None:
                bins.append([i])
                room.append(capacity - n)
            else:
                bins[k].append(i)
                room[k] -= n
        return bins

    rng = random.Random(0)
    for _ in range(200):
        capacity = rng.choice([1, 7, 64, 512])
        sizes = [rng.randint(1, capacity) for _ in range(rng.randint(0, 300))]
        sizes.sort(reverse=rng.random() < 0.7)  # longest first, as pack() does; any order too
        assert first_fit(sizes, capacity) == scan(sizes, capacity)


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


SLIDING = {  # window 4, records of 12 and 7 tokens: the window matters inside each record
    "gemma3": lambda c: tf.Gemma3TextConfig(**c, head_dim=8, sliding_window=4, sliding_window_pattern=2),
    "gemma2": lambda c: tf.Gemma2Config(**c, head_dim=8, sliding_window=4),
    "mistral": lambda c: tf.MistralConfig(**c, sliding_window=4),
    "phi3": lambda c: tf.Phi3Config(**c, sliding_window=4, pad_token_id=0),
    "qwen2": lambda c: tf.Qwen2Config(**c, sliding_window=4, use_sliding_window=True, max_window_layers=1),
}


@pytest.mark.parametrize("arch,impl", [(a, i) for a in SLIDING for i in ("sdpa", "eager")
                                       if (a, i) != ("gemma2", "sdpa")])  # Gemma 2 has no SDPA attention
def test_packed_records_keep_the_sliding_window(arch, impl):
    """A model given a 4-D mask takes it as it is: the packing mask must carry the window itself (for every
    layer, or per layer type where local and global layers alternate)."""
    c = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(SLIDING[arch](c), attn_implementation=impl).eval()
    first, second = list(range(5, 17)), list(range(20, 27))
    (packed,) = pack([Example(first, first), Example(second, second)], 24)
    batch = collate([packed], 0)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=attention_mask_for(model, batch["attention_mask"])).logits[0]
        for ids, rows in ((first, slice(0, 12)), (second, slice(12, 19))):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert (out[rows] - alone).abs().max() < 1e-5


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


def _loss_model(arch):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)))
    exs, _ = Encoder(tok, 128).encode_all(records())
    return CausalLMLoss(model), exs[0], tok.pad_token_id


def test_packing_check_passes_a_model_that_keeps_records_apart():
    loss_model, example, pad = _loss_model("llama")
    check_packing(loss_model, loss_model.model, example, pad, torch.device("cpu"), torch.float32)


def test_packing_check_catches_records_that_see_each_other(monkeypatch):
    """A plain 2-D mask instead of the block mask: the second copy attends to the first, refused."""
    loss_model, example, pad = _loss_model("llama")
    monkeypatch.setattr(loss_mod, "attention_mask_for", lambda model, block: torch.ones(block.shape[0], block.shape[-1]))
    with pytest.raises(UserError, match="packed together see each other in LlamaForCausalLM"):
        check_packing(loss_model, loss_model.model, example, pad, torch.device("cpu"), torch.float32)


def test_packing_is_refused_for_layers_that_carry_a_state(cli, tmp_path):
    """LFM2's short convolutions (and Mamba, linear attention, RG-LRU layers) carry a state from one record into
    the next, which no attention mask stops: a random tiny LFM2 (its own initializer range) moves a packed record's
    loss by about 1e-6, under what the check on the model tells from rounding, so --packing trained it silently.
    Its config says so."""
    from conftest import write_jsonl
    from tiny import save_tiny

    model = save_tiny(tmp_path / "lfm2", "lfm2")
    data = write_jsonl(tmp_path / "d.jsonl", records())
    code, _, err = cli("train", "--model", model, "--data", data, "--output", tmp_path / "run", "--packing",
                       "--max-steps", "1")
    assert code == 1 and "error: --packing: Lfm2ForCausalLM has layers that carry a state from one token to the " \
                         "next (its config's layer_types lists conv layers)" in " ".join(err.split()), err
    assert not (tmp_path / "run").exists()
    assert cli("train", "--model", model, "--data", data, "--output", tmp_path / "run", "--max-steps", "1")[0] == 0


@pytest.mark.parametrize("model_type", ["jamba", "falcon_h1", "bamba", "qwen3_next", "minimax", "lfm2", "lfm2_moe",
                                        "recurrent_gemma", "granitemoehybrid", "nemotron_h", "zamba2", "mamba2"])
def test_configs_of_layers_with_a_state_are_told(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert stateful_layers(CONFIG_MAPPING[model_type]()) is not None


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "gemma3n_text", "gpt_oss", "llama4_text", "cohere2",
                                        "deepseek_v3", "modernbert-decoder", "olmo3", "phimoe", "whisper"])
def test_configs_of_attention_models_are_not_told(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert stateful_layers(CONFIG_MAPPING[model_type]()) is None


def test_packing_check_catches_a_state_the_config_does_not_name():
    """RWKV's config names no layer kinds: behind another record than a copy of itself, a record's loss changes."""
    loss_model, example, pad = _loss_model("rwkv")
    assert stateful_layers(loss_model.model.config) is None
    with pytest.raises(UserError, match="see each other in RwkvForCausalLM .* behind another record"):
        check_packing(loss_model, loss_model.model, example, pad, torch.device("cpu"), torch.float32)


def test_packing_check_names_positions_that_do_not_restart():
    """BartForCausalLM counts positions along the whole packed sequence: nothing leaks from the record before
    (the same loss behind either), but the record is computed at other positions than alone."""
    loss_model, example, pad = _loss_model("bart")
    with pytest.raises(UserError, match="does not restart positions at each record"):
        check_packing(loss_model, loss_model.model, example, pad, torch.device("cpu"), torch.float32)


def test_packing_on_a_model_without_4d_masks_is_one_clear_error(cli, tmp_path):
    """BLOOM builds ALiBi from a 2-D mask: --packing fails before anything is written."""
    from conftest import write_jsonl
    from tiny import save_tiny

    model = save_tiny(tmp_path / "bloom", "bloom")
    data = write_jsonl(tmp_path / "d.jsonl", records())
    code, _, err = cli("train", "--model", model, "--data", data, "--output", tmp_path / "run", "--packing",
                       "--max-steps", "1")
    assert code == 1 and "error: --packing: BloomForCausalLM does not take a per-record attention mask" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_mpt_context_length_caps_packed_sequences(cli, tmp_path):
    """MPT names its context max_seq_len; packing to the 1024 default would overrun its ALiBi table."""
    from conftest import write_jsonl
    from tiny import save_tiny

    model = save_tiny(tmp_path / "mpt", "mpt")
    data = write_jsonl(tmp_path / "d.jsonl", records() * 30)
    code, _, err = cli("train", "--model", model, "--data", data, "--output", tmp_path / "run", "--packing",
                       "--max-steps", "1")
    assert code == 0, err
    assert "max length 1024 → 256" in err
