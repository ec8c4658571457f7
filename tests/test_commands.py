"""merge / export / generate / inspect through the CLI entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import save_tiny, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_cli.lora.adapter import load_adapter

FAST = ["--max-steps", "4", "--lr", "1e-2", "--dropout", "0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama, chat_data):
    from lora_cli.cli import main

    run = tmp_path_factory.mktemp("runs") / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(tiny_llama), "--data", str(chat_data), "--output", str(run), *FAST])
    assert e.value.code == 0
    return run


def logits(model, ids=None):
    ids = ids if ids is not None else torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_inspect_table_and_json(cli, trained_run):
    code, out, _ = cli("inspect", trained_run, "--json")
    assert code == 0
    facts = json.loads(out)
    tensors = load_file(str(trained_run / "adapter_model.safetensors"))
    assert facts["r"] == 16 and facts["lora_alpha"] == 32 and facts["scaling"] == 2.0
    assert facts["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert facts["size_bytes"] == (trained_run / "adapter_model.safetensors").stat().st_size
    assert facts["modules"] == {"k_proj": 2, "o_proj": 2, "q_proj": 2, "v_proj": 2}
    assert facts["dtype"] == "float32" and facts["train_summary"]["steps"] == 4
    code, out, _ = cli("inspect", trained_run)
    assert code == 0 and "q_proj ×2" in out and "trainable params" in out


def test_inspect_says_a_truncated_adapter_is_truncated(cli, trained_run, tmp_path):
    """inspect read the header only and showed a half-copied adapter as fine; merge then refused it."""
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(trained_run, cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = cli("inspect", cut)
    assert code == 1 and "the file is truncated" in err and "cut short while written or copied" in err, err


def test_inspect_counts_embedding_adapters_and_names_dora_and_alpha_patterns(cli, tiny_llama, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], use_dora=True,
                             alpha_pattern={"q_proj": 16})
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(tmp_path / "a")
    code, out, err = cli("inspect", tmp_path / "a", "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["modules"] == {"embed_tokens": 1, "q_proj": 2}
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))  # PEFT adds the frozen embedding
    assert facts["trainable_params"] == sum(v.numel() for k, v in saved.items() if "base_layer" not in k) \
        < sum(v.numel() for v in saved.values())
    code, out, err = cli("inspect", tmp_path / "a")
    assert code == 0, err
    out = " ".join(out.split())
    assert "embed_tokens ×1" in out and "(3 modules)" in out and "DoRA" in out and "1 module pattern(s) with their own alpha" in out


def test_a_checkpoint_exports_and_inspects_with_its_training_figures(cli, trained_run, chat_data, tmp_path):
    from lora_cli.checkpoints import list_checkpoints

    step, ckpt = list_checkpoints(trained_run)[0]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    code, out, err = cli("inspect", ckpt, "--json")
    assert code == 0, err
    assert json.loads(out)["train_summary"]["steps"] == step
    assert json.loads(out)["train_summary"]["final_loss"] == state["last_loss"]
    code, _, err = cli("export", ckpt, "--output", tmp_path / "x")
    assert code == 0, err
    card = (tmp_path / "x" / "README.md").read_text()
    assert f"| steps | {step} |" in card and f"| final train loss | {state['last_loss']:.4f} |" in card
    assert f"| training data | `{chat_data}` |" in card  # from the run's train_config.yaml


def test_inspect_never_imports_torch(trained_run):
    code = "import sys; from lora_cli.cli import main\ntry: main(['inspect', sys.argv[1], '--json'])\n" \
           "except SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, str(trained_run)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - t0 < 5  # generous: the benchmark holds the real target


def test_help_does_not_import_torch():
    code = "import sys; from lora_cli.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n" \
           "assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "merge" in r.stdout and "inspect" in r.stdout
    assert "--debug (with any command)" in " ".join(r.stdout.split())  # documented, and said where users look


def test_export_loads_in_peft(cli, trained_run, tiny_llama, tmp_path):
    out = tmp_path / "exp"
    code, _, err = cli("export", trained_run, "--output", out)
    assert code == 0 and "% of the base" in err
    size = (out / "adapter_model.safetensors").stat().st_size
    assert f"adapter {size / 1024:.1f} KiB (float16)" in " ".join(err.split())  # tiny: not "0.00 MiB"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    card = (out / "README.md").read_text()
    assert "rank / alpha | 16 / 32" in card and "PeftModel.from_pretrained" in card
    assert f"`BASE_MODEL` is the model this adapter was trained on: here the local folder `{tiny_llama}`" in card
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out).eval()
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama)
    load_adapter(ours, trained_run)
    assert rel_diff(logits(theirs), logits(ours.eval())) < 1e-3  # float16 rounding of A/B
    code, _, err = cli("export", trained_run, "--output", out)
    assert code == 1 and "exists" in err


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(target_modules=["q_proj", "v_proj"], use_rslora=True, rank_pattern={"v_proj": 2},
                   alpha_pattern={"v_proj": 5})),
    ("gpt2", dict(target_modules=["c_attn", "attn.c_proj"], fan_in_fan_out=True)),
    ("llama", dict(target_modules=["q_proj", "gate_proj", "down_proj"], layers_to_transform=[1],
                   exclude_modules=r".*mlp\.gate_proj")),
])
def test_merge_peft_made_adapters(cli, tmp_path, arch, kw):
    base_dir = save_tiny(tmp_path / "base", arch, chat_template=None)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                 peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    code, _, err = cli("merge", tmp_path / "adapter", "--base", base_dir, "--output", tmp_path / "m")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert rel_diff(logits(merged), logits(theirs)) < 1e-4
    if "layers_to_transform" in kw:  # inspect names the selection
        code, out, _ = cli("inspect", tmp_path / "adapter", "--json")
        facts = json.loads(out)
        assert (facts["layers_to_transform"], facts["exclude_modules"], facts["num_modules"]) == ([1], kw["exclude_modules"], 2)
    # exported (float32 here), the selection travels: PEFT loads it as it was
    code, _, err = cli("export", tmp_path / "adapter", "--output", tmp_path / "x", "--dtype", "float32")
    assert code == 0, err
    again = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "x").eval()
    assert rel_diff(logits(again), logits(theirs)) < 1e-5


@pytest.mark.parametrize("arch,saved,tying", [("llama-tied", "embed_tokens", False), ("gpt2", "wte", False),
                                              ("llama-tied", "embed_tokens", True)])
def test_merge_of_a_replaced_embedding_keeps_the_tied_heads_weights(cli, tmp_path, monkeypatch, arch, saved, tying):
    """modules_to_save replaces the input embedding only (in PEFT the tied head keeps the base's): the merged
    checkpoint kept the tie, so its head became the new embedding (logits off by 1.08) and --verify said 'ok'
    to it. Now the head gets the original and is untied; a merge that differs fails --verify, nothing written.
    With PEFT's ensure_weight_tying the head is replaced too (PEFT saves it twice): refused before, now merged."""
    base_dir = save_tiny(tmp_path / "base", arch, chat_template=None)
    assert json.loads((base_dir / "config.json").read_text()).get("tie_word_embeddings", True)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn" if arch == "gpt2" else "q_proj"], modules_to_save=[saved],
        init_lora_weights=False, ensure_weight_tying=tying))
    with torch.no_grad():
        theirs.get_input_embeddings().weight.add_(0.3 * torch.randn_like(theirs.get_input_embeddings().weight))
    theirs.eval().save_pretrained(tmp_path / "adapter")
    code, out, err = cli("inspect", tmp_path / "adapter", "--json")  # the tied pair trains once (PEFT counts it once)
    assert code == 0, err + out
    assert json.loads(out)["trainable_params"] == theirs.get_nb_trainable_parameters()[0]
    code, _, err = cli("merge", tmp_path / "adapter", "--output", tmp_path / "m", "--verify")
    assert code == 0, err
    assert "verify: max |logits(merged) − logits(base + adapter)| = " in err and "): ok" in err, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert rel_diff(logits(merged), logits(theirs)) < 1e-5
    base_head = AutoModelForCausalLM.from_pretrained(base_dir).get_output_embeddings().weight
    assert torch.equal(merged.get_output_embeddings().weight, base_head) != tying
    if tying:  # export keeps both copies and the flag: PEFT loads it as it saved it
        assert cli("export", tmp_path / "adapter", "--output", tmp_path / "x", "--dtype", "float32")[0] == 0
        again = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "x").eval()
        assert rel_diff(logits(again), logits(theirs)) < 1e-6
    # --verify stops a merge that is not base + adapter (here: a wrong scale) before it takes the output's name
    import lora_cli.merging as merging

    real = merging.delta
    monkeypatch.setattr(merging, "delta", lambda *a: 3 * real(*a))
    code, _, err = cli("merge", tmp_path / "adapter", "--output", tmp_path / "wrong", "--verify")
    assert code == 1 and "the merged model is not base + adapter, so nothing was written" in " ".join(err.split())
    assert not (tmp_path / "wrong").exists() and not list(tmp_path.glob(".wrong*"))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_inspect_describes_an_adapter_lora_cannot_use(cli, tmp_path, bias):
    """inspect refused a PEFT adapter that trains biases (as the other commands do) instead of describing it."""
    base_dir = save_tiny(tmp_path / "base", "gpt2", chat_template=None)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), peft.LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias=bias, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "adapter")
    code, out, err = cli("inspect", tmp_path / "adapter", "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["trainable_params"] == theirs.get_nb_trainable_parameters()[0]
    assert facts["unsupported"] == [f"bias={bias!r} (bias training)"]
    code, out, _ = cli("inspect", tmp_path / "adapter")
    assert code == 0 and "unsupported" in out and "its other commands refuse it" in " ".join(out.split())
    code, _, err = cli("export", tmp_path / "adapter", "--output", tmp_path / "x")
    assert code == 1 and "uses features lora does not implement: bias=" in err


def test_an_adapter_with_modules_to_save_through_every_command(cli, tmp_path):
    """PEFT's modules_to_save on a tied base: merge writes the head as its own weight and unties it, export
    keeps the layers, inspect names them, and what cannot hold them (resize) says so."""
    base_dir = save_tiny(tmp_path / "base", "llama-tied", chat_template=None)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    theirs.eval().save_pretrained(tmp_path / "adapter")
    code, _, err = cli("merge", tmp_path / "adapter", "--base", base_dir, "--output", tmp_path / "m")
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert rel_diff(logits(merged), logits(theirs)) < 1e-5
    code, out, _ = cli("inspect", tmp_path / "adapter", "--json")
    assert json.loads(out)["modules_to_save"] == ["lm_head"]
    code, _, err = cli("export", tmp_path / "adapter", "--output", tmp_path / "x", "--dtype", "float32")
    assert code == 0, err
    again = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "x").eval()
    assert rel_diff(logits(again), logits(theirs)) < 1e-6
    code, _, err = cli("resize", tmp_path / "adapter", "--rank", "2", "--output", tmp_path / "r")
    assert code == 1 and "also carries whole layers (lm_head: modules_to_save)" in err
    # a head for a resized vocabulary (added tokens) does not fit the base: said, not half-merged
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    t["base_model.model.lm_head.weight"] = torch.zeros(t["base_model.model.lm_head.weight"].shape[0] + 2,
                                                       t["base_model.model.lm_head.weight"].shape[1])
    save_file(t, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    code, _, err = cli("merge", tmp_path / "adapter", "--base", base_dir, "--output", tmp_path / "m2")
    assert code == 1 and "(the vocabulary was resized)" in err and not (tmp_path / "m2").exists()


def test_merge_refuses_a_weight_that_several_modules_share(cli, chat_data, tmp_path):
    """Zamba2's layers reuse one attention block: PEFT (and lora train) give each use its own adapter, which
    no merged checkpoint can hold (it stores the tensor once). Merged anyway, every use would get every
    update; refused, unless all uses carry the same update."""
    from safetensors.torch import save_file

    base_dir = save_tiny(tmp_path / "base", "zamba2", chat_template=None)
    code, _, err = cli("train", "--model", base_dir, "--data", chat_data, "--output", tmp_path / "run", *FAST,
                       "--targets", "q_proj")  # said up front
    assert code == 0 and "note: model.layers.0.shared_transformer.self_attn.q_proj and model.layers.1.shared_" \
                         "transformer.self_attn.q_proj use one weight" in " ".join(err.split()), err
    torch.manual_seed(0)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    code, _, err = cli("merge", tmp_path / "adapter", "--base", base_dir, "--output", tmp_path / "m")
    assert code == 1 and not (tmp_path / "m").exists()
    assert "cannot merge: model.layers.0.shared_transformer.self_attn.q_proj shares its weight with " \
           "model.layers.1.shared_transformer.self_attn.q_proj" in " ".join(err.split())
    assert "updates them differently" in err
    t = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    one = {k: v for k, v in t.items() if ".layers.0." in k}
    save_file(one, str(tmp_path / "adapter" / "adapter_model.safetensors"))  # only the first use adapted
    code, _, err = cli("merge", tmp_path / "adapter", "--base", base_dir, "--output", tmp_path / "m")
    assert code == 1 and "does not update them all" in err
    both = {**one, **{k.replace(".layers.0.", ".layers.1."): v.clone() for k, v in one.items()}}
    save_file(both, str(tmp_path / "adapter" / "adapter_model.safetensors"))  # the same update twice: exact
    code, _, err = cli("merge", tmp_path / "adapter", "--base", base_dir, "--output", tmp_path / "m")
    assert code == 0, err
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    assert rel_diff(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()), logits(theirs.eval())) < 1e-5


def test_a_multimodal_checkpoint_trains_merges_and_extracts(cli, chat_data, tmp_path):
    """Gemma 3 (multimodal): `attention` is the language model's (the vision tower never runs on text), and
    the checkpoint names its weights `language_model.model.…` where the model (and the adapter) say
    `model.language_model.…`: merge and extract follow transformers' renaming."""
    base = save_tiny(tmp_path / "base", "gemma3-mm", chat_template=None)
    code, _, err = cli("train", "--model", base, "--data", chat_data, "--output", tmp_path / "run", *FAST)
    assert code == 0, err
    assert "8 modules" in err and "never runs" not in err
    assert all(".language_model." in k for k in load_file(str(tmp_path / "run/adapter_model.safetensors")))
    code, _, err = cli("merge", tmp_path / "run", "--output", tmp_path / "m")
    assert code == 0, err
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "run").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert rel_diff(logits(merged), logits(theirs)) < 1e-5 and rel_diff(logits(theirs), logits(
        AutoModelForCausalLM.from_pretrained(base).eval())) > 1e-3
    code, _, err = cli("extract", "--base", base, "--tuned", tmp_path / "m", "--rank", "16", "--output", tmp_path / "x")
    assert code == 0, err
    again = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "x").eval()
    assert rel_diff(logits(again), logits(merged)) < 1e-4


def test_merge_sharded_in_sharded_out(cli, tmp_path):
    model = tiny_model("llama", vocab=320)
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="20KB")
    from tiny import tiny_tokenizer
    tiny_tokenizer().save_pretrained(base)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1
    config = json.loads((base / "config.json").read_text())  # as transformers 4 wrote it: torch_dtype, not dtype
    config["torch_dtype"] = config.pop("dtype")
    (base / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                 init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    code, _, err = cli("merge", tmp_path / "adapter", "--base", base, "--output", tmp_path / "m", "--dtype", "bf16")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == shards
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"]) == ("bfloat16", "bfloat16")  # the old key would contradict it
    assert rel_diff(logits(merged), logits(theirs)) < 2e-2  # bf16 weights
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in merged.state_dict().values()) // 2


def test_a_single_weights_file_wins_over_a_shard_index_left_beside_it(cli, tmp_path, chat_data):
    """transformers loads model.safetensors before a shard index, and its save_pretrained leaves one beside the
    other when a folder is saved again (sharded, then whole, or the reverse). merge read the index's shards, other
    weights than training had (6.7 off in the logits, silently), and an index without its shards was refused as
    an unfinished download."""
    from tiny import tiny_tokenizer

    folder = tmp_path / "base"
    tiny_model("llama", vocab=320, seed=0).save_pretrained(folder, max_shard_size="20KB")  # the stale shards + index
    tiny_model("llama", vocab=320, seed=1).save_pretrained(tmp_path / "whole")
    shutil.copy(tmp_path / "whole" / "model.safetensors", folder)  # what transformers loads
    tiny_tokenizer().save_pretrained(folder)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    code, _, err = cli("merge", tmp_path / "adapter", "--base", folder, "--output", tmp_path / "m", "--verify")
    assert code == 0 and "): ok" in err and "(1 shard(s), float32, the base's)" in err, err
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert rel_diff(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()), logits(theirs)) < 1e-5
    for shard in folder.glob("model-*.safetensors"):  # the index alone is left: the single file still loads
        shard.unlink()
    code, _, err = cli("train", "--model", folder, "--data", chat_data, "--output", tmp_path / "run", "--max-steps", "1")
    assert code == 0, err


def test_merge_checks_the_base_files_it_copies(cli, trained_run, tiny_llama, tmp_path):
    """A base with a damaged config or index was "internal error: JSONDecodeError" (not naming the file); one with
    a broken tokenizer merged into a model nothing loads, and said it had succeeded."""
    def broken(name, damage):
        base = tmp_path / name
        shutil.copytree(tiny_llama, base)
        damage(base)
        return base

    cases = [
        (lambda b: (b / "config.json").write_text('{"model_type": "llama",'), "config.json: not valid JSON (line 1"),
        (lambda b: (b / "config.json").write_text("[]"), "config.json: expected a JSON object, got list"),
        (lambda b: (b / "config.json").write_text("{}"), "config.json: no model_type"),
        (lambda b: (b / "tokenizer.json").write_text("{"), "cannot load tokenizer from"),
    ]
    for i, (damage, message) in enumerate(cases):
        code, _, err = cli("merge", trained_run, "--base", broken(f"b{i}", damage), "--output", tmp_path / f"m{i}")
        assert code == 1 and message in " ".join(err.split()) and "internal error" not in err, err
        assert not (tmp_path / f"m{i}").exists()
    sharded = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(sharded, max_shard_size="20KB")
    shutil.copytree(tiny_llama, sharded, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    shard = sorted(sharded.glob("model-*.safetensors"))[1].name
    for damage, message in ((lambda b: (b / "model.safetensors.index.json").write_text("{"),
                             "model.safetensors.index.json: not valid JSON"),
                            (lambda b: (b / shard).unlink(), f"lacks {shard}, which its model.safetensors.index.json "
                                                             "lists")):
        base = tmp_path / "damaged"
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(sharded, base)
        damage(base)
        code, _, err = cli("merge", trained_run, "--base", base, "--output", tmp_path / "m")
        assert code == 1 and message in " ".join(err.split()), err


def test_merge_onto_the_wrong_base_names_the_problem(cli, trained_run, tmp_path):
    other = save_tiny(tmp_path / "neox", "gpt_neox")
    code, _, err = cli("merge", trained_run, "--base", other, "--output", tmp_path / "m")
    assert code == 1 and "does not fit this base model: none of its 8 modules" in err and "another model" in err
    assert "warning" not in err  # (it said "their shapes fit, so it merges" before this error)
    assert not (tmp_path / "m").exists()


def test_merge_onto_another_architecture_of_the_same_shapes_warns(cli, trained_run, tmp_path):
    other = save_tiny(tmp_path / "mistral", "mistral")  # llama's module names and shapes
    code, _, err = cli("merge", trained_run, "--base", other, "--output", tmp_path / "m")
    assert code == 0, err
    assert "warning: the adapter was trained on a llama model" in " ".join(err.split()) and "mistral model" in err
    code, _, err = cli("merge", trained_run, "--output", tmp_path / "same")
    assert code == 0 and "warning" not in err
    code, _, err = cli("generate", "--model", other, "--adapter", trained_run, "--prompt", "hi", "--max-new-tokens", "1")
    assert code == 0 and "warning: the adapter was trained on a llama model" in " ".join(err.split()), err
    assert "--model is a mistral model; their shapes fit, so it loads" in " ".join(err.split())


def test_merge_of_a_4bit_run_says_it_merges_into_the_16bit_base(cli, trained_run, tmp_path):
    """A --load-in-4bit run (its train_config.yaml says so; the real 4-bit run is in test_cuda.py) merges
    into the base's own weights, and `lora merge` says so, for the run and for its checkpoints."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = yaml.safe_load((run / "train_config.yaml").read_text())
    (run / "train_config.yaml").write_text(yaml.safe_dump({**cfg, "load_in_4bit": True}))
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    for i, src in enumerate((run, ckpt)):
        code, _, err = cli("merge", src, "--output", tmp_path / f"m{i}")
        assert code == 0, err
        assert "4-bit" in err and "unquantized" in err
    code, _, err = cli("merge", trained_run, "--output", tmp_path / "plain")
    assert code == 0 and "4-bit" not in err


def test_generate_with_and_without_adapter(cli, trained_run, tiny_llama):
    code, out, err = cli("generate", "--model", tiny_llama, "--adapter", trained_run, "--prompt", "What is color 3?",
                         "--max-new-tokens", "8", "--compare")
    assert code == 0, err
    assert "base" in err and str(trained_run) in err and "answers" in err
    code, out, err = cli("generate", "--model", tiny_llama, "--prompt", "hello", "--max-new-tokens", "4",
                         "--no-chat")
    assert code == 0, err
    code, _, err = cli("generate", "--model", tiny_llama, "--adapter", trained_run / "nope", "--prompt", "x")
    assert code == 1 and "does not exist" in err


def test_generate_json_lines_tell_answers_apart(cli, trained_run, tiny_llama, tmp_path):
    """Streamed answers to several prompts run together on stdout; --json writes one object per answer, the
    same answers."""
    (tmp_path / "p.txt").write_text("What is color 3?\nhello\u2028there\x85\n")  # line breaks to str.splitlines
    args = ["generate", "--model", tiny_llama, "--adapter", trained_run, "--prompt-file", tmp_path / "p.txt",
            "--max-new-tokens", "6", "--compare"]
    code, plain, err = cli(*args)
    assert code == 0, err
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["model"], r["prompt"]) for r in rows] == [(m, p) for m in ("base", str(trained_run))
                                                          for p in ("What is color 3?", "hello\u2028there\x85")]
    assert "".join(r["answer"] + "\n" for r in rows) == plain


def test_generate_stays_within_a_learned_position_context(cli, tiny_gpt2):
    """GPT-2 has 256 learned positions: a longer answer is cut to fit with a note, a prompt that fills the
    context is refused (generating past it was an IndexError)."""
    code, out, err = cli("generate", "--model", tiny_gpt2, "--prompt", "hello", "--max-new-tokens", "1000", "--no-chat")
    assert code == 0, err
    err = " ".join(err.split())  # rich wraps the note at the console width
    assert "note: --max-new-tokens 1000 → 253" in err and "the model's context of 256" in err
    code, _, err = cli("generate", "--model", tiny_gpt2, "--prompt", "hello " * 300, "--no-chat")
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: the prompt is") and "context of 256" in last


def test_sampling_is_reproducible_from_its_seed(cli, tiny_llama):
    def sample(seed):
        code, out, err = cli("generate", "--model", tiny_llama, "--prompt", "hello", "--max-new-tokens", "12",
                             "--temperature", "1", "--seed", str(seed), "--no-chat")
        assert code == 0, err
        return out

    first = sample(1)
    assert first == sample(1) and first != sample(2)


def test_top_k_chooses_from_the_k_likeliest(cli, tiny_llama):
    """Sampling used transformers' top-k of 50 with no way to say otherwise; --top-k 1 is greedy decoding."""
    common = ("generate", "--model", tiny_llama, "--prompt", "hello", "--max-new-tokens", "12", "--no-chat")
    code, greedy, err = cli(*common)
    assert code == 0, err
    for seed in ("1", "2"):
        code, out, err = cli(*common, "--temperature", "2", "--top-k", "1", "--seed", seed)
        assert code == 0 and out == greedy, err
    code, _, err = cli(*common, "--top-k", "5")
    assert code == 1 and "--top-k is for sampling, and --temperature 0 decodes greedily" in err
    code, _, err = cli(*common, "--seed", "3", "--top-k", "5")  # a seed alone would be as silently unused
    assert code == 1 and "--top-k and --seed are for sampling, and --temperature 0" in err
    code, _, err = cli(*common, "--temperature", "1", "--top-k", "-1")
    assert code == 1 and "--top-k must be >= 0" in err
    code, _, err = cli("generate", "--model", tiny_llama, "--prompt", " ")
    assert code == 1 and "--prompt is empty" in err


def test_sizes_read_in_the_unit_that_fits():
    from lora_cli.display import size_text

    assert [size_text(n) for n in (0, 1023, 1024, 38_400, 3_722_445, 5 * 2**30 // 4)] == \
        ["0 bytes", "1023 bytes", "1.0 KiB", "37.5 KiB", "3.55 MiB", "1.25 GiB"]


def test_the_printed_next_commands_paste_as_they_are(cli, tiny_llama, chat_data, tmp_path):
    """Shell-quoted, one line each (the table wrapped them inside a quoted path)."""
    import shlex

    run = tmp_path / "my runs" / "it's a run with a long name"
    code, out, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--max-steps", "1", "--output", run)
    assert code == 0, err
    lines = (out + err).splitlines()
    merge = next(line for line in lines if line.startswith("lora merge "))
    assert shlex.split(merge) == ["lora", "merge", str(run), "--output", f"{run}-merged"]


def test_a_model_with_its_own_code_trains_merges_verifies_and_generates(cli, tiny_llama, chat_data, tmp_path,
                                                                         monkeypatch):
    """merge --verify said 'pass --trust-remote-code', a flag merge did not have; the printed generate command
    left it out, so it failed as pasted; merge asked on the terminal whether to run the code (transformers'
    prompt, when trust_remote_code is left unset), and a tokenizer or model load printed transformers' notice
    that its type is unknown before the error."""
    import shlex
    import shutil

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = tmp_path / "custom"
    shutil.copytree(tiny_llama, model)
    (model / "modeling_custom.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'customllama'\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="customllama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    run, merged = tmp_path / "run", tmp_path / "merged"
    code, out, err = cli("train", "--model", model, "--data", chat_data, "--output", run, "--max-steps", "2",
                         "--lr", "1e-2", "--trust-remote-code")
    assert code == 0, err
    printed = next(line for line in (out + err).splitlines() if line.startswith("lora generate "))
    assert shlex.split(printed)[-1] == "--trust-remote-code"
    code, out, err = cli("merge", run, "--output", tmp_path / "unverified")  # reads the files, runs no code
    assert code == 0 and out == "" and "instantiate a model of type" not in err, out + err
    code, _, err = cli("merge", run, "--output", merged, "--verify")
    assert code == 1 and not merged.exists()
    assert err.splitlines() == [f"error: '{model}' needs its own Python code: pass --trust-remote-code if you trust it"]
    code, _, err = cli("merge", run, "--output", merged, "--verify", "--trust-remote-code")
    assert code == 0 and "verify: max |logits(merged)" in err, err
    assert (merged / "modeling_custom.py").is_file()  # the merged model keeps the code it needs
    code, out, err = cli("generate", "--model", merged, "--prompt", "hi", "--max-new-tokens", "3",
                         "--trust-remote-code")
    assert code == 0, err


def test_merge_of_a_run_on_a_pickled_hub_base(cli, tiny_llama, chat_data, tmp_path, monkeypatch):
    """A Hub id whose weights are pytorch_model.bin only: train and generate take it with --allow-pickle, and
    the merge the run printed said 'pass --allow-pickle' with the flag given (its download left *.bin out).
    The download is stood in for: what snapshot_download returns for the patterns asked."""
    import fnmatch
    import shutil

    import huggingface_hub

    monkeypatch.setenv("LORA_CACHE", str(tmp_path / "cache"))
    pickled = tmp_path / "hub" / "snapshot"
    shutil.copytree(tiny_llama, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    asked = []

    def snapshot_download(repo_id, allow_patterns=(), **kw):
        asked.append(allow_patterns)
        got = tmp_path / "hub" / f"got-{len(asked)}"  # the files the patterns take, as the cache would hold them
        got.mkdir()
        for f in pickled.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, got / f.name)
        return str(got)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    run = tmp_path / "run"
    assert cli("train", "--model", pickled, "--data", chat_data, "--output", run, "--max-steps", "1",
               "--allow-pickle")[0] == 0
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/pickled"}))
    code, _, err = cli("merge", run, "--output", tmp_path / "m")
    assert code == 1 and "has no safetensors weights" in err
    assert not any("*.bin" in a for a in asked)  # (not even downloaded without the flag)
    code, _, err = cli("merge", run, "--output", tmp_path / "m", "--allow-pickle")
    assert code == 0, err
    assert "*.bin" in asked[-1] and list((tmp_path / "m").glob("model*.safetensors"))


def test_merge_of_a_run_on_a_pickled_base(cli, tiny_llama, chat_data, tmp_path, monkeypatch):
    """train and generate take a .bin base with --allow-pickle; merge offered the flag and then said 'no
    safetensors weights'. It now converts the pickles once (cached) and merges as from safetensors."""
    import shutil

    monkeypatch.setenv("LORA_CACHE", str(tmp_path / "cache"))
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    run = tmp_path / "run"
    code, out, err = cli("train", "--model", pickled, "--data", chat_data, "--output", run, "--max-steps", "2",
                         "--allow-pickle", "--lr", "1e-2")
    assert code == 0 and f"lora merge {run} --output {run}-merged --allow-pickle" in out + err  # as printed, it runs
    code, _, err = cli("export", run, "--format", "gguf", "--output", tmp_path / "a.gguf")  # reads config.json only
    assert code == 0, err
    code, _, err = cli("merge", run, "--output", tmp_path / "m")
    assert code == 1 and "--allow-pickle" in err and not (tmp_path / "m").exists()
    (tmp_path / "afile").write_text("")  # a cache that cannot be written is said before converting, with the way out
    monkeypatch.setenv("LORA_CACHE", str(tmp_path / "afile" / "cache"))
    code, _, err = cli("merge", run, "--output", tmp_path / "m", "--allow-pickle")
    assert code == 1 and f"cannot write the cache {tmp_path / 'afile' / 'cache' / 'pickled'}" in " ".join(err.split())
    assert "set LORA_CACHE to a writable folder" in " ".join(err.split()), err
    monkeypatch.setenv("LORA_CACHE", str(tmp_path / "cache"))
    code, _, err = cli("merge", run, "--output", tmp_path / "m", "--allow-pickle", "--verify")
    assert code == 0 and "): ok" in err, err
    assert cli("merge", run, "--output", tmp_path / "ref", "--base", tiny_llama)[0] == 0
    merged, ref = (AutoModelForCausalLM.from_pretrained(tmp_path / d).eval() for d in ("m", "ref"))
    assert torch.equal(logits(merged), logits(ref))
    assert not list((tmp_path / "m").glob("*.bin")) and not (tmp_path / "m" / "lora_cli_pickled.json").exists()


def test_lora_on_a_head_tied_to_the_embeddings(cli, chat_data, tmp_path):
    """PEFT puts LoRA on a tied lm_head (a branch beside the shared weight); lora refused to train or load it and
    merge sent the user to `lora generate`, which refused it too. Now: trained, loaded as PEFT loads it, and
    merged with the head untied (merging into the shared tensor would change the embeddings too)."""
    from lora_cli.lora.inject import merge_lora

    base_dir = save_tiny(tmp_path / "base", "llama-tied")
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", base_dir, "--data", chat_data, "--output", run, "--targets", "q_proj,lm_head",
                       "--max-steps", "3", "--lr", "5e-2", "--dropout", "0")
    assert code == 0, err
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run).eval()
    ours = AutoModelForCausalLM.from_pretrained(base_dir)
    load_adapter(ours, run)
    want = logits(theirs)
    assert rel_diff(logits(ours.eval()), want) < 1e-5
    assert rel_diff(want, logits(AutoModelForCausalLM.from_pretrained(base_dir).eval())) > 1e-4  # the head learned
    embeddings = ours.get_input_embeddings().weight.detach().clone()
    merge_lora(ours)  # in memory: the embeddings are left as they were
    assert torch.equal(ours.get_input_embeddings().weight, embeddings) and rel_diff(logits(ours), want) < 1e-5
    code, _, err = cli("merge", run, "--output", tmp_path / "m", "--verify")
    assert code == 0 and "): ok" in err, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    assert rel_diff(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()), want) < 1e-5
    code, _, err = cli("generate", "--model", base_dir, "--adapter", run, "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0, err
    # a checkpoint that stores the head beside the embeddings (torch.save of a state dict, some converters): merge
    # refused it ("cannot merge … does not update them all"); transformers ties equal copies and keeps unequal ones
    stored = load_file(str(base_dir / "model.safetensors"))
    for name, head in (("copy", stored["model.embed_tokens.weight"]), ("own", stored["model.embed_tokens.weight"] + 0.5)):
        both = tmp_path / name
        shutil.copytree(base_dir, both)
        save_file({**stored, "lm_head.weight": head.clone()}, str(both / "model.safetensors"), metadata={"format": "pt"})
        want = logits(peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(both), run).eval())
        code, _, err = cli("merge", run, "--base", both, "--output", tmp_path / f"m_{name}", "--verify")
        assert code == 0 and "): ok" in err, err
        merged = load_file(str(tmp_path / f"m_{name}" / "model.safetensors"))
        assert torch.equal(merged["model.embed_tokens.weight"], stored["model.embed_tokens.weight"])
        assert rel_diff(logits(AutoModelForCausalLM.from_pretrained(tmp_path / f"m_{name}").eval()), want) < 1e-5


def test_conv1d_and_linear_targets_in_one_adapter(cli, tiny_gpt2, tmp_path):
    """GPT-2's attention is Conv1D (weights stored (in, out)), its lm_head Linear: one fan_in_fan_out flag
    cannot say both. lora's own run failed to merge (internal error) and to load; PEFT's (which writes the flag
    of the last module it wrapped) was refused as not fitting. The layout is now each module's, as in PEFT."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello number {i}"}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_gpt2, "--data", data, "--output", run, "--targets", "c_attn,lm_head",
               "--max-steps", "3", "--lr", "5e-2", "--dropout", "0")[0] == 0
    torch.manual_seed(0)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2), peft.LoraConfig(
        r=2, target_modules=["c_attn", "lm_head"], init_lora_weights=False)).save_pretrained(tmp_path / "theirs")
    for adapter in (run, tmp_path / "theirs"):
        want = logits(peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), adapter).eval())
        ours = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
        load_adapter(ours, adapter)
        assert rel_diff(logits(ours.eval()), want) < 1e-5
        merged = tmp_path / f"{adapter.name}-merged"
        code, _, err = cli("merge", adapter, "--output", merged, "--base", tiny_gpt2, "--verify")
        assert code == 0 and "): ok" in err, err
        assert rel_diff(logits(AutoModelForCausalLM.from_pretrained(merged).eval()), want) < 1e-5


def test_the_model_card_names_a_cached_base_by_its_hub_id(tmp_path):
    """A base given as its folder in the Hugging Face cache is loaded elsewhere by its Hub id."""
    from lora_cli.exporting import hub_id_of

    for repo, folder in (("HuggingFaceTB/SmolLM2-135M", "models--HuggingFaceTB--SmolLM2-135M"), ("gpt2", "models--gpt2")):
        snapshot = tmp_path / "hub" / folder / "snapshots" / "0123abc"
        snapshot.mkdir(parents=True)
        assert hub_id_of(str(snapshot)) == hub_id_of(f"{snapshot}/") == repo
    assert hub_id_of(str(tmp_path)) == "BASE_MODEL"  # another local folder
    assert hub_id_of("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    snapshot.rmdir()  # the cache was cleaned since: still its Hub id
    assert hub_id_of(str(snapshot)) == "gpt2"
    for gone in (tmp_path / "gone", "./gone", "~/models/gone", "runs/a/b", "../gone", "m.gguf"):
        assert hub_id_of(str(gone)) == "BASE_MODEL"  # paths, not Hub ids: not printed as one


def test_the_model_card_metadata_names_only_a_hub_base(tmp_path):
    """base_model: held the local path, which the Hub refuses as a model card's metadata."""
    from lora_cli.exporting import model_card

    facts = dict(r=8, lora_alpha=16, scaling=2.0, use_rslora=False, use_dora=False, modules={"q_proj": 2},
                 trainable_params=100, ranks={}, rank_pattern={}, alpha_pattern={}, base_is_gguf=False)
    for base, meta in (("Qwen/Qwen2.5-0.5B", "base_model: Qwen/Qwen2.5-0.5B\n"), (str(tmp_path), "")):
        card = model_card(dict(facts, base_model_name_or_path=base), tmp_path, torch.float32)
        assert card.startswith(f"---\nlibrary_name: peft\n{meta}tags:")
    gguf = str(tmp_path / "SmolLM2.Q4.gguf")
    card = model_card(dict(facts, base_model_name_or_path=gguf, base_is_gguf=True), tmp_path, torch.float32)
    assert "vllm serve BASE_MODEL" in card and "`BASE_MODEL` here is the Hub model the GGUF file" in card


def test_an_answer_cut_inside_a_character_ends_before_it(tiny_llama, capsys):
    """The length limit can stop between the byte tokens of one character: the answer (streamed and --json)
    ended with U+FFFD, which the model never wrote."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_cli.generation import answer_streamer, generate

    tok, model = AutoTokenizer.from_pretrained(tiny_llama), AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = tok("hello", return_tensors="pt").input_ids
    new = tok("ok é", add_special_tokens=False).input_ids
    assert tok.decode(new) == "ok é" and tok.convert_ids_to_tokens(new)[-2:] == ["Ã", "©"]  # é's 2 bytes
    cut = new[:-1]  # without its last byte
    assert tok.decode(cut).endswith("\ufffd")
    model.generate = lambda input_ids, streamer=None, **kw: _streamed(streamer, input_ids, torch.tensor([cut]))
    assert generate(model, tok, ids, max_new_tokens=len(cut)) == "ok "
    capsys.readouterr()
    generate(model, tok, ids, max_new_tokens=len(cut), streamer=answer_streamer(tok))
    assert capsys.readouterr().out == "ok \n"


def _streamed(streamer, prompt, new):
    if streamer is not None:
        streamer.put(prompt)
        for t in new[0]:
            streamer.put(t.view(1))
        streamer.end()
    return torch.cat([prompt, new], dim=1)


@pytest.mark.parametrize("arch,config,unsupported", [
    ("qwen2_moe", dict(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]),
     'target_parameters=["mlp.experts.gate_up_proj"]'),  # was: "PEFT ignores them; add them to target_modules"
    ("llama-tied", dict(target_modules=["q_proj", "lm_head"], ensure_weight_tying=True),
     "LoRA on embedding layers (model.embed_tokens)"),  # was: "holds LoRA weights for lm_head … PEFT ignores them"
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[0]), None),
])
def test_inspect_names_the_feature_not_a_damaged_file(cli, tmp_path, arch, config, unsupported):
    """Adapters whose tensors a feature lora refuses lays out its own way were reported by inspect as damaged
    or as holding weights PEFT ignores, with advice that would not work; merge named the feature."""
    base_dir = save_tiny(tmp_path / "base", arch)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                 peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    theirs.save_pretrained(tmp_path / "adapter")
    code, out, err = cli("inspect", tmp_path / "adapter", "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts.get("unsupported", [None])[0] == unsupported
    code, _, err = cli("merge", tmp_path / "adapter", "--output", tmp_path / "m")
    assert (code == 1) == (unsupported is not None), err
    if unsupported:
        assert unsupported.split(" (")[0].split("=")[0] in err, err


def test_a_template_in_the_adapters_tokenizer_config_is_the_one_used(cli, tmp_path):
    """Hub adapters saved with transformers before 4.43 keep their chat template in tokenizer_config.json (or
    chat_template.json); generate prompted with the base's instead and merge wrote the base's."""
    from lora_cli.generation import chat_template_for

    base_dir = save_tiny(tmp_path / "base", "llama")
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[a]{% endif %}"
    for name, content in (("tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": own}),
                          ("chat_template.json", {"chat_template": [{"name": "default", "template": own},
                                                                    {"name": "tool_use", "template": "x"}]})):
        adapter = tmp_path / name
        theirs.save_pretrained(adapter)
        (adapter / name).write_text(json.dumps(content))
        tok = AutoTokenizer.from_pretrained(base_dir)
        assert tok.chat_template != own and chat_template_for(tok, [str(adapter)]) == own
        code, _, err = cli("merge", adapter, "--output", tmp_path / f"m-{name}")
        assert code == 0, err
        assert AutoTokenizer.from_pretrained(tmp_path / f"m-{name}").chat_template == own
    (tmp_path / "tokenizer_config.json" / "tokenizer_config.json").write_text("{broken")
    code, _, err = cli("merge", tmp_path / "tokenizer_config.json", "--output", tmp_path / "m3")
    assert code == 1 and "tokenizer_config.json: not valid JSON" in err


def test_inspect_names_modules_apart_where_one_last_name_has_two_parents(cli, tmp_path):
    """GPT-2's attention and MLP both have a c_proj: inspect counted them as one 'c_proj ×4' (RWKV's
    attention.key and feed_forward.key as 'key'); CTRL's nn.Sequential layers showed as '0' and '2'."""
    from collections import Counter

    from lora_cli.inspection import short_names

    base_dir = save_tiny(tmp_path / "base", "gpt2")
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                 peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    theirs.save_pretrained(tmp_path / "adapter")
    code, out, err = cli("inspect", tmp_path / "adapter", "--json")
    assert code == 0, err
    assert json.loads(out)["modules"] == {"attn.c_proj": 2, "c_attn": 2, "mlp.c_proj": 2}
    assert short_names(Counter(["h.0.ffn.0", "h.0.ffn.2", "h.1.ffn.2"])) == {"ffn.0": 1, "ffn.2": 2}
    # an attention-only GPT-2 adapter as lora writes it (target attn.c_proj): it showed a bare c_proj
    paths = Counter([f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")])
    assert short_names(paths, ["attn.c_proj", "c_attn"]) == {"attn.c_proj": 2, "c_attn": 2}


def test_messages_into_a_file_stay_on_one_line(tiny_llama, chat_data, tmp_path):
    """Into a pipe or a file, rich broke every message at 80 columns (a log's 'wrote …' or 'note: …' did not
    grep whole); a terminal still wraps at its width."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # (a library here sets them)
    out = tmp_path / ("a-folder-name-long-enough-to-push-the-line-past-eighty-columns" * 2)
    run = subprocess.run([sys.executable, "-m", "lora_cli", "train", "--model", tiny_llama, "--data", chat_data,
                          "--output", out, "--max-steps", "1"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "note: max length 1024 → 256, the model's context" in run.stderr
    assert f"lora merge {out} --output {out}-merged" in run.stderr.splitlines()
    assert f"output      {out}" in run.stderr  # tables too: they cut a long path with '…' at 80 columns
    run = subprocess.run([sys.executable, "-m", "lora_cli", "export", out, "--output", tmp_path / "x"],
                         capture_output=True, text=True, env=env)
    wrote = [line for line in run.stderr.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and len(wrote[0]) > 80 and "% of the base model files' " in wrote[0], run.stderr


def test_generate_prints_prompts_and_names_as_given(cli, tiny_llama, chat_data, tmp_path, monkeypatch):
    """Square brackets were rich markup: a prompt holding '[/]' was an internal error, and a run folder named
    '[x]' printed as '' (train's table too); an adapter folder named 'base' took the base model's label, and
    --compare kept one of the two answers; a --prompt in another encoding was an internal error."""
    import shutil

    run = tmp_path / "[x]"
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "1")
    assert code == 0 and f"adapter      {run}/adapter_model.safetensors" in err, err
    code, _, err = cli("generate", "-m", tiny_llama, "--adapter", run, "-p", "is [/] [bold]x?", "--max-new-tokens", "2")
    assert code == 0 and f"{run} (loaded in " in err and " ▸ is [/] [bold]x?" in err, err
    shutil.copytree(run, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("generate", "-m", tiny_llama, "--adapter", "base", "-p", "hi", "--max-new-tokens", "2",
                         "--compare", "--json")
    assert code == 0 and [json.loads(line)["model"] for line in out.splitlines()] == ["(base)", "base"], err
    shutil.copytree(run, tmp_path / "(base)")
    code, out, err = cli("generate", "-m", tiny_llama, "--adapter", "base", "--adapter", "(base)", "-p", "hi",
                         "--max-new-tokens", "2", "--compare", "--json")
    assert code == 0 and [json.loads(line)["model"] for line in out.splitlines()] == ["((base))", "base", "(base)"]
    for flag, rest in (("--prompt", []), ("--system", ["-p", "hi"])):
        code, _, err = cli("generate", "-m", tiny_llama, flag, "caf\udce9", *rest)  # (argv's bytes caf\xe9)
        assert code == 1 and err == f"error: {flag} is not UTF-8 text (bytes in another encoding?); give it as UTF-8\n"


def test_generation_stops_at_the_templates_end_of_turn(cli, tiny_llama, chat_data, tmp_path):
    """A model whose EOS is <|endoftext|> while its turns end with <|im_end|> (Llama 3's first upload: EOS
    <|end_of_text|>, turns ending <|eot_id|>): training learns to end an answer with the end of turn, which
    generate did not stop at ('Paris.is.Paris.'), nor did the merged model's generation config."""
    import shutil

    from tiny import CHATML
    from transformers import AutoTokenizer

    from lora_cli.generation import stop_ids, turn_end_ids

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(base)
    eos, end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((base / name).read_text())
        (base / name).write_text(json.dumps(config | {"eos_token_id": eos}))
    model = AutoModelForCausalLM.from_pretrained(base)
    assert turn_end_ids(tok, CHATML) == [end] and stop_ids(model, tok, CHATML) == sorted({eos, end})
    assert stop_ids(model, tok) == [eos]  # raw text: EOS alone
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"  # a turn ends in text
    assert turn_end_ids(tok, plain) == [] and turn_end_ids(tok, "{{ raise_exception('no') }}") == []
    run = tmp_path / "run"
    assert cli("train", "--model", base, "--data", chat_data, "--output", run, "--max-steps", "1")[0] == 0
    code, _, err = cli("merge", run, "--output", tmp_path / "merged")
    assert code == 0, err
    assert json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"] == [eos, end]


def hub_with_two_revisions(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A Hub cache holding org/tiny at two revisions, main and v1 (other weights): their snapshot folders."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny"
    main, v1 = repo / "snapshots" / ("a" * 40), repo / "snapshots" / ("b" * 40)
    save_tiny(main, "llama")
    other = AutoModelForCausalLM.from_pretrained(main)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.2)
    other.save_pretrained(v1)
    shutil.copy(main / "tokenizer.json", v1)
    shutil.copy(main / "tokenizer_config.json", v1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v1").write_text("b" * 40)
    return main, v1


def test_merge_loads_the_base_at_the_revision_the_adapter_names(cli, tmp_path, monkeypatch):
    """PEFT records the base's revision in adapter_config.json (its auto-loader loads that one): merge took the
    default branch, another model, and export dropped the key."""
    _, v1 = hub_with_two_revisions(tmp_path, monkeypatch)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(v1), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": "org/tiny", "revision": "v1"}))
    assert cli("merge", tmp_path / "adapter", "--output", tmp_path / "m")[0] == 0
    ids = torch.tensor([[5, 17, 33, 60, 91, 7, 12]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits
    assert torch.allclose(merged, theirs.eval()(ids).logits, atol=1e-4)
    assert cli("export", tmp_path / "adapter", "--output", tmp_path / "x")[0] == 0
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["revision"] == "v1"
    code, out, _ = cli("inspect", tmp_path / "adapter")
    assert code == 0 and "org/tiny at revision v1" in out


def test_train_and_generate_take_a_revision_of_a_hub_model(cli, tmp_path, monkeypatch, chat_data):
    """--revision loads that version of a Hub model (there was no way to train on one), the adapter records it as
    PEFT does, and merge then bakes it into that version; a local model has no revisions."""
    main, v1 = hub_with_two_revisions(tmp_path, monkeypatch)
    common = ("--data", chat_data, "--max-steps", "1", "--rank", "4")
    first_loss, said = {}, {}
    for name, model in (("v1", ["org/tiny", "--revision", "v1"]), ("v1_dir", [v1]), ("main", ["org/tiny"])):
        code, _, said[name] = cli("train", "--model", *model, *common, "--output", tmp_path / name)
        assert code == 0, said[name]
        first_loss[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first_loss["v1"] == first_loss["v1_dir"] != first_loss["main"]
    config = json.loads((tmp_path / "v1" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny" and config["revision"] == "v1"
    assert "revision" not in json.loads((tmp_path / "main" / "adapter_config.json").read_text())
    assert "org/tiny at revision v1 (LlamaForCausalLM)" in said["v1"]
    assert "lora generate --model org/tiny --revision v1 --adapter" in said["v1"]
    ids = torch.tensor([[5, 17, 33, 60, 91, 7, 12]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(v1), tmp_path / "v1").eval()
    assert cli("export", tmp_path / "v1", "--output", tmp_path / "card")[0] == 0  # its card loads that base too
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny", revision="v1")' in (tmp_path / "card" / "README.md").read_text()
    # --verify compared with the default branch (a 14 logit "bug in lora merge"); --base org/tiny merged onto it
    for name, extra in (("m", ["--verify"]), ("m_base", ["--base", "org/tiny"])):
        code, _, err = cli("merge", tmp_path / "v1", "--output", tmp_path / name, *extra)
        assert code == 0, err
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / name)(ids).logits, theirs(ids).logits,
                              atol=1e-4)
    answers = {}
    for name, model in (("v1", ["org/tiny", "--revision", "v1"]), ("v1_dir", [v1]), ("main", ["org/tiny"])):
        code, out, err = cli("generate", "--model", *model, "--prompt", "hi", "--max-new-tokens", "8", "--json")
        assert code == 0, err
        answers[name] = json.loads(out)["answer"]
    assert answers["v1"] == answers["v1_dir"] != answers["main"]
    code, _, err = cli("generate", "--model", "org/tiny", "--adapter", tmp_path / "v1", "--prompt", "hi",
                       "--max-new-tokens", "2")
    assert code == 0 and "was trained on revision 'v1' of org/tiny, loaded here at its default branch" in err
    code, _, err = cli("generate", "--model", "org/tiny", "--revision", "b" * 40, "--adapter", tmp_path / "v1",
                       "--prompt", "hi", "--max-new-tokens", "2")  # v1's commit, by its hash: the same model
    assert code == 0 and "trained on revision" not in err, err
    code, _, err = cli("train", "--model", main, "--revision", "v1", *common, "--output", tmp_path / "x")
    assert code == 1 and "--revision v1 picks a version of a Hub model" in err and "a local directory" in err
    assert not (tmp_path / "x").exists()
    code, _, err = cli("generate", "--model", "org/tiny", "--revision", "v2", "--prompt", "hi")
    assert code == 1 and "'org/tiny' at revision 'v2'" in err and "no such revision" in err


def test_an_adapter_in_transformers_4s_multimodal_layout_is_named_so():
    """PEFT maps adapters of Gemma 3 / Llava-style models saved under transformers 4 (language_model.model.…) onto
    transformers 5's names; lora does not, and said only 'was it trained on another model?'."""
    from lora_cli.errors import UserError
    from lora_cli.merging import match_weights

    with pytest.raises(UserError, match=r"or it was saved under transformers 4, which named this model's modules "
                                        r"otherwise \(language_model\.model\.… is now model\.language_model\.…\)"):
        match_weights(["language_model.model.layers.0.self_attn.q_proj"],
                      {"model.language_model.layers.0.self_attn.q_proj.weight": [8, 8]})
