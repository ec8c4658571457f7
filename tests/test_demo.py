"""The demo, shortened: a real pretrained model (SmolLM2-135M-Instruct GGUF) learns the task, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_demo_improves_by_a_wide_margin_and_merge_is_exact(tmp_path, smollm2_gguf):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/demo.py"), "--out", str(tmp_path), "--max-steps", "25",
                        "--eval-records", "20"], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["exact_match_before"] <= 0.1
    assert res["exact_match_after"] >= res["exact_match_before"] + 0.6
    assert abs(res["exact_match_merged"] - res["exact_match_after"]) <= 0.05
    assert res["merge_verify_max_abs_logit_diff"] < 1e-3
    said = " ".join(r.stdout.split())  # (rich wraps the lines)
    assert "note: the GGUF base is dequantized to float32, and so is the merged model" in said
    assert "(1 shard(s), float32, the base's)" in said
    assert res["adapter_mb_fp16"] < 0.05 * res["model_mb"]
    # the run directory is a PEFT adapter of a dequantized GGUF base, and says so
    facts = json.loads(subprocess.run([sys.executable, "-m", "lora_cli", "inspect", str(tmp_path / "run"), "--json"],
                                      capture_output=True, text=True, check=True).stdout)
    assert facts["base_is_gguf"] and facts["r"] == 16
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "dequantized" in card
    # the card's own PEFT snippet loads the GGUF base (a plain from_pretrained of the .gguf path does not)
    snippet = card.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(tmp_path / "adapter"))
    assert 'gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"' in snippet
    space: dict = {}
    exec(snippet, space)
    assert type(space["model"]).__name__ == "PeftModelForCausalLM" and space["model"].peft_config["default"].r == 16


@pytest.mark.slow
def test_generate_on_the_gguf_writes_only_the_answer_on_stdout(tmp_path, smollm2_gguf):
    """The first use converts the GGUF (transformers' save_pretrained, which imports DeepSpeed where it is installed:
    on a CPU it printed 'Setting accelerator to CPU' on stdout, before the answer); the second reads the cache."""
    env = {**os.environ, "LORA_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "lora_cli", "generate", "--model", str(smollm2_gguf),
           "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]
    first, again = (subprocess.run(cmd, capture_output=True, text=True, env=env) for _ in range(2))
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout == "The capital of France is Paris.\n"
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf to safetensors once" in first.stderr
    assert "converting" not in again.stderr
