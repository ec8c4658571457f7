"""Every command, through the CLI, on tiny models of many architectures, checked against PEFT.

For each architecture: a random 2-layer model (hidden 64) and a tiny tokenizer are saved, `lora train`
runs 3 steps on a chat file, then the run loads in PEFT and in ours (same logits), `lora merge`'s output
gives PEFT's logits with no LoRA code, `lora export`'s adapter loads in PEFT, `lora generate` and
`lora inspect` answer. One line per architecture: ok / BAD (a number off) / FAIL (a command failed).

    python scripts/sweep_archs.py                          # all, --targets attention
    python scripts/sweep_archs.py --archs bloom,mpt --targets all-linear -- --dora
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tiny import tiny_tokenizer  # noqa: E402

LORA = [sys.executable, "-m", "lora_cli"]
CONFIGS = {  # hidden 64, 2 layers, 4 heads; what each architecture needs besides
    "gemma2": lambda c, kv: tf.Gemma2Config(**c, **kv, head_dim=16),
    "gemma3": lambda c, kv: tf.Gemma3TextConfig(**c, **kv, head_dim=16, sliding_window=8),
    "phi": lambda c, kv: tf.PhiConfig(**c),
    "bloom": lambda c, kv: tf.BloomConfig(vocab_size=c["vocab_size"], hidden_size=64, n_layer=2, n_head=4),
    "gptj": lambda c, kv: tf.GPTJConfig(vocab_size=c["vocab_size"], n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                        n_positions=256),
    "stablelm": lambda c, kv: tf.StableLmConfig(**c, **kv),
    "cohere": lambda c, kv: tf.CohereConfig(**c, **kv),
    "olmo2": lambda c, kv: tf.Olmo2Config(**c, **kv),
    "starcoder2": lambda c, kv: tf.Starcoder2Config(**c, **kv),
    "mpt": lambda c, kv: tf.MptConfig(vocab_size=c["vocab_size"], d_model=64, n_layers=2, n_heads=4, max_seq_len=256),
    "codegen": lambda c, kv: tf.CodeGenConfig(vocab_size=c["vocab_size"], n_embd=64, n_layer=2, n_head=4,
                                              rotary_dim=8, n_positions=256, n_ctx=256),
    "gpt_bigcode": lambda c, kv: tf.GPTBigCodeConfig(vocab_size=c["vocab_size"], n_embd=64, n_layer=2, n_head=4,
                                                     n_positions=256),
    "mixtral": lambda c, kv: tf.MixtralConfig(**c, **kv, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda c, kv: tf.Qwen2MoeConfig(**c, **kv, num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "granite": lambda c, kv: tf.GraniteConfig(**c, **kv, logits_scaling=4.0, residual_multiplier=0.5,
                                              embedding_multiplier=2.0),
    "smollm3": lambda c, kv: tf.SmolLM3Config(**c, **kv, pad_token_id=0),
    "gpt_neo": lambda c, kv: tf.GPTNeoConfig(vocab_size=c["vocab_size"], hidden_size=64, num_layers=2, num_heads=4,
                                             attention_types=[[["global", "local"], 1]], max_position_embeddings=256,
                                             window_size=8),
    "glm": lambda c, kv: tf.GlmConfig(**c, **kv, head_dim=16, pad_token_id=0),
    "deepseek_v3": lambda c, kv: tf.DeepseekV3Config(**c, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                                                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                                     n_routed_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                                                     topk_group=1),
    "ernie4_5": lambda c, kv: tf.Ernie4_5Config(**c, **kv, head_dim=16),
    "exaone4": lambda c, kv: tf.Exaone4Config(**c, **kv),
    "gpt_oss": lambda c, kv: tf.GptOssConfig(**c, **kv, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                             sliding_window=8),
    "qwen3_moe": lambda c, kv: tf.Qwen3MoeConfig(**c, **kv, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=32),
    "olmoe": lambda c, kv: tf.OlmoeConfig(**c, **kv, num_experts=4, num_experts_per_tok=2),
    "lfm2": lambda c, kv: tf.Lfm2Config(**c, **kv, layer_types=["conv", "full_attention"]),  # hybrid conv
    "falcon_h1": lambda c, kv: tf.FalconH1Config(**c, **kv, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                                                 mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16),
    "llama4_text": lambda c, kv: tf.Llama4TextConfig(**c, **kv, head_dim=16, num_local_experts=2,
                                                     intermediate_size_mlp=96),
    "jamba": lambda c, kv: tf.JambaConfig(**c, **kv, num_experts=2, attn_layer_period=2, attn_layer_offset=1,
                                          expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                                          use_mamba_kernels=False),
    "qwen3_next": lambda c, kv: tf.Qwen3NextConfig(**c, **kv, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                                   linear_num_value_heads=4, linear_num_key_heads=2,
                                                   linear_key_head_dim=16, linear_value_head_dim=16,
                                                   layer_types=["linear_attention", "full_attention"]),
    "apertus": lambda c, kv: tf.ApertusConfig(**c, **kv),
    "seed_oss": lambda c, kv: tf.SeedOssConfig(**c, **kv, head_dim=16),
    "olmo3": lambda c, kv: tf.Olmo3Config(**c, **kv, sliding_window=8),
}


def make_base(arch: str, d: Path) -> Path:
    tok = tiny_tokenizer()
    c = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=256, initializer_range=0.2)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch](c, {"num_key_value_heads": 2}), dtype=torch.float32)
    for k in ("eos", "pad", "bos"):
        setattr(model.config, f"{k}_token_id", getattr(tok, f"{k}_token_id"))
    model.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    return d / "base"


def lora(*args) -> subprocess.CompletedProcess:
    p = subprocess.run([*LORA, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"lora {args[0]} failed: {p.stderr.strip().splitlines()[-1] if p.stderr else p.returncode}")
    return p


def check(arch: str, d: Path, targets: str, extra: list[str]) -> dict:
    import peft

    from lora_cli.lora.adapter import load_adapter

    base = make_base(arch, d)
    data = d / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"what is the capital of France {i}"},
        {"role": "assistant", "content": "Paris " * (1 + i % 5)}]}) + "\n" for i in range(16)))
    run = d / "run"
    lora("train", "--model", base, "--data", data, "--output", run, "--rank", 4, "--max-steps", 3, "--batch-size", 4,
         "--lr", "5e-2", "--dropout", 0.1, "--targets", targets, *extra)

    def fresh():
        return tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    ids = torch.tensor([tiny_tokenizer()("hello world what is the capital").input_ids])
    plain = logits(fresh())
    theirs = logits(peft.PeftModel.from_pretrained(fresh(), run).eval())
    ours = fresh()
    load_adapter(ours, run)
    lora("merge", run, "--output", d / "merged")
    merged = tf.AutoModelForCausalLM.from_pretrained(d / "merged", dtype=torch.float32).eval()
    lora("export", run, "--output", d / "export", "--dtype", "float32")
    exported = peft.PeftModel.from_pretrained(fresh(), d / "export").eval()
    lora("generate", "--model", base, "--adapter", run, "--prompt", "hello", "--max-new-tokens", 5)
    info = json.loads(lora("inspect", run, "--json").stdout)
    return {"adapter_effect": (theirs - plain).abs().max().item(), "ours_vs_peft": (logits(ours) - theirs).abs().max().item(),
            "merged_vs_peft": (logits(merged) - theirs).abs().max().item(),
            "export_vs_peft": (logits(exported) - theirs).abs().max().item(), "targets": info["target_modules"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(CONFIGS))
    ap.add_argument("--targets", default="attention")
    ap.add_argument("extra", nargs="*", help="more `lora train` flags, after --")
    args = ap.parse_args()
    unknown = [a for a in args.archs.split(",") if a not in CONFIGS]
    if unknown:
        ap.error(f"--archs: no tiny config for {', '.join(unknown)} (the sweep knows {', '.join(sorted(CONFIGS))})")
    failed = 0
    for arch in args.archs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                r = check(arch, Path(tmp), args.targets, args.extra)
            except Exception as e:  # one line per architecture, the sweep goes on
                print(f"FAIL {arch}: {e}", flush=True)
                failed += 1
                continue
        bad = r["adapter_effect"] < 1e-4 or max(r["ours_vs_peft"], r["merged_vs_peft"], r["export_vs_peft"]) > 1e-3
        failed += bad
        print(f"{'BAD ' if bad else 'ok  '} {arch} {json.dumps(r)}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
