"""Peak memory of the streaming `lora merge` against the model's size.

Writes a synthetic Llama-shaped base as sharded safetensors (no model is instantiated: shards are written
one at a time), a random rank-16 adapter on q/k/v/o, then runs `lora merge` in a child process and reads
its peak RSS. Results go to docs/benchmarks_merge.md.

    python scripts/bench_merge.py --layers 16 --hidden 2048     # ~2.6 GB of fp32 weights
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def write_base(d: Path, layers: int, hidden: int, inter: int, vocab: int, shard_layers: int) -> int:
    """A LlamaForCausalLM checkpoint, `shard_layers` decoder layers per shard; returns its size in bytes."""
    d.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
           "num_key_value_heads": hidden // 64, "vocab_size": vocab, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "float32"}
    (d / "config.json").write_text(json.dumps(cfg))
    weight_map, g = {}, torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    groups = [list(range(i, min(i + shard_layers, layers))) for i in range(0, layers, shard_layers)]
    n_shards = len(groups) + 1
    for s, group in enumerate(groups):
        t = {}
        for i in group:
            p = f"model.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                t[p + f"self_attn.{name}.weight"] = rand(hidden, hidden)
            t[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
            t[p + "mlp.up_proj.weight"] = rand(inter, hidden)
            t[p + "mlp.down_proj.weight"] = rand(hidden, inter)
            t[p + "input_layernorm.weight"] = torch.ones(hidden)
            t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(t, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        del t
    name = f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors"
    t = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
         "model.norm.weight": torch.ones(hidden)}
    save_file(t, str(d / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in t})
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                "weight_map": weight_map}))
    return size


def write_adapter(d: Path, layers: int, hidden: int, r: int = 16) -> None:
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    t = {}
    for i in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            t[key + ".lora_A.weight"] = torch.randn(r, hidden, generator=g) * 0.01
            t[key + ".lora_B.weight"] = torch.randn(hidden, r, generator=g) * 0.01
    save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
                                                       "lora_alpha": 2 * r, "target_modules": ["q_proj", "k_proj",
                                                                                               "v_proj", "o_proj"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--shard-layers", type=int, default=2)
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    size = write_base(tmp / "base", args.layers, args.hidden, 4 * args.hidden, 32000, args.shard_layers)
    write_adapter(tmp / "adapter", args.layers, args.hidden)
    shard = max(f.stat().st_size for f in (tmp / "base").glob("*.safetensors"))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "lora_cli", "merge", str(tmp / "adapter"), "--base",
                          str(tmp / "base"), "--output", str(tmp / "merged")], env={**os.environ})
    _, status, usage = os.wait4(p.pid, 0)
    assert status == 0, "merge failed"
    wall = time.perf_counter() - t0
    peak = usage.ru_maxrss * 1024
    idle = subprocess.run([sys.executable, "-c", "import resource, torch, safetensors, transformers;"
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"],
                          capture_output=True, text=True, check=True)
    base_rss = int(idle.stdout.strip())
    gb = 2**30
    lines = [
        "| model size (fp32 safetensors) | largest shard | shards | merge peak RSS | of which the Python + torch "
        "+ transformers process itself | wall time |",
        "|---|---|---|---|---|---|",
        f"| {size / gb:.2f} GB | {shard / gb:.2f} GB | {len(list((tmp / 'base').glob('*.safetensors')))} | "
        f"{peak / gb:.2f} GB ({100 * peak / size:.0f}% of the model) | {base_rss / gb:.2f} GB | {wall:.1f} s |",
    ]
    Path(args.docs).mkdir(exist_ok=True)
    (Path(args.docs) / "benchmarks_merge.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
