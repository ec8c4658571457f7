"""combine / resize: exact against closed forms, loadable in PEFT."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from tiny import save_tiny
from transformers import AutoConfig, AutoModelForCausalLM

from lora_cli.algebra import read_factors
from lora_cli.lora.adapter import load_adapter


def peft_adapter(base, path, seed, **kw):
    torch.manual_seed(seed)
    m = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(init_lora_weights=False, **kw))
    m.save_pretrained(path)


def assert_peft_matches_ours(base, adapter):
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ours = AutoModelForCausalLM.from_pretrained(base)
    load_adapter(ours, adapter)
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - ours.eval()(input_ids=ids).logits).abs().max() < 1e-5


def deltas(path):
    return {m: f.b.double() @ f.a.double() for m, f in read_factors(path)[1].items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("b") / "llama", "llama")


@pytest.fixture(scope="module")
def two(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("ad")
    # mixed ranks, alphas, rsLoRA and partly different targets: PEFT's add_weighted_adapter gets this wrong
    peft_adapter(base, d / "a", 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    peft_adapter(base, d / "b", 1, r=2, lora_alpha=16, target_modules=["q_proj", "o_proj"])
    return d / "a", d / "b"


def test_combine_is_the_exact_weighted_sum(cli, two, tmp_path):
    a, b = two
    code, _, err = cli("combine", a, b, "--weights", "0.7,0.3", "--output", tmp_path / "c")
    assert code == 0, err
    da, db, dc = deltas(a), deltas(b), deltas(tmp_path / "c")
    assert set(dc) == set(da) | set(db)
    for m in dc:
        want = 0.7 * da.get(m, 0) + 0.3 * db.get(m, 0)
        assert (dc[m] - want).abs().max() < 1e-6, m
    cfg = json.loads((tmp_path / "c/adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6 and not cfg["use_rslora"]


def test_combined_adapter_loads_in_peft_with_our_logits(cli, two, base, tmp_path):
    assert cli("combine", *two, "--output", tmp_path / "c")[0] == 0
    assert_peft_matches_ours(base, tmp_path / "c")


def test_combine_with_rank_compresses_by_svd(cli, two, tmp_path):
    assert cli("combine", *two, "--rank", "6", "--output", tmp_path / "full")[0] == 0  # rank ≥ true rank: exact
    assert cli("combine", *two, "--rank", "1", "--output", tmp_path / "r1")[0] == 0
    exact = {m: 1.0 * deltas(two[0]).get(m, 0) + deltas(two[1]).get(m, 0) for m in deltas(tmp_path / "full")}
    for m, d in deltas(tmp_path / "full").items():
        assert (d - exact[m]).abs().max() < 1e-6
    for m, d in deltas(tmp_path / "r1").items():  # best rank-1 approximation: error = the other singular values
        s = torch.linalg.svdvals(exact[m])
        assert abs(torch.linalg.matrix_norm(d - exact[m]) - s[1:].norm()) < 1e-6


def test_resize_to_rank_and_to_energy(cli, two, base, tmp_path):
    a = two[0]
    code, _, err = cli("resize", a, "--rank", "2", "--output", tmp_path / "r2")
    assert code == 0 and "retained energy" in err and "overall:" in err, err
    assert err.count("self_attn.") >= 4  # one row per layer
    for m, d in deltas(tmp_path / "r2").items():
        s = torch.linalg.svdvals(deltas(a)[m])
        assert abs(torch.linalg.matrix_norm(d - deltas(a)[m]) - s[2:].norm()) < 1e-6
    assert cli("resize", a, "--rank", "0.9", "--output", tmp_path / "e")[0] == 0
    for m, d in deltas(tmp_path / "e").items():
        s = torch.linalg.svdvals(deltas(a)[m])
        k = torch.linalg.matrix_rank(d)
        kept = float((s[:k] ** 2).sum() / (s**2).sum())
        assert kept >= 0.9 and (k == 1 or float((s[: k - 1] ** 2).sum() / (s**2).sum()) < 0.9)
    # per-layer ranks travel as rank_pattern/alpha_pattern and load in PEFT with our logits
    assert_peft_matches_ours(base, tmp_path / "e")
    code, _, err = cli("resize", a, "--rank", "1.5", "--output", tmp_path / "half")
    assert code == 1 and "--rank must be a whole rank >= 1 or a fraction of energy below 1, got 1.5" in err
    code, _, err = cli("resize", a, "--rank", "16", "--output", tmp_path / "up")  # above r=4: said, kept exact
    assert code == 0 and "note: --rank 16 is above the adapter's rank (4)" in err, err
    assert json.loads((tmp_path / "up/adapter_config.json").read_text())["r"] == 4
    for m, d in deltas(tmp_path / "up").items():
        assert (d - deltas(a)[m]).abs().max() < 1e-6


def test_combine_warns_when_the_adapters_name_different_bases(cli, two, base, tmp_path, monkeypatch):
    """Same shapes, other base (a base and its instruct variant, say): allowed, but said."""
    import shutil

    shutil.copytree(base, tmp_path / "other")
    peft_adapter(tmp_path / "other", tmp_path / "z", 0, r=2, lora_alpha=4, target_modules=["q_proj"])
    code, _, err = cli("combine", two[0], tmp_path / "z", "--output", tmp_path / "o")
    assert code == 0 and "warning: the adapters were trained on different bases" in err
    code, _, err = cli("combine", *two, "--output", tmp_path / "same")
    assert code == 0 and "warning" not in err
    config = json.loads((two[0] / "adapter_config.json").read_text())  # a base named relative to the folder it
    config["base_model_name_or_path"] = base.name  # was saved from: written absolute, found from anywhere
    (tmp_path / "rel").mkdir()
    shutil.copy(two[0] / "adapter_model.safetensors", tmp_path / "rel")
    (tmp_path / "rel/adapter_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(base.parent)
    assert cli("resize", tmp_path / "rel", "--rank", "2", "--output", tmp_path / "abs")[0] == 0
    assert json.loads((tmp_path / "abs/adapter_config.json").read_text())["base_model_name_or_path"] == str(base)


def test_combine_refuses_mismatched_bases(cli, two, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "wide")
    peft_adapter(tmp_path / "wide", tmp_path / "y", 0, r=2, lora_alpha=4, target_modules=["q_proj"])
    code, _, err = cli("combine", two[0], tmp_path / "y", "--output", tmp_path / "o")
    assert code == 1 and "different shapes" in err and not (tmp_path / "o").exists()
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")  # another architecture: modules of its own, nothing shared
    peft_adapter(gpt2, tmp_path / "g", 0, r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    code, _, err = cli("combine", two[0], tmp_path / "g", "--output", tmp_path / "o")  # was written: fit neither
    assert code == 1 and "the adapters were trained on different architectures (" in err
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    (tmp_path / "g" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/gpt"}))
    code, _, err = cli("combine", two[0], tmp_path / "g", "--output", tmp_path / "o")  # a base not at hand
    assert code == 1 and "the adapters are for different models (their layers are model.layers, transformer.h)" in err
    assert not (tmp_path / "o").exists()
    code, _, err = cli("combine", two[0], "--output", tmp_path / "o")
    assert code == 1 and "at least two" in err
    code, _, err = cli("combine", *two, "--weights", "1", "--output", tmp_path / "o")
    assert code == 1 and "--weights has 1 values for 2" in err


@pytest.mark.parametrize("arch", ["llama", "gpt2", "openai-gpt"])
def test_extract_recovers_a_low_rank_fine_tune(cli, tmp_path, arch):
    base = save_tiny(tmp_path / "base", arch, chat_template=None)
    tuned_model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(0)
    changed = []
    with torch.no_grad():
        for name, p in tuned_model.named_parameters():
            if p.dim() == 2 and ("q_proj" in name or "c_attn" in name or "down_proj" in name or "mlp.c_proj" in name):
                u = torch.randn(p.shape[0], 2, generator=g) * 0.1
                p += u @ torch.randn(2, p.shape[1], generator=g)  # a rank-2 update
                changed.append(name.removesuffix(".weight"))
    tuned_model.save_pretrained(tmp_path / "tuned")
    code, _, err = cli("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "2",
                       "--output", tmp_path / "x")
    assert code == 0, err
    assert "overall: 100.00% of the energy kept" in err
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "x").eval()
    with torch.no_grad():
        want = tuned_model.eval()(input_ids=ids).logits
        assert (theirs(input_ids=ids).logits - want).abs().max() / want.abs().max() < 1e-4
    assert sorted(read_factors(tmp_path / "x")[1]) == sorted(changed)
    if arch == "llama":  # a regex picks modules by path, as in train
        code, _, err = cli("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "2",
                           "--output", tmp_path / "re", "--targets", r"re:.*layers\.0\..*")
        assert code == 0, err
        assert sorted(read_factors(tmp_path / "re")[1]) == sorted(m for m in changed if ".layers.0." in m)
        # `attention`, train's default keyword, means the attention projections here too (it matched nothing)
        code, _, err = cli("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "2",
                           "--output", tmp_path / "att", "--targets", "attention")
        assert code == 0, err
        assert sorted(read_factors(tmp_path / "att")[1]) == sorted(m for m in changed if "q_proj" in m)
        assert "down_proj.weight" in " ".join(err.split())  # changed, left out, and said
        code, _, err = cli("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "2",
                           "--output", tmp_path / "none", "--targets", "attn_proj")
        assert code == 1 and "--targets 'attn_proj' matched no linear module of LlamaForCausalLM" in err, err
        code, _, err = cli("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "2",
                           "--output", tmp_path / "none", "--targets", "k_proj,v_proj")
        assert code == 1 and "none of the layers --targets 'k_proj,v_proj' chose differs between the base and the " \
            "tuned model; 4 weights (" in " ".join(err.split()) and not (tmp_path / "none").exists(), err


def test_extract_past_a_layers_rank_keeps_it_whole_and_names_the_base_absolutely(cli, tmp_path, monkeypatch):
    """--rank above a layer's size keeps the layer at full rank (rank_pattern says so, as PEFT needs to load
    it) and the update is exact; a relative --base is written as an absolute path."""
    base = save_tiny(tmp_path / "base", "llama", chat_template=None)
    tuned_model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned_model.named_parameters():
            if p.dim() == 2 and ("k_proj" in name or "q_proj" in name):
                p += 0.05 * torch.randn(p.shape, generator=g)  # full rank
    tuned_model.save_pretrained(tmp_path / "tuned")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("extract", "--base", "base", "--tuned", "tuned", "--rank", "1000", "--output", "x")
    assert code == 0, err
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    sizes = {m: min(f.a.shape[1], f.b.shape[0]) for m, f in read_factors(tmp_path / "x")[1].items()}
    assert config["r"] == max(sizes.values()) and config["rank_pattern"]  # q and k differ in size (GQA)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "x").eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]])
    with torch.no_grad():
        want = tuned_model.eval()(input_ids=ids).logits
        assert (theirs(input_ids=ids).logits - want).abs().max() / want.abs().max() < 1e-4


def test_extract_refuses_a_tuned_model_of_another_architecture(cli, tmp_path):
    base, other = save_tiny(tmp_path / "base", "llama"), save_tiny(tmp_path / "other", "qwen2")
    code, _, err = cli("extract", "--base", base, "--tuned", other, "--rank", "2", "--output", tmp_path / "x")
    assert code == 1 and "--tuned is a qwen2 model and --base a llama one" in err and not (tmp_path / "x").exists()


def test_extract_names_the_changes_an_adapter_cannot_hold(cli, tmp_path):
    """Norms and an untied head changed too: the adapter holds q_proj only and says what it left out (it said
    '100% of the energy kept'); the head is a linear layer, so --targets lm_head extracts it."""
    base = save_tiny(tmp_path / "base", "llama", chat_template=None)
    tuned_model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned_model.named_parameters():
            if "q_proj" in name or name in ("model.norm.weight", "lm_head.weight"):
                p += 0.05 * torch.randn(p.shape, generator=g)
    tuned_model.save_pretrained(tmp_path / "tuned")
    code, _, err = cli("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "2",
                       "--output", tmp_path / "x")
    assert code == 0, err
    said = " ".join(err.split())
    assert "warning: 2 weights (lm_head.weight, model.norm.weight) differ between the two models but are not in " \
           "the adapter" in said
    assert sorted(read_factors(tmp_path / "x")[1]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    code, _, err = cli("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "4",
                       "--output", tmp_path / "head", "--targets", "lm_head")
    assert code == 0, err
    assert list(read_factors(tmp_path / "head")[1]) == ["lm_head"]
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "head")


def test_extract_leaves_a_moe_router_and_fused_experts_out(cli, tmp_path):
    """A router (not an nn.Linear) and per-expert checkpoint names (fused in the model) made adapters that
    neither PEFT nor lora generate could load."""
    base = save_tiny(tmp_path / "base", "qwen2_moe", chat_template=None)
    tuned_model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for name, p in tuned_model.named_parameters():
            if "q_proj.weight" in name or "mlp.gate." in name or "experts" in name:
                p += 0.01
    tuned_model.save_pretrained(tmp_path / "tuned")
    code, _, err = cli("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "2",
                       "--output", tmp_path / "x")
    assert code == 0, err
    assert "differ between the two models but are not in the adapter" in " ".join(err.split())
    modules = sorted(read_factors(tmp_path / "x")[1])
    assert modules and all(m.endswith("q_proj") for m in modules), modules
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "x")
    code, _, err = cli("generate", "--model", base, "--adapter", tmp_path / "x", "--prompt", "hi",
                       "--max-new-tokens", "2")
    assert code == 0, err


def test_a_peft_adapter_on_the_output_head_works_everywhere(cli, base, tmp_path):
    """PEFT saves lm_head.base_layer.weight (a copy of the base's head) beside LoRA on lm_head: every command
    refused the adapter as holding 'tensors that are not LoRA factors'."""
    from safetensors import safe_open

    peft_adapter(base, tmp_path / "head", 0, r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    with safe_open(str(tmp_path / "head/adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.lm_head.base_layer.weight" in f.keys()
    assert_peft_matches_ours(base, tmp_path / "head")
    code, _, err = cli("merge", tmp_path / "head", "--base", base, "--output", tmp_path / "m")
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "head").eval()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert (AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits - want).abs().max() < 1e-5
    for args in (("export", tmp_path / "head", "--output", tmp_path / "x"),
                 ("resize", tmp_path / "head", "--rank", "1", "--output", tmp_path / "r")):
        code, _, err = cli(*args)
        assert code == 0, err
    assert sorted(read_factors(tmp_path / "x")[1]) == sorted(read_factors(tmp_path / "head")[1])


def test_algebra_refuses_non_finite_numbers_and_keeps_ranks_tight(cli, two, base, tmp_path):
    """--weights nan wrote an adapter of NaNs (exported as it was); --rank inf was an internal error; --rank
    above the exact rank padded the sum with zeros; an all-zero update resized by energy kept its full rank."""
    for w in ("nan,1", "inf,1", "1e400,1"):
        code, _, err = cli("combine", *two, "--weights", w, "--output", tmp_path / "c")
        assert code == 1 and "--weights must be finite numbers" in err and not (tmp_path / "c").exists()
    code, _, err = cli("combine", *two, "--weights", "", "--output", tmp_path / "c")  # was read as "1 each"
    assert code == 1 and "--weights must be a comma list of numbers, got ''" in err
    code, _, err = cli("resize", two[0], "--rank", "inf", "--output", tmp_path / "r")
    assert code == 1 and "--rank must be a whole rank >= 1 or a fraction of energy below 1, got inf" in err
    code, _, err = cli("combine", *two, "--rank", "100", "--output", tmp_path / "up")
    assert code == 0 and "note: --rank 100 is above the sum's exact rank (6" in " ".join(err.split()), err
    assert json.loads((tmp_path / "up/adapter_config.json").read_text())["r"] == 6
    zero = tmp_path / "zero"
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                        peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(zero)  # B = 0
    assert cli("resize", zero, "--rank", "0.5", "--output", tmp_path / "z")[0] == 0
    assert json.loads((tmp_path / "z/adapter_config.json").read_text())["r"] == 1
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    peft_adapter(base, broken, 0, r=2, target_modules=["q_proj"])
    t = load_file(str(broken / "adapter_model.safetensors"))
    next(v for k, v in t.items() if "lora_B" in k)[0, 0] = float("nan")
    save_file(t, str(broken / "adapter_model.safetensors"))
    for args in (("export", broken, "--output", tmp_path / "x"), ("combine", broken, two[0], "--output", tmp_path / "y"),
                 ("export", broken, "--output", tmp_path / "g", "--format", "gguf"), ("inspect", broken)):
        code, _, err = cli(*args)
        assert code == 1 and "holds NaN or inf; the adapter is broken" in err, err


def test_values_beyond_float16_are_refused_not_written_as_inf(cli, base, tmp_path):
    """A finite adapter with values past float16's 65504 exported (float16 by default) and merged with
    --dtype float16 into files of inf, exit 0, which every command then refused as broken."""
    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    peft_adapter(base, big, 0, r=2, target_modules=["q_proj"])
    t = load_file(str(big / "adapter_model.safetensors"))
    next(v for k, v in t.items() if "lora_B" in k)[0, 0] = 3e5
    save_file(t, str(big / "adapter_model.safetensors"))
    for args, out in ((("export", big), "x"), (("export", big, "--format", "gguf"), "g.gguf"),
                      (("merge", big, "--dtype", "float16"), "m")):
        code, _, err = cli(*args, "--output", tmp_path / out)
        assert code == 1 and "holds values up to " in err and "beyond float16's range: nothing was written; use " \
            "--dtype bfloat16 or float32" in " ".join(err.split()), err
        assert not (tmp_path / out).exists()
    assert cli("export", big, "--output", tmp_path / "x", "--dtype", "bfloat16")[0] == 0


def test_combine_adds_conv1d_and_linear_adapters(cli, tmp_path):
    """GPT-2's attention is a Conv1D (fan_in_fan_out) and its lm_head a Linear: combine refused the two adapters as
    'different layer layouts', though the factors are (r, in), (out, r) in both and PEFT lays out each module
    by its own type."""
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    peft_adapter(gpt2, tmp_path / "attn", 0, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_adapter(gpt2, tmp_path / "head", 1, r=2, lora_alpha=4, target_modules=["lm_head"])
    code, _, err = cli("combine", tmp_path / "attn", tmp_path / "head", "--weights", "0.5,2", "--output", tmp_path / "c")
    assert code == 0, err
    da, db, dc = deltas(tmp_path / "attn"), deltas(tmp_path / "head"), deltas(tmp_path / "c")
    assert set(dc) == set(da) | set(db)
    for m in dc:
        assert (dc[m] - 0.5 * da.get(m, 0) - 2 * db.get(m, 0)).abs().max() < 1e-6, m
    assert_peft_matches_ours(gpt2, tmp_path / "c")
    code, _, err = cli("merge", tmp_path / "c", "--base", gpt2, "--output", tmp_path / "m", "--verify")
    assert code == 0 and "): ok" in err, err


def test_outputs_keep_their_inputs_dtype(cli, two, tmp_path):
    """combine / resize of float16 adapters (export's default) wrote float32, twice the size."""
    from lora_cli.lora.peft_format import read_safetensors_header

    def dtypes(d):
        return {t["dtype"] for t in read_safetensors_header(d / "adapter_model.safetensors")[0].values()}

    for name, src in zip("ab", two):
        assert cli("export", src, "--output", tmp_path / name)[0] == 0 and dtypes(tmp_path / name) == {"F16"}
    code, _, err = cli("resize", tmp_path / "a", "--rank", "2", "--output", tmp_path / "r")
    assert code == 0 and dtypes(tmp_path / "r") == {"F16"} and "float16, as its input" in err, err
    code, _, err = cli("combine", tmp_path / "a", tmp_path / "b", "--output", tmp_path / "c")
    assert code == 0 and dtypes(tmp_path / "c") == {"F16"}
    da, db, dc = deltas(tmp_path / "a"), deltas(tmp_path / "b"), deltas(tmp_path / "c")
    for m in dc:
        want = da.get(m, 0) + db.get(m, 0)
        assert (dc[m] - want).abs().max() < 2e-3 * want.abs().max(), m  # float16's rounding of the factors
    code, _, err = cli("combine", tmp_path / "a", two[1], "--output", tmp_path / "mixed")
    assert code == 0 and dtypes(tmp_path / "mixed") == {"F32"}
    code, _, err = cli("resize", tmp_path / "a", "--rank", "2", "--output", tmp_path / "r32", "--dtype", "fp32")
    assert code == 0 and dtypes(tmp_path / "r32") == {"F32"}  # (float16's rounding: the message said --dtype)
    code, _, err = cli("combine", *two, "--output", tmp_path / "c16", "--dtype", "bfloat16")
    assert code == 0 and dtypes(tmp_path / "c16") == {"BF16"} and "bfloat16)" in err, err


def test_combine_refuses_other_architectures_and_weights_past_float32(cli, two, tmp_path):
    """A llama and a qwen2 adapter of the same shapes were summed with a warning; --weights 1e39 wrote inf."""
    qwen = save_tiny(tmp_path / "qwen", "qwen2")
    peft_adapter(qwen, tmp_path / "q", 0, r=2, lora_alpha=4, target_modules=["q_proj"])
    code, _, err = cli("combine", two[0], tmp_path / "q", "--output", tmp_path / "o")
    assert code == 1 and "the adapters were trained on different architectures (" in err
    assert "combine adds adapters of one base model" in err and not (tmp_path / "o").exists()
    code, _, err = cli("combine", *two, "--weights", "1e39,1", "--output", tmp_path / "o")
    assert code == 1 and "--weights 1e+39, 1.0 overflow float32 in model.layers.0.self_attn.q_proj" in err
    assert not (tmp_path / "o").exists()


def test_extract_of_fine_tunes_lora_cannot_hold_whole(cli, tmp_path):
    """A base only saved in bf16 gave an adapter of rounding noise (14 modules, 19.76% energy kept), and a bf16
    fine-tune put that noise into every layer; a grown vocabulary was refused, its cause unsaid, whatever the
    targets; a head untied in the fine-tune was 'not the same architecture', and one tied there was skipped
    silently."""
    base = save_tiny(tmp_path / "base", "llama", chat_template=None)

    def tuned(name, edit=None, dtype=torch.float32):
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "q_proj" in n:
                    p += 0.1 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
        if edit:
            edit(model)
        model.to(dtype).save_pretrained(tmp_path / name)
        return tmp_path / name

    def extract(path, code=0):
        result = cli("extract", "--base", base, "--tuned", path, "--rank", "2", "--output", tmp_path / f"x-{path.name}")
        assert result[0] == code, result[2]
        return " ".join(result[2].split())

    g = torch.Generator().manual_seed(0)
    saved = tmp_path / "bf16-copy"
    AutoModelForCausalLM.from_pretrained(base).to(torch.bfloat16).save_pretrained(saved)
    assert "none of the layers --targets 'all-linear' chose differs" in extract(saved, 1)
    extract(tuned("bf16", dtype=torch.bfloat16))
    assert sorted(read_factors(tmp_path / "x-bf16")[1]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]

    said = extract(tuned("grown", lambda m: m.resize_token_embeddings(m.config.vocab_size + 8)))
    assert "warning: 2 weights (lm_head.weight (320, 32) → (328, 32), model.embed_tokens.weight (320, 32) → "            "(328, 32)) changed shape in the fine-tune (a vocabulary resized for new tokens?)" in said
    assert_peft_matches_ours(base, tmp_path / "x-grown")
    code, _, err = cli("extract", "--base", base, "--tuned", tmp_path / "grown", "--rank", "2", "--targets", "lm_head",
                       "--output", tmp_path / "head")
    assert code == 1 and "lm_head.weight is (328, 32) in the tuned model and (320, 32) in the base: a LoRA update "         "keeps a layer's shape" in err

    def tie(model):
        model.config.tie_word_embeddings = True
        model.tie_weights()

    said = extract(tuned("tied", tie))
    assert "warning: 1 weight (lm_head.weight) is in only one of the two models" in said
    tied_base = save_tiny(tmp_path / "tied-base", "llama-tied", chat_template=None)
    untied = AutoModelForCausalLM.from_pretrained(tied_base)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach() + 0.1)
    untied.save_pretrained(tmp_path / "untied")
    code, _, err = cli("extract", "--base", tied_base, "--tuned", tmp_path / "untied", "--rank", "2", "--targets",
                       "lm_head", "--output", tmp_path / "x-untied")  # (it was: 'the same architecture?')
    assert code == 1 and "none of the layers --targets 'lm_head' chose differs" in err, err
    assert "warning: 1 weight (lm_head.weight) is in only one of the two models" in " ".join(err.split())
    deeper = tmp_path / "deeper"
    config = AutoConfig.from_pretrained(base)
    config.num_hidden_layers = 3
    AutoModelForCausalLM.from_config(config).save_pretrained(deeper)
    assert "model.layers.2.mlp.down_proj.weight is only in the tuned model; are they the same architecture?" in \
        extract(deeper, 1)


def test_tensors_the_config_does_not_target_are_refused_by_every_command(cli, base, tmp_path):
    """PEFT loads only what target_modules names and merge refused the rest, but resize, combine and the GGUF
    export took the other tensors along: a derived adapter that means something else (6.06 off in PEFT)."""
    peft_adapter(base, tmp_path / "a", 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg = json.loads((tmp_path / "a/adapter_config.json").read_text())
    (tmp_path / "a/adapter_config.json").write_text(json.dumps(cfg | {"target_modules": ["q_proj"]}))
    for command in (["resize", tmp_path / "a", "--rank", "2"], ["combine", tmp_path / "a", tmp_path / "a"],
                    ["export", tmp_path / "a", "--format", "gguf"], ["export", tmp_path / "a", "--portable"],
                    ["export", tmp_path / "a"], ["merge", tmp_path / "a"], ["inspect", tmp_path / "a"]):
        code, _, err = cli(*command, *(["--output", tmp_path / "out"] if command[0] != "inspect" else []))
        assert code == 1 and "holds LoRA weights for model.layers.0.self_attn.v_proj, model.layers.1.self_attn" \
            ".v_proj, which its target_modules does not name (PEFT ignores them)" in " ".join(err.split()), command
        assert not (tmp_path / "out").exists()
