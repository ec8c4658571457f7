"""Data parallel on CPU (gloo): 2 processes × batch 2 see the same global batches as 1 × batch 4."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_cli.checkpoints import list_checkpoints

BIN = Path(sys.executable).parent
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


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


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_launched_process_ends_without_the_interpreters_clean_up(world):
    """Under torchrun, gloo's worker threads outlive destroy_process_group and release the last collective's
    tensors a moment after it completed: during the interpreter's finalization that aborted the process
    (SIGABRT, 'terminate called without an active exception') and failed a run that had finished. One of several
    processes now exits before finalizing: with its output flushed into a pipe, atexit functions run, and its
    exit code kept."""
    script = ("import atexit, sys\n"
              "from lora_cli.cli import main\n"
              "atexit.register(lambda: print('atexit ran', file=sys.stderr))\n"
              "class Finalized:\n"
              "    def __del__(self): print('finalized', file=sys.stderr)\n"
              "kept = Finalized()\n"
              "sys.argv = ['lora', *sys.argv[1:]]\n"
              "main()\n")
    env = {**os.environ, "WORLD_SIZE": world}
    for argv, code in ((["--help"], 0), (["inspect", "/nonexistent"], 1), (["--debug", "inspect", "/nonexistent"], 1)):
        r = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env)
        assert r.returncode == code, r.stderr
        assert "atexit ran" in r.stderr
        assert ("finalized" in r.stderr) == (world == "1")
        if "--debug" in argv:  # the traceback instead of the error line, then the same exit
            assert r.stderr.startswith("Traceback") and "UserError: adapter '/nonexistent' does not exist" in r.stderr
        elif code:
            assert r.stderr.startswith("error: adapter '/nonexistent' does not exist\n")
        else:
            assert r.stdout.startswith("Usage: lora") and "inspect" in r.stdout and r.stdout.endswith("\n")


def test_two_processes_give_the_same_adapter(tmp_path, tiny_llama, chat_data):
    # one eval record for two processes: the one without an eval batch skipped its forward, and the other waited
    # in DDP's forward for it forever
    evals = tmp_path / "eval.jsonl"
    evals.write_text(Path(chat_data).read_text().splitlines()[0] + "\n")
    more = ["--eval-data", str(evals), "--eval-every", "2"]
    run([sys.executable, "-m", "lora_cli", *args(tiny_llama, chat_data, tmp_path / "one", 4), *more])
    launch = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lora_cli"]
    r = run([*launch, *args(tiny_llama, chat_data, tmp_path / "two", 2), *more])
    a, b = load_file(str(tmp_path / "one/adapter_model.safetensors")), load_file(str(tmp_path / "two/adapter_model.safetensors"))
    for k in a:
        assert ((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) < 1e-4, k
    s1 = json.loads((tmp_path / "one/train_summary.json").read_text())
    s2 = json.loads((tmp_path / "two/train_summary.json").read_text())
    assert s1["world_size"] == 1 and s2["world_size"] == 2
    assert s2["loss_tokens_seen"] == s1["loss_tokens_seen"]
    assert s2["final_loss"] == pytest.approx(s1["final_loss"], rel=1e-4)
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-4)
    assert r.stderr.count("lora train") == 1  # only the main process talks
    assert r.stdout == ""  # (unwrapping the DDP model through Accelerate had DeepSpeed print its CPU warning there)
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
    # process 1 slow to reach the resume's clean-up of metrics.jsonl: it rewrote the file after process 0 had
    # opened it to append, and the rows of the resumed steps were lost (1 resume in 14 lost them unprovoked)
    slow = tmp_path / "slow_rank.py"
    slow.write_text("import os, time\n"
                    "import lora_cli.training as t\n"
                    "truncate = t._truncate_metrics\n"
                    "def late(*a):\n"
                    "    if os.environ['RANK'] == '1':\n"
                    "        time.sleep(2)\n"
                    "    return truncate(*a)\n"
                    "t._truncate_metrics = late\n"
                    "from lora_cli.cli import main\n"
                    "main()\n")
    run([*launch[:-2], str(slow), "train", "--output", str(tmp_path / "cut"), "--resume"])
    a = load_file(str(tmp_path / "full/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut/adapter_model.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("full", "cut")}
    assert [r["step"] for r in rows["cut"]] == [r["step"] for r in rows["full"]] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows["cut"]] == pytest.approx([r["loss"] for r in rows["full"]], rel=1e-5)


def launch_env(config: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file configs/accelerate/<config>.yaml` sets, computed by
    Accelerate's own launcher code: the shipped configs are what is tested."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = Path(__file__).parents[1] / "configs/accelerate" / f"{config}.yaml"
    a, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x"]))
    if not a.use_deepspeed:
        return prepare_multi_gpu_env(a)
    a.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    # DeepSpeed on its CPU accelerator (gloo); tests/sharded_on_cpu.py lets Accelerate use it there
    return {**prepare_deepspeed_cmd_env(a)[1], "DS_ACCELERATOR": "cpu", "ACCELERATE_TORCH_DEVICE": "cpu"}


SHARDED = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(Path(__file__).parent / "sharded_on_cpu.py")]


def adapters_close(a, b, rel):
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert ((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) < rel, k


@pytest.mark.parametrize("config,engine", [
    ("fsdp", "FSDP"),
    pytest.param("deepspeed-zero2", "DeepSpeed", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="no deepspeed")),
    pytest.param("deepspeed-zero3", "DeepSpeed", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="no deepspeed")),
])
def test_sharded_training_gives_the_same_adapter_and_resumes_exactly(config, engine, tmp_path, tiny_llama, chat_data,
                                                                      monkeypatch):
    """FSDP2 and DeepSpeed ZeRO-2/3 with the shipped configs on 2 CPU processes: the adapter is gathered whole
    (not rank 0's shard: under ZeRO-3 that is an empty tensor), equals 1 process × batch 4 (here 2 × batch 1 ×
    2 accumulation steps), and a resume gives every rank its own optimizer shard back."""
    evals = ["--eval-split", "0.25", "--eval-every", "2"]  # (an eval left FSDP2's parameters gathered: saving failed)
    run([sys.executable, "-m", "lora_cli", *args(tiny_llama, chat_data, tmp_path / "one", 4), *evals])
    env = launch_env(config)
    if config == "deepspeed-zero3":  # partition even these tiny weights (ZeRO-3 keeps those < 1e5 whole)
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
        env = {k: v for k, v in env.items()
               if not k.startswith(("ACCELERATE_DEEPSPEED_", "ACCELERATE_GRADIENT_", "ACCELERATE_CONFIG_DS_FIELDS"))}
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = run([*SHARDED, *args(tiny_llama, chat_data, tmp_path / "sharded", 1), "--grad-accum", "2", *evals])
    assert f"2 processes ({engine})" in r.stderr
    summary = json.loads((tmp_path / "sharded/train_summary.json").read_text())
    assert summary["parallelism"] == engine and summary["world_size"] == 2
    one_summary = json.loads((tmp_path / "one/train_summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(one_summary["eval_loss"], rel=1e-4)
    # the model's size, not this process's partition of it (ZeRO-3 leaves each process empty tensors)
    assert (summary["total_params"], summary["trainable_params"]) == \
        (one_summary["total_params"], one_summary["trainable_params"])
    one = load_file(str(tmp_path / "one/adapter_model.safetensors"))
    sharded = load_file(str(tmp_path / "sharded/adapter_model.safetensors"))
    adapters_close(one, sharded, 1e-4)

    import shutil

    shutil.copytree(tmp_path / "sharded", tmp_path / "cut")  # as if interrupted after step 2
    for s, d in list_checkpoints(tmp_path / "cut"):
        if s > 2:
            shutil.rmtree(d)
    (tmp_path / "cut/adapter_model.safetensors").unlink()
    shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
    run([*SHARDED, "train", "--output", str(tmp_path / "cut"), "--resume"])
    adapters_close(sharded, load_file(str(tmp_path / "cut/adapter_model.safetensors")), 1e-6)

    # --batch-size is per process: resuming with another process count would change the run, so it is refused
    for k in env:
        monkeypatch.delenv(k)
    r1 = subprocess.run([sys.executable, "-m", "lora_cli", "train", "--output", str(tmp_path / "cut1"), "--resume"],
                        capture_output=True, text=True)
    assert r1.returncode == 1
    assert "error: step-000002 was written by 2 process(es) and this resume runs 1" in r1.stderr
    assert not (tmp_path / "cut1/adapter_model.safetensors").exists()


@pytest.mark.parametrize("rank,sig,hook", [("0", "SIGINT", "save_checkpoint"), ("1", "SIGTERM", "rng_state")])
def test_a_signal_during_a_checkpoint_save_stops_every_process_at_the_same_step(tmp_path, tiny_llama, chat_data,
                                                                                rank, sig, hook):
    """Ctrl-C landing on rank 0 while it wrote a periodic checkpoint: rank 0 re-read its own flag after the save
    and stopped alone, rank 1 went on into the next step: a deadlock, then an internal error. The processes
    now agree, after the save, to stop at the step just saved (not one step and checkpoint later), with the
    resume line. A signal to another process is named too (rank 0 said 'stopped by SIGNAL' and exited 1)."""
    script = tmp_path / "signal_in_save.py"
    script.write_text(
        "import os, signal, sys\n"
        "import lora_cli.training as t\n"
        f"real = t.{hook}\n"
        "calls = []\n"
        "def hooked(*a, **k):\n"
        "    calls.append(1)\n"
        f"    if len(calls) == 1 and os.environ['RANK'] == '{rank}':  # at step 2's save\n"
        f"        os.kill(os.getpid(), signal.{sig})  # arrives while this process is saving\n"
        "    return real(*a, **k)\n"
        f"t.{hook} = hooked\n"
        "from lora_cli.cli import main\n"
        "main(sys.argv[1:])\n")
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script),
           *args(tiny_llama, chat_data, tmp_path / "run", 2)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # the deadlock: take the workers down too, not torchrun alone
        import signal

        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the processes did not stop (a deadlock)")
    said = " ".join(stderr.split())
    assert f"error: stopped by {sig} after step 2; checkpoint saved. Resume with: lora train --output" in said, said[-3000:]
    assert "(launched as this run was, on 2 processes)" in said and "internal error" not in said
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
