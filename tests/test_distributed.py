"""Data parallel on CPU (gloo): 2 processes × batch 2 see the same global batches as 1 × batch 4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_cli.checkpoints import list_checkpoints

BIN = Path(sys.executable).parent


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def args(model, data, out, bs):
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "5",
            "--batch-size", str(bs), "--dropout", "0", "--lr", "1e-2", "--save-every", "2"]


def test_accelerate_launch_runs_the_cli(tmp_path, tiny_llama, chat_data):
    # on CPU `accelerate launch` starts one process (several need mpirun); on GPUs it wraps torchrun
    run([sys.executable, "-m", "lora_cli", *args(tiny_llama, chat_data, tmp_path / "plain", 4)])
    run([str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "lora_cli", *args(tiny_llama, chat_data, tmp_path / "acc", 4)])
    a = load_file(str(tmp_path / "plain/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "acc/adapter_model.safetensors"))
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def test_two_processes_give_the_same_adapter(tmp_path, tiny_llama, chat_data):
    run([sys.executable, "-m", "lora_cli", *args(tiny_llama, chat_data, tmp_path / "one", 4)])
    launch = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lora_cli"]
    r = run([*launch, *args(tiny_llama, chat_data, tmp_path / "two", 2)])
    a, b = load_file(str(tmp_path / "one/adapter_model.safetensors")), load_file(str(tmp_path / "two/adapter_model.safetensors"))
    for k in a:
        assert ((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) < 1e-4, k
    s1 = json.loads((tmp_path / "one/train_summary.json").read_text())
    s2 = json.loads((tmp_path / "two/train_summary.json").read_text())
    assert s1["world_size"] == 1 and s2["world_size"] == 2
    assert s2["loss_tokens_seen"] == s1["loss_tokens_seen"]
    assert s2["final_loss"] == pytest.approx(s1["final_loss"], rel=1e-4)
    assert r.stderr.count("lora train") == 1  # only the main process talks
    ckpt = list_checkpoints(tmp_path / "two")[-1][1]
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()


def test_resume_under_ddp(tmp_path, tiny_llama, chat_data):
    launch = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lora_cli"]
    run([*launch, *args(tiny_llama, chat_data, tmp_path / "full", 2)])
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "cut")  # as if interrupted after step 2
    for s, d in list_checkpoints(tmp_path / "cut"):
        if s > 2:
            shutil.rmtree(d)
    (tmp_path / "cut/adapter_model.safetensors").unlink()
    run([*launch, "train", "--output", str(tmp_path / "cut"), "--resume"])
    a = load_file(str(tmp_path / "full/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut/adapter_model.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
