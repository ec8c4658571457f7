"""The LoRA core against PEFT (the oracle) and closed forms, on tiny models of many architectures."""

from __future__ import annotations

import copy
import gc
import json
import re

import peft
import pytest
import torch
from tiny import tiny_model

from lora_cli.errors import UserError
from lora_cli.lora import (
    AdapterConfig,
    LoraLinear,
    expected_trainable,
    inject_lora,
    lora_layers,
    merge_lora,
    param_report,
    peft_target_names,
    resolve_targets,
)
from lora_cli.lora.adapter import load_adapter, save_adapter
from lora_cli.lora.inject import unload_lora
from lora_cli.lora.targets import linear_modules
from lora_cli.models import peft_misread_targets

ARCHS = ["llama", "llama-tied", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2", "gpt_neox", "opt", "falcon",
         "gemma2", "phi", "bloom", "mpt", "gpt_bigcode", "codegen"]
EXPECTED_ATTENTION = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "llama-tied": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "falcon": ["self_attention.query_key_value", "self_attention.dense"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "bloom": ["self_attention.query_key_value", "self_attention.dense"],
    "mpt": ["Wqkv", "out_proj"],
    "gpt_bigcode": ["c_attn", "attn.c_proj"],
    "codegen": ["qkv_proj", "out_proj"],
}
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7], [3, 4, 8, 16, 32, 64, 100, 120]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_b(model, seed=1):
    """Give every lora_B non-zero values so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def wrapped(arch, r=4, alpha=8, rslora=False, targets="attention"):
    model = tiny_model(arch)
    paths = resolve_targets(model, targets)
    inject_lora(model, paths, r, alpha, use_rslora=rslora)
    randomize_b(model)
    return model.eval(), paths


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_targets_by_name(arch):
    model = tiny_model(arch)
    paths = resolve_targets(model, "attention")
    n_layers = 2
    for suffix in EXPECTED_ATTENTION[arch]:
        assert sum(p.endswith("." + suffix) for p in paths) == n_layers, (suffix, paths)
    assert len(paths) == n_layers * len(EXPECTED_ATTENTION[arch])
    assert not any(".mlp." in p for p in paths)


@pytest.mark.parametrize("arch,expected", [
    ("bart", ["self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj"]),  # no encoder_attn
    ("jetmoe", ["self_attention.kv_proj"]),  # not experts.router.layer, the top-k gate of its attention experts
])
def test_attention_leaves_out_cross_attention_and_routers(arch, expected):
    """BART's causal LM took its cross-attention (which never runs without an encoder: half the adapter stayed
    zero, and the run told the user to drop targets they never chose); JetMoE's took its attention router."""
    model = tiny_model(arch)
    paths = resolve_targets(model, "attention")
    assert sorted({".".join(p.split(".")[-2:]) for p in paths}) == expected, paths
    assert len(paths) == 2 * len(expected)
    assert any("encoder_attn" in p or ".router." in p for p in linear_modules(model))  # (there to be left out)


@pytest.mark.parametrize("arch", ARCHS)
def test_init_is_identity_and_only_lora_trains(arch):
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    inject_lora(model, resolve_targets(model, "attention"), r=4, lora_alpha=8)
    assert torch.equal(logits(base), logits(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert param_report(model).trainable == expected_trainable(model)
    # closed form by hand: Σ r·(in + out) over wrapped layers
    by_hand = 0
    for layer in lora_layers(model).values():
        w = layer.base_layer.weight
        by_hand += 4 * (w.shape[0] + w.shape[1])
    assert param_report(model).trainable == by_hand


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_peft_with_same_weights(arch, rslora):
    ours, paths = wrapped(arch, r=4, alpha=8, rslora=rslora)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_target_names(ours, paths), use_rslora=rslora,
                          lora_dropout=0.0, fan_in_fan_out=arch == "gpt2")
    theirs = peft.get_peft_model(tiny_model(arch), cfg).eval()
    peft_paths = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    assert peft_paths == paths
    with torch.no_grad():
        for p, layer in lora_layers(ours).items():
            m = theirs.base_model.model.get_submodule(p)
            m.lora_A["default"].weight.copy_(layer.lora_A.weight)
            m.lora_B["default"].weight.copy_(layer.lora_B.weight)
    diff = (logits(ours) - logits(theirs)).abs().max().item()
    assert diff < 1e-5
    assert (logits(ours) - logits(tiny_model(arch))).abs().max() > 1e-3  # the adapter does something


def test_target_names_never_end_in_a_bare_index():
    """CTRL's feed-forward is an nn.Sequential: its second linear is `ffn.2`. A bare `2` also matched only it in
    a 2-layer model, but names any third child of anything in PEFT's suffix match (a third layer's block)."""
    from torch import nn

    def block():
        return nn.ModuleDict({"attn": nn.Linear(4, 4), "ffn": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))})

    model = nn.ModuleDict({"h": nn.ModuleList([block(), block()])})
    assert peft_target_names(model, ["h.0.ffn.2", "h.1.ffn.2"]) == ["ffn.2"]
    assert peft_target_names(model, ["h.0.ffn.0", "h.0.ffn.2", "h.1.ffn.0", "h.1.ffn.2"]) == ["ffn.0", "ffn.2"]
    assert peft_target_names(model, ["h.0.attn", "h.1.attn"]) == ["attn"]
    assert peft_target_names(model, ["h.1.ffn.2"]) == ["1.ffn.2"]  # suffix-unique, but ends in a name


@pytest.mark.parametrize("arch,targets,misread", [
    ("deepseek_v3", "all-linear", ["down_proj", "gate_proj", "up_proj"]),  # dense layer 0 and the shared experts
    ("deepseek_v3", "attention", []),
    ("qwen2_moe", "all-linear", []),  # PEFT converts its descendants' names, not qwen2_moe's own
])
def test_moe_target_names_that_peft_reads_as_experts_are_flagged(tmp_path, arch, targets, misread):
    ours, paths = wrapped(arch, targets=targets)
    names = peft_target_names(ours, paths)
    assert peft_misread_targets(ours, names) == misread
    save_adapter(ours, tmp_path, AdapterConfig(r=4, lora_alpha=8, target_modules=names))
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    peft_paths = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    diff = (logits(ours) - logits(theirs)).abs().max().item()
    if misread:  # the flag is true: PEFT wraps other modules and gives other logits
        assert peft_paths != paths and diff > 1e-3
    else:
        assert peft_paths == paths and diff < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox", "llama-tied"])
def test_saved_adapter_loads_in_peft(tmp_path, arch):
    ours, paths = wrapped(arch)
    cfg = AdapterConfig(r=4, lora_alpha=8, target_modules=peft_target_names(ours, paths),
                        fan_in_fan_out=arch == "gpt2", base_model_name_or_path="tiny")
    save_adapter(ours, tmp_path, cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(saved["target_modules"])
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    peft_paths = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    assert peft_paths == paths
    assert (logits(ours) - logits(theirs)).abs().max().item() < 1e-5
    # and back into ours
    again = tiny_model(arch)
    load_adapter(again, tmp_path)
    assert (logits(ours) - logits(again.eval())).abs().max().item() < 1e-5  # fp32; q/k/v fused or not


def test_gpt2_never_writes_a_bare_c_proj():
    model = tiny_model("gpt2")
    names = peft_target_names(model, resolve_targets(model, "attention"))
    assert "c_proj" not in names and "attn.c_proj" in names


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_made_adapter_with_rslora_and_patterns_loads_in_ours(tmp_path, arch):
    targets = ["q_proj", "v_proj", "o_proj"] if arch == "llama" else ["c_attn", "attn.c_proj"]
    pattern_key = "v_proj" if arch == "llama" else "c_attn"
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True,
                          rank_pattern={pattern_key: 2}, alpha_pattern={pattern_key: 3},
                          fan_in_fan_out=arch == "gpt2", init_lora_weights=False)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_model(arch), cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = tiny_model(arch)
    loaded = load_adapter(ours, tmp_path)
    assert loaded.use_rslora and loaded.rank_pattern == {pattern_key: 2}
    assert {layer.r for layer in lora_layers(ours).values()} == {2, 4}
    assert (logits(ours.eval()) - logits(theirs)).abs().max().item() < 1e-5


def test_peft_regex_target_modules_load(tmp_path):
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*layers\.1\.self_attn\.(q|k)_proj",
                          init_lora_weights=False)
    torch.manual_seed(4)
    theirs = peft.get_peft_model(tiny_model("llama"), cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = tiny_model("llama")
    load_adapter(ours, tmp_path)
    assert sorted(lora_layers(ours)) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    assert (logits(ours.eval()) - logits(theirs)).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch,selection", [
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["q_proj", "o_proj"], layers_to_transform=0, layers_pattern="layers")),
    ("llama", dict(target_modules="all-linear", exclude_modules=["down_proj", "k_proj"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*layers\.0\..*")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[0], layers_pattern="h",
                  fan_in_fan_out=True)),
])
def test_peft_layer_selection_and_exclusion_load_in_ours(tmp_path, arch, selection):
    """layers_to_transform / layers_pattern / exclude_modules: the same modules as PEFT, the same logits."""
    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                                   **selection)).eval()
    theirs.save_pretrained(tmp_path)
    ours = tiny_model(arch)
    load_adapter(ours, tmp_path)
    peft_paths = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(lora_layers(ours)) == peft_paths and len(peft_paths) < len(linear_modules(ours))
    assert (logits(ours.eval()) - logits(theirs)).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch,saved", [("llama", ["lm_head"]), ("llama-tied", ["lm_head"]),
                                         ("llama-tied", ["embed_tokens", "lm_head"]), ("qwen2", ["embed_tokens"]),
                                         ("llama", ["norm"]), ("llama", ["mlp"])])  # PEFT: a plain suffix, blocks
def test_peft_modules_to_save_load_in_ours_and_unload_cleanly(tmp_path, arch, saved):
    """Layers an adapter saves whole replace the base's (a tied head gets its own weight, as under PEFT);
    unloading puts the originals back, ties included."""
    torch.manual_seed(6)
    theirs = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(  # down_proj is in the saved `mlp` block
        r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], modules_to_save=saved, init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.eval().save_pretrained(tmp_path)
    ours = tiny_model(arch)
    before = logits(ours)
    cfg = load_adapter(ours, tmp_path)
    assert cfg.modules_to_save == saved
    assert (logits(ours) - logits(theirs)).abs().max().item() < 1e-5
    unload_lora(ours)
    assert torch.equal(logits(ours), before)
    if arch == "llama-tied":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_merge_unmerge(arch):
    model, _ = wrapped(arch)
    before = logits(model)
    weights = {p: layer.base_layer.weight.clone() for p, layer in lora_layers(model).items()}
    for layer in lora_layers(model).values():
        layer.merge()
    merged = logits(model)
    assert (merged - before).abs().max().item() < 1e-5
    for layer in lora_layers(model).values():
        layer.merge()  # idempotent
    assert torch.equal(logits(model), merged)
    for p, layer in lora_layers(model).items():
        layer.unmerge()
        assert (layer.base_layer.weight - weights[p]).abs().max().item() < 1e-6
    assert (logits(model) - before).abs().max().item() < 1e-5


def test_merge_lora_returns_a_plain_model():
    model, paths = wrapped("gpt2")
    before = logits(model)
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert type(model.get_submodule(paths[0])).__name__ == "Conv1D"
    assert (logits(model) - before).abs().max().item() < 1e-5


def test_delta_weight_closed_form():
    model, _ = wrapped("llama", r=4, alpha=8)
    layer = next(iter(lora_layers(model).values()))
    expected = (8 / 4) * layer.lora_B.weight @ layer.lora_A.weight
    assert torch.allclose(layer.delta_weight(), expected)
    x = torch.randn(3, layer.lora_A.weight.shape[1])
    assert torch.allclose(layer(x), layer.base_layer(x) + x @ expected.T, atol=1e-6)


def test_init_distribution_matches_peft():
    layer = LoraLinear.from_base(torch.nn.Linear(64, 32), r=8, lora_alpha=16)
    assert layer.lora_A.weight.abs().max() <= 1 / 64**0.5
    assert torch.count_nonzero(layer.lora_B.weight) == 0


# ---- failures are loud and name things ----

def test_no_match_names_the_models_linear_modules():
    with pytest.raises(UserError, match=r"q_proj.*gate_proj|gate_proj.*q_proj"):
        resolve_targets(tiny_model("llama"), "nonexistent_proj")


def test_regex_and_all_linear_targets():
    model = tiny_model("llama")
    assert resolve_targets(model, r"re:.*layers\.0\.mlp\.(up|down)_proj") == [
        "model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    all_lin = resolve_targets(model, "all-linear")
    assert "lm_head" not in all_lin and len(all_lin) == 2 * 7
    with pytest.raises(UserError, match="invalid regular expression"):
        resolve_targets(model, "re:(")
    # a keyword inside a comma list: the attention projections plus the named modules
    mixed = resolve_targets(model, "attention, mlp.down_proj")
    assert mixed == sorted(resolve_targets(model, "attention") + resolve_targets(model, "down_proj"))
    with pytest.raises(UserError, match="nope"):
        resolve_targets(model, "attention,nope")


def test_linear_subclasses_that_are_not_linear_maps_are_not_targets():
    """Phi-MoE's router subclasses nn.Linear but returns (scores, logits): wrapped by all-linear, the first
    forward failed. Falcon's FalconLinear overrides forward too, and is a linear map."""
    model = tiny_model("phimoe")
    routers = [n for n, m in model.named_modules() if type(m).__name__ == "PhimoeTopKRouter"]
    assert routers and isinstance(model.get_submodule(routers[0]), torch.nn.Linear)
    paths = resolve_targets(model, "all-linear")
    assert paths and not set(paths) & set(routers)
    inject_lora(model, paths, r=2, lora_alpha=4)
    model(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(UserError, match="matched no linear module"):
        resolve_targets(tiny_model("phimoe"), "gate")
    falcon = tiny_model("falcon")
    assert any(type(falcon.get_submodule(p)).__name__ == "FalconLinear" for p in resolve_targets(falcon, "all-linear"))


def test_wrapping_twice_is_refused():
    model, paths = wrapped("llama")
    with pytest.raises(UserError, match="twice"):
        inject_lora(model, paths, 4, 8)


@pytest.mark.parametrize("feature,value", [("lora_bias", True), ("bias", "all")])
def test_unimplemented_peft_features_are_refused_by_name(tmp_path, feature, value):
    d = peft_config_on_disk(tmp_path)
    d[feature] = value
    with pytest.raises(UserError, match=feature):
        AdapterConfig.from_peft_dict(d)


@pytest.mark.parametrize("edit,said", [
    ({"target_modules": "(q_proj"}, "target_modules '(q_proj' is not a regular expression: missing )"),
    ({"alpha_pattern": {"(q_proj": 2}}, "a rank_pattern or alpha_pattern key '(q_proj' is not a regular expression"),
    ({"rank_pattern": ["q_proj", 2]}, "rank_pattern must be an object of module patterns to values, got list"),
    ({"exclude_modules": 3}, "exclude_modules must be a list of module names, got 3"),
    ({"layers_to_transform": [0], "layers_pattern": 7}, "layers_pattern must be a list of module names, got 7"),
    ({"modules_to_save": "lm_head"}, 'modules_to_save must be a list of module names, got "lm_head"'),
])
def test_malformed_peft_configs_are_named_not_internal_errors(tmp_path, edit, said):
    """These were uncaught exceptions ('internal error: TypeError …'), and a string modules_to_save was read
    letter by letter."""
    d = {**peft_config_on_disk(tmp_path), **edit}
    with pytest.raises(UserError, match=re.escape(f"adapter_config.json: malformed value ({said}")):
        AdapterConfig.from_peft_dict(d)


def peft_config_on_disk(tmp_path):
    """What peft itself writes for a plain LoRA config (~41 keys, many null)."""
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_peft_default_config_dict_is_accepted(tmp_path):
    d = peft_config_on_disk(tmp_path)
    cfg = AdapterConfig.from_peft_dict(d)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (4, 8.0, ["q_proj"])


def test_mismatches_are_collected_together(tmp_path):
    ours, paths = wrapped("llama")
    save_adapter(ours, tmp_path, AdapterConfig(r=4, lora_alpha=8, target_modules=peft_target_names(ours, paths),
                                               base_model_name_or_path="tiny"))
    other = tiny_model("gpt_neox")  # no q_proj/k_proj/… at all: said once, not per module
    with pytest.raises(UserError, match=r"does not fit this base model: none of its 8 modules .* trained on tiny"):
        load_adapter(other, tmp_path)
    wide = tiny_model("llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"does not match its adapter_config.json: .*has rank 4, its config says r=3;.*;"):
        load_adapter(wide, tmp_path)


def test_a_misfit_names_the_shape_mismatches_first(tmp_path):
    """An adapter on a smaller, deeper model: its extra layers are 'not a module of the base', but the shapes
    say most plainly that it is another model: they come first, layers in order, with the base it was trained on."""
    import transformers as tf
    from tiny import tiny_config

    ours, paths = wrapped("llama")
    save_adapter(ours, tmp_path, AdapterConfig(r=4, lora_alpha=8, target_modules=peft_target_names(ours, paths),
                                               base_model_name_or_path="tiny"))
    c = tiny_config("llama")
    c.num_hidden_layers, c.hidden_size, c.head_dim = 1, 64, 64 // c.num_attention_heads
    with pytest.raises(UserError) as e:
        load_adapter(tf.AutoModelForCausalLM.from_config(c), tmp_path)
    msg = str(e.value)
    assert "does not fit this base model (it was trained on tiny): model.layers.0.self_attn.k_proj.lora_A is (4, 32)" in msg
    assert "model.layers.1" not in msg.split("…")[0] and "more" in msg


def test_non_finite_adapter_is_refused(tmp_path):
    ours, paths = wrapped("llama")
    with torch.no_grad():
        next(iter(lora_layers(ours).values())).lora_A.weight[0, 0] = float("nan")
    save_adapter(ours, tmp_path, AdapterConfig(r=4, lora_alpha=8, target_modules=peft_target_names(ours, paths)))
    with pytest.raises(UserError, match="NaN"):
        load_adapter(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("chunk", [1 << 24, 16])
def test_nonfinite_scan_of_raw_bytes_agrees_with_torch(tmp_path, monkeypatch, chunk):
    """inspect finds NaN/inf without torch, from the exponent bits: every float dtype, ±inf, NaN, and the largest
    and smallest finite values (which must not be flagged); read in chunks (a 1.2 GB adapter took 1.5 s and
    1.2 GB of memory), here also 16 bytes at a time, so the bad value sits past the first chunk."""
    from safetensors.torch import save_file

    from lora_cli.lora import peft_format
    from lora_cli.lora.peft_format import nonfinite_tensors, read_safetensors_header

    monkeypatch.setattr(peft_format, "_CHUNK_BYTES", chunk)

    tensors = {}
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        info = torch.finfo(dtype)
        edge = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 4, 0.0, -0.0], dtype=dtype)
        tensors[f"{dtype}.edge"] = edge
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.randn(3, 5).to(dtype)
            t[2, 4] = bad
            tensors[f"{dtype}.{bad}"] = t
    tensors["int"] = torch.full((4,), -1, dtype=torch.int32)  # all bits set: not a float, never flagged
    tensors["empty"] = torch.zeros(0, 3)
    save_file(tensors, str(tmp_path / "t.safetensors"))
    header, _ = read_safetensors_header(tmp_path / "t.safetensors")
    expected = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    assert len(expected) == 12 and nonfinite_tensors(tmp_path / "t.safetensors", header) == expected


def test_dropout_rate_and_expectation():
    from lora_cli.lora.layer import dropout_positions, zeroed_at

    torch.manual_seed(0)
    for p in (0.05, 0.3):
        positions = dropout_positions(torch.Size([400, 1000]), p, torch.device("cpu"))
        drops = (zeroed_at(torch.ones(400, 1000), positions) == 0).float()
        assert abs(drops.mean().item() - p) < 0.003
        # independent entries: drops per row have the binomial variance, neighbours are uncorrelated
        assert abs(drops.sum(1).var().item() / (1000 * p * (1 - p)) - 1) < 0.2
        assert abs(torch.corrcoef(torch.stack([drops[:, :-1].flatten(), drops[:, 1:].flatten()]))[0, 1]) < 0.01
    layer = LoraLinear.from_base(torch.nn.Linear(64, 32), r=4, lora_alpha=8, dropout=0.3)
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.train()
    x = torch.randn(1, 64)
    mean = layer(x.expand(20000, 64)).mean(dim=0)
    layer.eval()
    assert torch.allclose(mean, layer(x)[0], atol=0.05 * layer(x).abs().max().item())  # E[dropout] = identity


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_lora_forward_and_gradients_equal_the_formula(dropout, monkeypatch):
    """y = W x + b + (alpha/r)/(1-p) · B A (keep ⊙ x): output and all gradients against plain autograd."""
    from lora_cli.lora import layer as layer_mod

    torch.manual_seed(0)
    keep = torch.rand(3, 5, 16) >= dropout
    positions = (~keep).flatten().nonzero().squeeze(1)
    monkeypatch.setattr(layer_mod, "dropout_positions", lambda shape, p, device: positions)
    base = torch.nn.Linear(16, 8).double()
    layer = LoraLinear.from_base(base, r=4, lora_alpha=12, dropout=dropout).double().train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    layer(x).pow(2).sum().backward()
    got = [x.grad, a.grad, b.grad]
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    ref = base(x2) + (x2 * keep) @ a2.T @ b2.T * (12 / 4) / (1 - dropout)
    ref.pow(2).sum().backward()
    for g, r in zip(got, [x2.grad, a2.grad, b2.grad]):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_masked_down_gradcheck():
    from lora_cli.lora.layer import _MaskedDown

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    dropped = torch.tensor([0, 5, 5, 17, 35])  # duplicates allowed: a position hit twice is dropped once
    assert torch.autograd.gradcheck(lambda x, a: _MaskedDown.apply(x, dropped, a), (x, a))
    keep = torch.ones(36, dtype=torch.float64)
    keep[dropped] = 0
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(_MaskedDown.apply(x, dropped, a), (x2 * keep.view(2, 3, 6)) @ a.T)


def test_siblings_reading_one_input_share_a_dropout_mask():
    model = tiny_model("llama")
    inject_lora(model, resolve_targets(model, "attention"), 4, 8, dropout=0.5)
    layers = lora_layers(model)
    q, k, o = (layers[f"model.layers.0.self_attn.{n}"] for n in ("q_proj", "k_proj", "o_proj"))
    assert q.siblings is k.siblings is o.siblings
    model.train()
    x = torch.randn(2, 5, 32)
    assert q._dropped_positions(x) is k._dropped_positions(x)  # same tensor in, same mask
    assert not torch.equal(o._dropped_positions(x.clone()), q._dropped_positions(x))  # another tensor, a fresh mask


def _siblings(ranks_outs, dropout):
    """LoraLinear layers on one input width sharing a sibling group, B random, in float64."""
    group = {}
    layers = []
    for r, n_out in ranks_outs:
        layer = LoraLinear.from_base(torch.nn.Linear(16, n_out).double(), r=r, lora_alpha=2 * r, dropout=dropout)
        layer = layer.double().train()
        torch.nn.init.normal_(layer.lora_B.weight)
        layer.siblings = group
        layers.append(layer)
    return layers


def _reference(layer, x, keep):
    """y = W x + b + s/(1-p) · B A (keep ⊙ x) by plain autograd on copies of the weights."""
    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    s = layer.scaling / (1 - layer.dropout)
    return layer.base_layer(x) + (x * keep) @ a.T @ b.T * s, (a, b)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_siblings_reading_one_input_share_one_down_projection(dropout, monkeypatch):
    """After one forward the layers know that q/k/v read one tensor; later forwards compute their A x in one
    matmul (the first reader's), and outputs and all gradients equal the layer-by-layer formula."""
    from lora_cli.lora import layer as layer_mod

    torch.manual_seed(0)
    keep = torch.rand(3, 5, 16) >= dropout
    positions = (~keep).flatten().nonzero().squeeze(1)
    monkeypatch.setattr(layer_mod, "dropout_positions", lambda shape, p, device: positions)
    q, k, v, o = _siblings([(4, 16), (2, 8), (4, 8), (4, 16)], dropout)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    x2 = torch.randn(3, 5, 16, dtype=torch.float64)
    for ll, inp in ((q, x), (k, x), (v, x), (o, x2)):  # the forward that learns
        ll(inp)
    o(x2.clone())  # a new input: the readers of the last one are remembered too
    assert q.siblings["plan"][q] == (q, k, v) and q.siblings["plan"][o] == (o,)

    widths = []
    real_down = layer_mod._down
    monkeypatch.setattr(layer_mod, "_down", lambda xd, a, p: widths.append(a.shape[0]) or real_down(xd, a, p))
    xg = x.clone().requires_grad_()
    outs = [ll(xg) for ll in (q, k, v)]
    assert widths == [10]  # one matmul for the three (ranks 4 + 2 + 4)
    sum((y * torch.arange(y.shape[-1])).sum() for y in outs).backward()
    xr = x.clone().requires_grad_()
    refs = [_reference(ll, xr, keep) for ll in (q, k, v)]
    sum((y * torch.arange(y.shape[-1])).sum() for y, _ in refs).backward()
    for ll, y, (yr, (a, b)) in zip((q, k, v), outs, refs):
        torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ll.lora_A.weight.grad, a.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ll.lora_B.weight.grad, b.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-12, atol=1e-12)


def test_a_sibling_reading_another_tensor_than_planned_computes_alone():
    torch.manual_seed(0)
    q, k, v = _siblings([(4, 16), (4, 8), (4, 8)], 0.0)
    x, y = torch.randn(2, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    for ll in (q, k, v):
        ll(x)
    q(y)  # learns (q, k, v); q precomputes k's and v's slices for y
    assert q.siblings["plan"][q] == (q, k, v)
    ones = torch.ones(2, 16, dtype=torch.float64)
    for ll, inp in ((k, x), (v, y)):  # k now reads another tensor: its precomputed slice must not be used
        torch.testing.assert_close(ll(inp), _reference(ll, inp, ones)[0], rtol=1e-12, atol=1e-12)


def test_a_recompute_that_stops_early_keeps_the_plan_and_the_dropout_draws(monkeypatch):
    """Under gradient checkpointing the forward frees what it saved and the recompute keeps it, and the
    recompute may stop after the first reader: neither may change the plan or the number of random draws."""
    from lora_cli.lora import layer as layer_mod

    torch.manual_seed(0)
    q, k, v = _siblings([(4, 16), (4, 8), (4, 8)], 0.3)
    x, y, z, w = (torch.randn(2, 16, dtype=torch.float64) for _ in range(4))
    for ll in (q, k, v):
        ll(x)
    q(y)  # a recompute that stopped after q
    q(z)
    assert q.siblings["plan"][q] == (q, k, v)
    draws = []
    real = layer_mod.dropout_positions
    monkeypatch.setattr(layer_mod, "dropout_positions", lambda *a: draws.append(1) or real(*a))
    q._dropped_positions(w)
    gc.collect()  # nothing else holds the positions, as in a checkpointed forward
    assert k._dropped_positions(w) is q._dropped_positions(w) and len(draws) == 1


def test_safetensors_files_are_the_same_bytes_for_the_same_tensors(tmp_path):
    """safetensors writes metadata keys in a random order: two identical runs gave adapters whose bytes differed."""
    from safetensors import safe_open

    from lora_cli.lora.peft_format import save_safetensors

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    meta = {f"key{i}": f"välue {i}" for i in range(8)} | {"format": "pt"}
    files = [tmp_path / f"{i}.safetensors" for i in range(6)]
    for f in files:
        save_safetensors(tensors, f, meta)
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(files[0], "pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16", "olora", "corda", "loftq", "lora_ga"])
def test_an_adapter_made_on_a_changed_base_is_refused(init):
    """These initialisations subtract their first B A from the base weights: applied to the original base the
    adapter is another model (LoRA-GA's merged logits were 2.9 off, accepted without a word)."""
    d = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": init}
    with pytest.raises(UserError, match=rf"init_lora_weights='{init}' \(it changes the base weights\)"):
        AdapterConfig.from_peft_dict(d)
    for harmless in (True, False, "gaussian", "eva", "orthogonal"):
        assert AdapterConfig.from_peft_dict({**d, "init_lora_weights": harmless}).r == 4


def test_unsupported_values_are_cut_visibly():
    d = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
         "use_bdlora": {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["v_proj"], "nblocks": 2}}
    with pytest.raises(UserError, match=r'use_bdlora=\{"target_modules_bd_a": \["q_proj"\], "target_modules_bd_b": …$'):
        AdapterConfig.from_peft_dict(d)
