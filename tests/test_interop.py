"""Portable exports, llama.cpp (GGUF) adapters, and switching adapters on one base."""

from __future__ import annotations

import json

import gguf
import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny
from transformers import AutoModelForCausalLM

from lora_cli.algebra import read_factors
from lora_cli.exporting import llama_permute
from lora_cli.lora.adapter import load_adapter

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]])


@pytest.fixture(scope="module")
def rs_run(tmp_path_factory, tiny_llama, chat_data):
    """A run with rsLoRA and alpha ≠ 2r: scalings a server assuming alpha / r would get wrong."""
    from lora_cli.cli import main

    run = tmp_path_factory.mktemp("runs") / "rs"
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(tiny_llama), "--data", str(chat_data), "--output", str(run), "--rank", "4",
              "--alpha", "3", "--rslora", "--max-steps", "3", "--lr", "1e-2", "--dropout", "0"])
    assert e.value.code == 0
    return run


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_portable_export_gives_identical_logits(cli, rs_run, tiny_llama, tmp_path):
    code, _, err = cli("export", rs_run, "--portable", "--dtype", "float32", "--output", tmp_path / "p")
    assert code == 0, err
    cfg = json.loads((tmp_path / "p/adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and not cfg["use_rslora"] and not cfg["rank_pattern"]
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "p")
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama)
    load_adapter(ours, rs_run)
    assert (logits(theirs) - logits(ours)).abs().max() < 1e-5
    # rank 4 → vLLM's smallest slot that holds it: its --max-lora-rank takes 8, 16, 32… only (4 was refused)
    assert "vllm serve BASE_MODEL --enable-lora --lora-modules my-adapter=path/to/this/folder --max-lora-rank 8" \
        in (tmp_path / "p/README.md").read_text()
    # the plain export's card says vLLM would scale it wrongly, and how to serve it (it gave the vLLM line as is)
    assert cli("export", rs_run, "--output", tmp_path / "plain")[0] == 0
    card = (tmp_path / "plain/README.md").read_text()
    assert "this one (rsLoRA) would be scaled wrongly" in card and \
        "lora export path/to/this/folder --portable --output portable" in card and "my-adapter=portable" in card


def test_portable_export_pads_mixed_ranks(cli, tiny_llama, tmp_path):
    torch.manual_seed(0)
    m = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={"v_proj": 7}, init_lora_weights=False))
    m.save_pretrained(tmp_path / "a")
    assert cli("export", tmp_path / "a", "--portable", "--dtype", "float32", "--output", tmp_path / "p")[0] == 0
    cfg = json.loads((tmp_path / "p/adapter_config.json").read_text())
    assert cfg["r"] == 4 and not cfg["alpha_pattern"]
    assert {f.a.shape[0] for f in read_factors(tmp_path / "p")[1].values()} == {4}
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "p")
    assert (logits(theirs) - logits(m)).abs().max() < 1e-5


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "qkv_proj": "attn_qkv"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_gguf_export_reads_back(cli, tmp_path, chat_data, arch):
    base = save_tiny(tmp_path / "base", arch)
    run = tmp_path / "run"
    assert cli("train", "--model", base, "--data", chat_data, "--output", run, "--max-steps", "2", "--rslora",
               "--lr", "1e-2")[0] == 0
    code, _, err = cli("export", run, "--format", "gguf", "--dtype", "float32", "--output", tmp_path / "a.gguf")
    assert code == 0, err
    r = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert bytes(r.get_field("general.type").parts[-1]).decode() == "adapter"
    assert bytes(r.get_field("adapter.type").parts[-1]).decode() == "lora"
    alpha = float(r.get_field("adapter.lora.alpha").parts[-1][0])
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in r.tensors}
    _, factors = read_factors(run)  # scaling folded into B
    assert alpha == 16  # = r: one global alpha / r = 1, the folded scaling is exact
    n_head, n_kv = 4, 2  # tiny configs: 4 attention heads, 2 key/value heads
    projections = ["qkv_proj", "o_proj"] if arch == "phi3" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert len(tensors) == 2 * 2 * len(projections)
    for layer in range(2):
        for proj in projections:
            short = GGUF_NAMES[proj]
            f = factors[f"model.layers.{layer}.self_attn.{proj}"]
            a, b = tensors[f"blk.{layer}.{short}.weight.lora_a"], tensors[f"blk.{layer}.{short}.weight.lora_b"]
            assert tuple(a.shape) == tuple(f.a.shape) and tuple(b.shape) == tuple(f.b.shape)
            assert torch.allclose(a, f.a)
            if arch == "llama" and proj in ("q_proj", "k_proj"):
                heads = n_head if proj == "q_proj" else n_kv
                assert not torch.allclose(b, f.b)  # permuted rows
                assert torch.allclose(b, llama_permute(f.b, heads))
                undone = b.reshape(heads, b.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(b.shape)
                assert torch.allclose(undone, f.b)
            else:
                assert torch.allclose(b, f.b)
    code, out, err = cli("inspect", tmp_path / "a.gguf", "--json")  # what it holds, read back as lora reads PEFT's
    assert code == 0, err
    facts, ours = json.loads(out), json.loads(cli("inspect", run, "--json")[1])
    assert (facts["r"], facts["lora_alpha"], facts["scaling"], facts["dtype"]) == (16, 16.0, 1.0, "float32")
    assert facts["modules"] == {GGUF_NAMES[p]: 2 for p in projections}
    assert facts["trainable_params"] == ours["trainable_params"] == sum(t.numel() for t in tensors.values())
    if arch == "llama":  # bfloat16, as llama.cpp's converter writes it (--outtype bf16): was refused
        code, _, err = cli("export", run, "--format", "gguf", "--dtype", "bf16", "--output", tmp_path / "b.gguf")
        assert code == 0, err
        halves = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors}
        assert {t.tensor_type.name for t in halves.values()} == {"BF16"}
        for name, t in halves.items():
            back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            assert torch.equal(back, tensors[name].to(torch.bfloat16).float()), name
        code, out, _ = cli("inspect", tmp_path / "b.gguf", "--json")
        assert code == 0 and (json.loads(out)["dtype"], json.loads(out)["r"]) == ("bfloat16", 16)
    code, _, err = cli("merge", tmp_path / "a.gguf", "--output", tmp_path / "m")
    assert code == 1 and "is a GGUF file, which llama.cpp loads (lora inspect describes it)" in " ".join(err.split())
    for command in (["generate", "--prompt", "hi"], ["train", "--data", chat_data, "--output", tmp_path / "r"]):
        code, _, err = cli(*command, "--model", tmp_path / "a.gguf")  # (was a tokenizer error after a warning)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert "a.gguf' is a LoRA adapter (GGUF), not a model" in " ".join(err.split()), err


def test_inspect_of_a_gguf_export_shows_the_trained_ranks_and_the_folded_scaling(cli, tiny_llama, tmp_path):
    """One rank for every module pads lower ones with zeros: inspect counted the padding as ranks and trainable
    parameters, and showed alpha = r (scaling 1) without saying each module's scaling is folded into lora_b."""
    torch.manual_seed(0)
    m = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, init_lora_weights=False))
    m.save_pretrained(tmp_path / "a")
    assert cli("export", tmp_path / "a", "--format", "gguf", "--output", tmp_path / "a.gguf")[0] == 0
    facts = json.loads(cli("inspect", tmp_path / "a.gguf", "--json")[1])
    assert facts["r"] == 4 and facts["ranks"] == {"2": 2, "4": 2} and facts["scaling_folded"]
    assert facts["trainable_params"] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    code, out, _ = cli("inspect", tmp_path / "a.gguf")
    assert code == 0 and "each module's own scaling is folded into lora_b" in " ".join(out.split())
    assert not json.loads(cli("inspect", tmp_path / "a", "--json")[1]).get("scaling_folded")


def test_inspect_tells_a_gguf_model_and_a_damaged_gguf_from_an_adapter(cli, tmp_path):
    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, _, err = cli("inspect", model)
    assert code == 1 and "model.gguf is a GGUF model, not a LoRA adapter" in " ".join(err.split())
    model.write_bytes(model.read_bytes()[:40])
    code, _, err = cli("inspect", model)
    assert code == 1 and "a damaged or truncated GGUF file" in err and "Traceback" not in err
    for data, why in ((b"", ": it is empty"), (b"<html>", " (it does not start with GGUF)")):  # not "not a directory"
        model.write_bytes(data)
        code, _, err = cli("inspect", model)
        assert code == 1 and f"is not a GGUF file{why}" in " ".join(err.split())


def test_gguf_export_force_replaces_only_a_gguf_and_never_what_it_reads(cli, rs_run, tiny_llama, tmp_path):
    """--force overwrote any file: notes, the base's weights, the adapter being read."""
    import shutil

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    run = tmp_path / "run"
    shutil.copytree(rs_run, run)
    for target in (notes, run / "adapter_model.safetensors", tiny_llama / "model.safetensors"):
        before = target.read_bytes()
        code, _, err = cli("export", run, "--format", "gguf", "--output", target, "--force")
        assert code == 1 and "is not a GGUF file; --force replaces only lora's own output" in err, err
        assert target.read_bytes() == before
    assert cli("export", run, "--format", "gguf", "--output", tmp_path / "a.gguf")[0] == 0
    code, _, err = cli("export", run, "--format", "gguf", "--output", tmp_path / "a.gguf", "--force")
    assert code == 0, err  # its own earlier output
    theirs = tmp_path / "theirs.gguf"  # another tool's GGUF (a model, say): lora's mark is not in it
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    writer = gguf.GGUFWriter(str(theirs), "llama")
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = theirs.read_bytes()
    code, _, err = cli("export", run, "--format", "gguf", "--output", tmp_path)  # (--force would not help)
    assert code == 1 and f"--output {tmp_path} is a folder; name the file to write" in " ".join(err.split()), err
    code, _, err = cli("export", run, "--format", "gguf", "--output", theirs, "--force")
    assert code == 1 and "is a GGUF file lora did not write" in err and theirs.read_bytes() == before, err
    base = tmp_path / "base.gguf"  # a GGUF base is never overwritten
    base.write_bytes(b"GGUF" + bytes(64))
    code, _, err = cli("export", run, "--format", "gguf", "--output", base, "--force", "--base", base)
    assert code == 1 and "which this command reads" in err and base.read_bytes() == b"GGUF" + bytes(64), err


def test_gguf_export_checks_the_adapter_fits_the_base(cli, rs_run, tmp_path):
    """export --format gguf --base wrote an adapter for a base of other shapes (llama.cpp fails only on load)."""
    from tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.hidden_size, config.head_dim = 64, 16
    wider = tmp_path / "wider"
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    tiny_tokenizer().save_pretrained(wider)
    code, _, err = cli("export", rs_run, "--format", "gguf", "--output", tmp_path / "a.gguf", "--base", wider)
    assert code == 1 and "the adapter does not fit this base model: model.layers.0.self_attn.k_proj: base weight " \
        "[32, 64], adapter gives [16, 32]" in " ".join(err.split()), err
    assert not (tmp_path / "a.gguf").exists()


def test_gguf_export_refuses_lora_on_a_tied_head(cli, tmp_path, chat_data):
    """A tied base's GGUF has token_embd and no output tensor: llama.cpp would refuse `output.weight.lora_*`.
    The same head untied (its own weight) exports."""
    for arch in ("llama-tied", "llama"):
        base = save_tiny(tmp_path / arch, arch)
        run = tmp_path / f"run-{arch}"
        assert cli("train", "--model", base, "--data", chat_data, "--output", run, "--max-steps", "1",
                   "--targets", "q_proj,lm_head")[0] == 0
        code, _, err = cli("export", run, "--format", "gguf", "--output", tmp_path / f"{arch}.gguf")
        if arch == "llama-tied":
            assert code == 1 and "LoRA on lm_head, which this base ties to its embeddings" in " ".join(err.split())
            assert not (tmp_path / f"{arch}.gguf").exists()
        else:
            assert code == 0, err
            names = {t.name for t in gguf.GGUFReader(str(tmp_path / f"{arch}.gguf")).tensors}
            assert {"output.weight.lora_a", "blk.0.attn_q.weight.lora_a"} <= names


def test_gguf_export_refuses_unmapped_architectures(cli, tiny_gpt2, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello {i}"}) + "\n" for i in range(4)))
    assert cli("train", "--model", tiny_gpt2, "--data", data, "--output", tmp_path / "run", "--max-steps", "1")[0] == 0
    code, _, err = cli("export", tmp_path / "run", "--format", "gguf", "--output", tmp_path / "a.gguf")
    assert code == 1 and "supports" in err and "'gpt2'" in err and not (tmp_path / "a.gguf").exists()


def test_gguf_export_onto_another_architecture_warns_and_options_of_one_format_are_refused(cli, rs_run, tmp_path):
    """A llama adapter exported with --base QWEN2 became a qwen2 GGUF (its Q/K rows not permuted) without a word,
    where merge warns; --portable with --format gguf, and --base with a PEFT export, were ignored."""
    qwen2 = save_tiny(tmp_path / "qwen2", "qwen2")  # llama's module names and shapes
    code, _, err = cli("export", rs_run, "--format", "gguf", "--base", qwen2, "--output", tmp_path / "a.gguf")
    assert code == 0 and "warning: the adapter was trained on a llama model" in " ".join(err.split()), err
    assert "--base is a qwen2 model" in " ".join(err.split())
    for extra, said in ((["--format", "gguf", "--portable"], "--portable is for --format peft"),
                        (["--base", qwen2], "--base is for --format gguf"),
                        (["--portable", "--base", qwen2], "--base is for --format gguf")):
        code, _, err = cli("export", rs_run, *extra, "--output", tmp_path / "b")
        assert code == 1 and err.strip().splitlines()[-1].startswith(f"error: {said}"), err
        assert not (tmp_path / "b").exists()


def test_generate_switches_adapters_on_one_base(cli, rs_run, tiny_llama, tmp_path, chat_data):
    """Each adapter answers as it does alone, prompted with the chat template its run trained with (all were
    prompted with the first run's own template)."""
    other = tmp_path / "other"
    (tmp_path / "alt.jinja").write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                        "{% if add_generation_prompt %}### assistant:{% endif %}")
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", other, "--max-steps", "2",
               "--seed", "7", "--chat-template", tmp_path / "alt.jinja")[0] == 0
    alone = [cli("generate", "--model", tiny_llama, *a, "--prompt", "hello", "--max-new-tokens", "6")
             for a in ((), ("--adapter", rs_run), ("--adapter", other))]
    assert all(code == 0 for code, _, _ in alone)
    for first, second in ((rs_run, other), (other, rs_run)):
        code, out, err = cli("generate", "--model", tiny_llama, "--adapter", first, "--adapter", second,
                             "--prompt", "hello", "--max-new-tokens", "6", "--compare")
        assert code == 0, err
        assert f"{rs_run} (loaded in" in err and f"{other} (loaded in" in err and "answers" in err
        assert "note: the adapters were trained with different chat templates; each is prompted with its own, " \
               "the base with the tokenizer's" in " ".join(err.split())
        order = [alone[0], alone[1 if first == rs_run else 2], alone[2 if first == rs_run else 1]]
        assert out == "".join(o for _, o, _ in order)


def test_generate_checks_every_adapter_before_answering(cli, rs_run, tiny_llama, tiny_gpt2, tmp_path):
    """An adapter for another base second in the list failed after the first one had answered every prompt."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello {i}"}) + "\n" for i in range(4)))
    assert cli("train", "--model", tiny_gpt2, "--data", data, "--output", tmp_path / "g", "--max-steps", "1")[0] == 0
    code, out, err = cli("generate", "--model", tiny_llama, "--adapter", rs_run, "--adapter", tmp_path / "g",
                         "--prompt", "hello", "--max-new-tokens", "4")
    assert code == 1 and "does not fit this base model" in err and "▸" not in err, err
    code, _, err = cli("generate", "--model", tiny_llama, "--adapter", rs_run, "--adapter", f"{rs_run}/",
                       "--prompt", "hello")
    assert code == 1 and "is given twice" in err


@pytest.mark.parametrize("rank,line", [(1, "--max-lora-rank 8"), (16, "--max-lora-rank 16"), (17, "--max-lora-rank 32"),
                                       (300, "--max-lora-rank 320"), (600, "vLLM serves LoRA ranks up to 512")])
def test_the_model_card_gives_vllm_a_rank_it_accepts(rank, line):
    from lora_cli.exporting import _serving

    facts = {"use_dora": False, "modules_to_save": None, "ranks": {str(rank): 4}, "r": rank, "use_rslora": False,
             "rank_pattern": {}, "alpha_pattern": {}}
    assert line in _serving(facts, "BASE")


def test_a_changed_gguf_leaves_no_stale_conversion_in_the_cache(tmp_path, monkeypatch):
    """The cache is keyed by the file's path, size and mtime: each touch of a .gguf kept another full float32
    copy of the model (538 MB for SmolLM2). A new conversion removes the same path's older ones, and nothing
    else."""
    from lora_cli.models import evict_stale_conversions, gguf_cache_dir

    monkeypatch.setenv("LORA_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    old = gguf_cache_dir(model)
    other = old.parent / "m-0123456789abcdef"  # another m.gguf, elsewhere
    half = old.parent / "m-fedcba9876543210"  # a conversion being written: no record yet
    for d, source in ((old, model), (other, tmp_path / "elsewhere" / "m.gguf"), (half, None)):
        d.mkdir(parents=True)
        if source:
            (d / "lora_cli_gguf.json").write_text(json.dumps({"gguf": str(source.resolve()), "size": 4}))
    model.write_bytes(b"GGUF, changed")
    new = gguf_cache_dir(model)
    assert new != old
    new.mkdir()
    (new / "lora_cli_gguf.json").write_text(json.dumps({"gguf": str(model.resolve()), "size": 13}))
    assert evict_stale_conversions(model, new) == 1
    assert sorted(p.name for p in new.parent.iterdir()) == sorted([new.name, other.name, half.name])


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "phi"])  # (phi: a head with a bias, saved too)
def test_a_heads_base_weight_saved_by_peft_is_checked_and_kept(cli, tmp_path, arch):
    """With LoRA on lm_head PEFT saves the head's base weight beside it and loads it over the base's. It was
    dropped as a copy of the base's without a look: a head whose new tokens' rows were set before training gave
    another model through merge, generate and export. Equal to the base's, it merges as PEFT; else merge and
    generate refuse, and export keeps it, as stored."""
    base = save_tiny(tmp_path / "base", arch)
    ids = torch.tensor([[5, 17, 33, 60, 91, 7, 12]])

    def adapter(name, change_rows):
        torch.manual_seed(0)
        m = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    torch.nn.init.normal_(p, std=0.1)
            if change_rows:
                m.base_model.model.lm_head.base_layer.weight[100:128] = 0.5
        m.save_pretrained(tmp_path / name)
        return tmp_path / name, peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                                              tmp_path / name).eval()(ids).logits

    same, want = adapter("same", False)
    assert cli("merge", same, "--base", base, "--output", tmp_path / "m")[0] == 0
    code, out, _ = cli("inspect", same, "--json")  # the saved base weights are not trainable parameters
    lora = sum(p.numel() for k, p in load_file(str(same / "adapter_model.safetensors")).items() if "lora_" in k)
    assert code == 0 and json.loads(out)["trainable_params"] == lora
    assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits, want, atol=1e-4)
    changed, want = adapter("changed", True)
    for command in (("merge", changed, "--base", base, "--output", tmp_path / "m2"),
                    ("generate", "--model", base, "--adapter", changed, "--prompt", "hi")):
        code, _, err = cli(*command)
        assert code == 1 and f"{changed} holds lm_head.base_layer.weight, the weights it was trained on, and they " \
                              "are not the base's (max |Δ| " in err, err
    assert cli("export", changed, "--output", tmp_path / "x", "--dtype", "float32")[0] == 0
    exported = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "x").eval()
    assert torch.equal(exported(ids).logits, want)


def test_resize_and_combine_say_they_leave_a_heads_saved_base_weight_out(cli, tmp_path):
    """They dropped it without a word (a low-rank result cannot hold it)."""
    base = save_tiny(tmp_path / "base", "llama")
    m = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    m.save_pretrained(tmp_path / "a")
    for command in (("resize", tmp_path / "a", "--rank", "2", "--output", tmp_path / "r"),
                    ("combine", tmp_path / "a", tmp_path / "a", "--output", tmp_path / "c")):
        code, _, err = cli(*command)
        assert code == 0 and f"note: {tmp_path / 'a'} holds lm_head.base_layer.weight (the base weights PEFT saved " \
                              "beside a head's or embedding's LoRA), which the result leaves out" in " ".join(err.split())


def test_whole_embedding_matrices_saved_by_peft_are_named_as_such(cli, tmp_path):
    """save_embedding_layers=True (PEFT's automatic choice after a vocabulary resize) was refused as 'tensors that
    are not LoRA factors; LoRA on linear layers only', which pointed at the adapter's LoRA."""
    base = save_tiny(tmp_path / "base", "llama")
    m = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    m.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    code, _, err = cli("merge", tmp_path / "a", "--base", base, "--output", tmp_path / "m")
    assert code == 1 and "holds whole embedding or output-head matrices (lm_head.weight, model.embed_tokens.weight), " \
                         "as PEFT's save_embedding_layers saves them" in " ".join(err.split()), err
