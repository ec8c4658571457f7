"""Checkpoints, exact resume, signals, non-finite loss and the run lock."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_cli.checkpoints import list_checkpoints


def adapter(run):
    return load_file(str(run / "adapter_model.safetensors"))


@pytest.mark.parametrize("scheduler,steps,resume_from", [("constant", 6, 3), ("cosine", 10, 3), ("linear", 9, 4)])
def test_resume_is_exact(cli, tiny_llama, chat_data, tmp_path, scheduler, steps, resume_from):
    # 16 records / batch 4 = 4 steps per epoch: resuming at 3 or 4 crosses epoch boundaries afterwards
    args = ["--model", tiny_llama, "--data", chat_data, "--max-steps", steps, "--scheduler", scheduler,
            "--dropout", "0.1", "--lr", "5e-3", "--warmup", "2", "--save-every", "1", "--save-total-limit", "100"]
    full = tmp_path / "full"
    assert cli("train", *args, "--output", full)[0] == 0
    assert [s for s, _ in list_checkpoints(full)] == list(range(1, steps + 1))
    # what an interruption after step `resume_from` leaves behind: its checkpoint, no later files
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for s, d in list_checkpoints(cut):
        if s > resume_from:
            shutil.rmtree(d)
    for name in ("adapter_model.safetensors", "train_summary.json"):
        (cut / name).unlink()
    code, _, err = cli("train", "--output", cut, "--resume")
    assert code == 0, err
    a, b = adapter(full), adapter(cut)
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
    rows = lambda r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in rows(cut)] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows(cut)] == pytest.approx([r["loss"] for r in rows(full)], rel=1e-6)


@pytest.mark.parametrize("scheduler", ["cosine", "linear"])
def test_resume_with_more_steps_follows_the_new_schedule(cli, tiny_llama, chat_data, tmp_path, scheduler):
    """A finished 3-step run resumed to 5 steps: steps 4 and 5 take the 5-step schedule's lr (step 4 took
    the optimizer's saved lr, the old schedule's end: 0 for cosine)."""
    from lora_cli.training import lr_factor

    args = ["--model", tiny_llama, "--data", chat_data, "--scheduler", scheduler, "--lr", "1e-2", "--warmup", "1",
            "--dropout", "0", "--save-every", "1"]
    assert cli("train", *args, "--max-steps", "3", "--output", tmp_path / "run")[0] == 0
    code, _, err = cli("train", "--output", tmp_path / "run", "--max-steps", "5", "--resume")
    assert code == 0, err
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert lrs[3:] == pytest.approx([1e-2 * lr_factor(s, 5, 1, scheduler) for s in (3, 4)], rel=1e-9)
    assert lrs[:3] == pytest.approx([1e-2 * lr_factor(s, 3, 1, scheduler) for s in (0, 1, 2)], rel=1e-9)
    assert min(lrs[3:]) > 0


def test_resume_keeps_base_frozen_and_does_not_wrap_twice(cli, tiny_llama, chat_data, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "2",
               "--save-every", "1")[0] == 0
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "4")
    assert code == 0, err
    t = adapter(run)
    assert not any("base_layer" in k or ".lora_A.lora_A" in k for k in t)
    assert json.loads((run / "train_summary.json").read_text())["trainable_params"] == \
        sum(v.numel() for v in t.values())


def test_resume_refuses_data_that_changed_since_the_checkpoint(cli, tiny_llama, chat_data, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(chat_data, data)
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", data, "--output", run, "--max-steps", "2",
               "--save-every", "1")[0] == 0
    original = data.read_text()
    data.write_text(original.replace("purple", "orange"))  # same records, other tokens
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "4")
    assert code == 1 and "the training data is not the run's any more" in err and "step-000002" in err
    data.write_text(original)
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "4")
    assert code == 0, err


def test_save_total_limit_keeps_newest_plus_best(cli, tiny_llama, chat_data, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "8",
               "--save-every", "1", "--save-total-limit", "2", "--eval-split", "0.25", "--eval-every", "1",
               "--lr", "1e-2")[0] == 0
    kept = [s for s, _ in list_checkpoints(run)]
    best = json.loads((run / "train_summary.json").read_text())["best_eval_step"]
    assert kept[-2:] == [7, 8] and set(kept) == {7, 8, best}
    state = json.loads((run / "checkpoints/step-000008/trainer_state.json").read_text())
    assert state["step"] == 8 and len(state["eval_history"]) == 8


def _train_proc(tiny_llama, chat_data, run, *extra, ignore_sigint=False):
    cmd = [sys.executable, "-m", "lora_cli", "train", "--model", str(tiny_llama), "--data", str(chat_data),
           "--output", str(run), "--max-steps", "100000", "--save-every", "100000", *extra]
    # (else as the test runs: a background job of a shell ignores SIGINT, and its children inherit that)
    pre = functools.partial(signal.signal, signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.SIG_DFL)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pre)


def _wait_for_steps(run, n=2, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = run / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tiny_llama, chat_data, tmp_path, sig):
    run = tmp_path / "run"
    # SIGINT ignored at start, as in a background job of a non-interactive shell
    p = _train_proc(tiny_llama, chat_data, run, ignore_sigint=True)
    _wait_for_steps(run)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err  # as a shell reports a process ended by the signal: 130, 143
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {sig.name} after step") and f"lora train --output {run} --resume" in last
    step = int(last.split("after step ")[1].split(";")[0])
    assert [s for s, _ in list_checkpoints(run)] == [step]
    r = subprocess.run([sys.executable, "-m", "lora_cli", "train", "--output", str(run), "--resume",
                        "--max-steps", str(step + 2)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "train_summary.json").read_text())["steps"] == step + 2


def test_locked_run_directory_is_refused(cli, tiny_llama, chat_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--force",
                           "--max-steps", "1")
    assert code == 1 and "in use by another lora run" in err
    assert (run / ".lock").exists()  # (another run's lock: never removed by the run it refused)


def test_a_run_folder_keeps_no_lock_file_after_the_run(cli, tiny_llama, chat_data, tmp_path):
    """`.lock` stayed in every finished run folder (and went along when the folder was uploaded as is)."""
    from lora_cli.checkpoints import run_lock
    from lora_cli.errors import UserError

    run = tmp_path / "run"
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "1")
    assert code == 0, err
    assert not (run / ".lock").exists() and (run / "adapter_model.safetensors").exists()
    with run_lock(run):
        assert (run / ".lock").exists()
        with pytest.raises(UserError, match="in use by another lora run"), run_lock(run):
            pass
        assert (run / ".lock").exists()  # the refused one leaves the holder's lock alone
    assert not (run / ".lock").exists()
    with run_lock(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()  # created for nothing: removed


@pytest.mark.parametrize("lr", ["1e30", "1e9"])
def test_non_finite_training_stops_and_keeps_only_finite_checkpoints(cli, tiny_llama, chat_data, tmp_path, lr):
    """lr 1e30 makes the loss non-finite; lr 1e9 makes the weights NaN one step before the loss shows it (a
    checkpoint of that step was kept as 'the last good one', NaN throughout)."""
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "50",
                       "--lr", lr, "--warmup", "0", "--save-every", "1", "--max-grad-norm", "0")
    assert code == 1 and ("the loss became" in err or "the adapter weights became inf or NaN" in err), err
    bad_step = int(err.split("at step ")[1].split(" ")[0].rstrip(";"))
    kept = [s for s, _ in list_checkpoints(run)]
    assert kept and max(kept) == bad_step - 1
    assert f"the last good checkpoint is kept: {run / f'checkpoints/step-{max(kept):06d}'}" in " ".join(err.split())
    for _, d in list_checkpoints(run):
        t = load_file(str(d / "adapter_model.safetensors"))
        assert all(torch.isfinite(v).all() for v in t.values())


def test_weights_blown_up_at_the_first_step_leave_no_checkpoint(cli, tiny_llama, chat_data, tmp_path):
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", tmp_path / "run",
                       "--max-steps", "5", "--lr", "1e38", "--warmup", "0", "--save-every", "1",
                       "--max-grad-norm", "0", "--weight-decay", "1e38")
    assert code == 1 and "became inf or NaN at step 1" in err and "(no checkpoint was saved)" in err, err
    assert list_checkpoints(tmp_path / "run") == []


def test_optimizer_state_is_saved_by_parameter_name_and_restored_exactly():
    """Keyed by name (the form FSDP's full state dict uses, so checkpoints move between engines); a
    position-keyed state from before loads too."""
    from lora_cli.checkpoints import load_optimizer_state, optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    for _ in range(2):
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
    sd = optimizer_state(model, opt, "none")
    assert list(sd["state"]) == ["0.bias", "1.weight", "1.bias"] == sd["param_groups"][0]["params"]
    for saved in (sd, opt.state_dict()):
        fresh = torch.optim.AdamW(params, lr=0.1)
        load_optimizer_state(model, fresh, saved, "none")
        for p in params:
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(fresh.state[p][k], opt.state[p][k])


def test_resume_reads_the_config_file_and_the_run_names_its_files_absolutely(cli, tiny_llama, chat_data, tmp_path,
                                                                             monkeypatch):
    """train_config.yaml names local files absolutely (a resume from another folder reads the same data), and
    a --config YAML counts like flags on --resume: what may change applies, what may not is refused."""
    import yaml

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copy(chat_data, work / "chats.jsonl")
    monkeypatch.chdir(work)
    assert cli("train", "--model", tiny_llama, "--data", "chats.jsonl", "--output", "run", "--max-steps", "2",
               "--save-every", "1", "--dropout", "0")[0] == 0
    run = work / "run"
    saved = yaml.safe_load((run / "train_config.yaml").read_text())
    assert saved["data"] == str(work / "chats.jsonl") and saved["output"] == str(run)
    (work / "same.yaml").write_text("data: chats.jsonl\nmax_steps: 3\n")  # relative, but the same file
    code, _, err = cli("train", "--output", "run", "--resume", "--config", "same.yaml")
    assert code == 0, err
    monkeypatch.chdir(elsewhere)
    (elsewhere / "rank.yaml").write_text("rank: 4\n")
    code, _, err = cli("train", "--output", run, "--resume", "--config", "rank.yaml")
    assert code == 1 and err.startswith("error: --resume cannot change --rank"), err
    (elsewhere / "longer.yaml").write_text("max_steps: 4\n")
    code, _, err = cli("train", "--output", run, "--resume", "--config", "longer.yaml")
    assert code == 0, err
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_checkpoint_is_named_without_torchs_unsafe_advice(cli, tiny_llama, chat_data, tmp_path, damage):
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "2",
               "--save-every", "1")[0] == 0
    opt = list_checkpoints(run)[-1][1] / "optimizer.pt"
    data = opt.read_bytes()
    opt.write_bytes(b"garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "3")
    assert code == 1 and err.startswith(f"error: checkpoint {opt.parent} is unreadable ("), err
    assert "the file is damaged" in err and "weights_only" not in err and len(err.splitlines()) == 1
    opt.write_bytes(data)  # a missing RNG state (resumed without it, silently: the dropout masks would differ)
    (opt.parent / "rng_state_0.pt").unlink()
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "3")
    assert code == 1 and f"checkpoint {opt.parent} lacks rng_state_0.pt, so the run cannot continue exactly" in err
    (opt.parent / "adapter_model.safetensors").write_bytes(b"broken")  # its adapter: the same advice
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "3")
    assert code == 1 and f"delete the checkpoint {opt.parent} to resume from an earlier one" in err, err


def test_the_best_eval_is_kept_when_evals_and_saves_do_not_line_up(cli, tiny_llama, chat_data, tmp_path):
    """--eval-every 3 with --save-every 4: the best eval (step 3 or 6, with an lr that overshoots after it) fell
    between saves and was lost."""
    from conftest import write_jsonl

    other = write_jsonl(tmp_path / "other.jsonl", [{"messages": [
        {"role": "user", "content": f"What is color {i}?"}, {"role": "assistant", "content": "Not purple, green."}]}
        for i in range(4)])
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--eval-data", other, "--output", run,
                       "--max-steps", "8", "--eval-every", "3", "--save-every", "4", "--save-total-limit", "1",
                       "--lr", "2", "--scheduler", "constant", "--warmup", "0", "--dropout", "0")
    assert code == 0, err
    summary = json.loads((run / "train_summary.json").read_text())
    kept = [s for s, _ in list_checkpoints(run)]
    best = summary["best_eval_step"]  # 6 or 3 (library versions differ in the last digits): between saves either way
    assert best in (3, 6) and kept == [best, 8], (kept, summary["eval_history"])
    state = json.loads((run / f"checkpoints/step-{summary['best_eval_step']:06d}/trainer_state.json").read_text())
    assert state["eval_history"][-1]["eval_loss"] == summary["best_eval_loss"]


def test_resume_drops_a_metrics_row_cut_short(cli, tiny_llama, chat_data, tmp_path):
    """A full disk or a power cut can leave half a JSON line at the end of metrics.jsonl (dropped quietly); a
    damaged line elsewhere is dropped with a warning naming it."""
    run = tmp_path / "run"
    args = ("--model", tiny_llama, "--data", chat_data, "--max-steps", "4", "--save-every", "2", "--dropout", "0")
    assert cli("train", *args, "--output", run)[0] == 0
    full = (run / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(run / "checkpoints/step-000004")
    for name in ("adapter_model.safetensors", "train_summary.json"):
        (run / name).unlink()
    (run / "metrics.jsonl").write_text("\n".join(full[:1] + ["\x00\x00garbage"] + full[1:3])
                                       + '\n{"step": 4, "epoch": 1.0, "lo')
    code, out, err = cli("train", "--output", run, "--resume")
    assert code == 0, err
    said = " ".join((out + err).split())
    assert "warning: " in said and "dropped 1 line(s) that are not metric rows (line 2)" in said, said  # path may wrap
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([json.loads(x)["loss"] for x in full], rel=1e-6)


def test_resume_finishes_a_run_stopped_while_writing_its_last_files(cli, tiny_llama, chat_data, tmp_path):
    """The last checkpoint was saved but the process died before train_summary.json: --resume writes the run's
    final files (it said 'already reached step 4 of 4' and the run stayed without them)."""
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--max-steps", "4", "--output", run)[0] == 0
    adapter_before = adapter(run)
    for name in ("adapter_model.safetensors", "train_summary.json", "loss.png"):
        (run / name).unlink(missing_ok=True)
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "3")  # below the checkpoint: it was
    assert code == 1 and "last checkpoint is at step 4, past the 3 steps asked" in " ".join(err.split())  # "done"
    assert "max_steps: 4" in (run / "train_config.yaml").read_text()  # and the run's length was lost
    code, _, err = cli("train", "--output", run, "--resume")
    assert code == 0, err
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 4
    assert all(torch.equal(adapter_before[k], v) for k, v in adapter(run).items())
    code, _, err = cli("train", "--output", run, "--resume")  # now it is done
    assert code == 1 and "already reached step 4 of 4" in err


def test_a_run_resumed_to_its_checkpoints_step_still_evaluates_at_the_end(cli, tiny_llama, chat_data, tmp_path):
    """Stopped after step 4 of 6, resumed with --max-steps 4: no step was left to run, so the end's evaluation
    never happened (eval_loss null in the summary and the model card)."""
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--max-steps", "6", "--save-every", "2",
               "--eval-split", "0.25", "--output", run)[0] == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_summary.json", "loss.png"):
        (run / name).unlink()  # as a stop after step 4 leaves the run
    shutil.rmtree(run / "checkpoints" / "step-000006")
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "4")
    assert code == 0, err
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 4 and [h["step"] for h in summary["eval_history"]] == [4]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["eval_loss"] == round(summary["eval_loss"], 6)
    assert "loss" in rows[-1]  # the step's own row, not another


def test_resume_removes_what_a_killed_run_was_writing(cli, tiny_llama, chat_data, tmp_path):
    """kill -9 during a checkpoint save leaves its temp folder (named with the host and pid that wrote it)."""
    import socket

    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--max-steps", "2", "--save-every", "1",
               "--output", run)[0] == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname().replace(".", "_")
    stale = run / f"checkpoints/.step-000003.{host}-{dead}.k3j_x9.tmp"
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"half")
    other_host = run / f"checkpoints/.step-000003.otherbox-{dead}.aa.tmp"  # may be alive elsewhere: kept
    other_host.mkdir()
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "3")
    assert code == 0, err
    assert not stale.exists() and other_host.exists()


def test_a_damaged_run_config_is_named_as_the_run_s(cli, tiny_llama, chat_data, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--max-steps", "1", "--output", run)[0] == 0
    (run / "train_config.yaml").write_text("rank: [4\n")
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "2")
    assert code == 1 and f"--resume: the run's {run / 'train_config.yaml'}: not valid YAML" in " ".join(err.split())
    assert "--config" not in err


def test_a_checkpoint_says_which_step_its_eval_loss_is_from(cli, tiny_llama, chat_data, tmp_path):
    """Step 4's checkpoint carries the eval of step 3: inspect and the exported model card said 'eval loss'
    as if it were step 4's."""
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--max-steps", "5", "--save-every", "2",
               "--eval-split", "0.25", "--eval-every", "3", "--output", run)[0] == 0
    ckpt = run / "checkpoints/step-000004"
    code, out, err = cli("inspect", ckpt)
    assert code == 0 and "(at step 3)" in out, out
    assert cli("export", ckpt, "--output", tmp_path / "x")[0] == 0
    card = (tmp_path / "x/README.md").read_text()
    assert "| eval loss |" in card and "(at step 3)" in card
    assert cli("inspect", run)[0] == 0 and "(at step" not in cli("inspect", run)[1]  # the run's own: its last step


def test_resume_takes_the_command_or_dry_run_yaml_that_started_the_run(cli, tiny_llama, chat_data, tmp_path):
    """The dry-run YAML writes max_length 1024 down; the run lowered it to the model's context (256) and saved
    that: resuming from the same YAML was refused as a change of --max-length. A length the run was given
    (below the context) is still not changed by the default."""
    out = tmp_path / "run"
    code, yaml_text, _ = cli("train", "-m", tiny_llama, "--data", chat_data, "--max-steps", "2", "-o", out,
                             "--dry-run")
    assert code == 0 and "max_length: 1024" in yaml_text
    (tmp_path / "run.yaml").write_text(yaml_text)
    assert cli("train", "--config", tmp_path / "run.yaml")[0] == 0
    code, _, err = cli("train", "--config", tmp_path / "run.yaml", "--resume", "--max-steps", "3")
    assert code == 0, err
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3

    assert cli("train", "-m", tiny_llama, "--data", chat_data, "--max-steps", "2", "--max-length", "128",
               "-o", tmp_path / "short")[0] == 0
    code, _, err = cli("train", "-m", tiny_llama, "--data", chat_data, "--max-length", "1024", "-o",
                       tmp_path / "short", "--resume", "--max-steps", "3")
    assert code == 1 and err.startswith("error: --resume cannot change --max-length"), err


def test_a_run_saved_with_the_old_eval_split_default_resumes(cli, tiny_llama, chat_data, tmp_path):
    """Runs saved `eval_data_split: test` (the default until it became none) with a data file, which has no
    split to pick: resuming them must not fail on it."""
    out = tmp_path / "run"
    assert cli("train", "-m", tiny_llama, "--data", chat_data, "--max-steps", "2", "-o", out)[0] == 0
    saved = (out / "train_config.yaml").read_text()
    assert "eval_data_split: null" in saved
    (out / "train_config.yaml").write_text(saved.replace("eval_data_split: null", "eval_data_split: test"))
    code, _, err = cli("train", "-o", out, "--resume", "--max-steps", "3")
    assert code == 0, err
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3


def test_resume_with_epochs_extends_a_run_started_with_max_steps(cli, tiny_llama, chat_data, tmp_path):
    """--epochs is a resume override, and the message at a run's end says to raise it: the saved --max-steps
    won over it, so nothing could extend such a run by epochs."""
    out = tmp_path / "run"
    assert cli("train", "-m", tiny_llama, "--data", chat_data, "--batch-size", "4", "--max-steps", "3", "-o",
               out)[0] == 0
    code, _, err = cli("train", "-o", out, "--resume", "--epochs", "2")
    assert code == 0, err
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 8  # 16 records / 4 × 2 epochs
    assert yaml.safe_load((out / "train_config.yaml").read_text())["max_steps"] is None


def _train_with_workers(tiny_llama, tmp_path):
    """A run tokenizing 20,000 long chats in 2 worker processes, and their pids once both are forked."""
    data = tmp_path / "d.jsonl"
    turn = [{"role": "user", "content": "q " * 40}, {"role": "assistant", "content": "a " * 40}]
    data.write_text((json.dumps({"messages": turn * 10}) + "\n") * 20000)
    p = _train_proc(tiny_llama, data, tmp_path / "run", "--num-proc", "2")
    t0 = time.time()
    children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
    while len(children.read_text().split()) < 2 and time.time() - t0 < 120:
        time.sleep(0.05)
    workers = children.read_text().split()
    assert len(workers) == 2
    return p, workers


def _finish(p: subprocess.Popen, workers: list[str]) -> str:
    """The run's stderr once it ends; one still running after 2 minutes is killed with its workers (a hang)."""
    try:
        return p.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        for pid in [p.pid, *map(int, workers)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.communicate()
        raise AssertionError("the run hung") from None


def _running(pid: str) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(FileNotFoundError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_workers_tokenize_stops_them_quietly(tiny_llama, tmp_path, sig):
    """The tokenizing workers inherited the CLI's SIGTERM handler: stopping them printed a traceback each."""
    p, workers = _train_with_workers(tiny_llama, tmp_path)
    p.send_signal(sig)
    err = _finish(p, workers)
    assert p.returncode == 128 + sig and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("error: interrupted" if sig == signal.SIGINT else "error: terminated")
    assert not any(Path(f"/proc/{w}").exists() for w in workers)


def test_a_killed_tokenizing_worker_is_an_error_not_a_hang(tiny_llama, tmp_path):
    """multiprocessing.Pool started a new worker and waited forever for the killed one's block."""
    p, workers = _train_with_workers(tiny_llama, tmp_path)
    os.kill(int(workers[0]), signal.SIGKILL)
    err = _finish(p, workers)
    assert p.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("error: a tokenizing worker process died (killed, or out of memory?); "
                                            "run again with fewer (--num-proc 1)")
    assert not any(Path(f"/proc/{w}").exists() for w in workers)


def test_tokenizing_workers_end_with_their_parent(tiny_llama, tmp_path):
    """Killed with -9, the parent cannot stop them: they were left running, and printed BrokenPipeError tracebacks."""
    p, workers = _train_with_workers(tiny_llama, tmp_path)
    p.kill()
    err = _finish(p, workers)
    t0 = time.time()
    while any(map(_running, workers)) and time.time() - t0 < 30:
        time.sleep(0.1)
    assert not any(map(_running, workers))
    assert "Traceback" not in err, err


def test_resume_reads_a_target_list_however_it_was_spaced(cli, tiny_llama, chat_data, tmp_path):
    """A run started with --targets "q_proj, v_proj" refused --resume --targets q_proj,v_proj (the same modules)."""
    from lora_cli.config import TrainConfig

    assert TrainConfig(targets=" q_proj , v_proj,").resolved().targets == "q_proj,v_proj"
    assert TrainConfig(targets="re:.*(q|v)_proj, ").resolved().targets == "re:.*(q|v)_proj, "  # a pattern as written
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "1",
                       "--targets", "q_proj, v_proj")
    assert code == 0, err
    assert "targets: q_proj,v_proj\n" in (run / "train_config.yaml").read_text()
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "2", "--targets", "q_proj,v_proj")
    assert code == 0, err


def test_a_run_in_training_is_never_replaced_or_read_as_finished(cli, tiny_llama, chat_data, tmp_path):
    """merge/export --force deleted a run folder a lora train was still writing (they checked the lock of their
    input only), and a finished run being continued by --resume was merged, exported and generated from with
    the adapter of the end it no longer has."""
    from lora_cli.checkpoints import run_lock

    run, other = tmp_path / "run", tmp_path / "other"
    for d in (run, other):
        assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", d, "--max-steps", "1")[0] == 0
    with run_lock(run):  # as a `lora train --resume` holds it
        for command in (("export", other, "--output", run, "--force"), ("merge", other, "--output", run, "--force")):
            code, _, err = cli(*command)
            assert code == 1 and f"--output {run} is a run still training (a lora train holds it); --force will " \
                                  "not replace it" in err, err
        for command in (("merge", run, "--output", tmp_path / "m"), ("export", run, "--output", tmp_path / "x"),
                        ("inspect", run), ("generate", "--model", tiny_llama, "--adapter", run, "--prompt", "hi")):
            code, _, err = cli(*command)
            assert code == 1 and f"'{run}' is a run still training (a lora train holds it)" in err, (command, err)
    assert (run / "train_summary.json").is_file() and (run / "checkpoints").is_dir()  # all still there


def test_a_resumed_run_stopped_again_is_unfinished_not_its_old_end(cli, tiny_llama, chat_data, tmp_path):
    """Stopped while --resume continued it, a finished run kept its old adapter and summary: merge used the
    step-2 adapter of a run whose checkpoints were at step 6, with no word."""
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "2")[0] == 0
    p = subprocess.Popen([sys.executable, "-m", "lora_cli", "train", "--output", str(run), "--resume", "--max-steps",
                          "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL))
    _wait_for_steps(run, n=4)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert not any((run / f).exists() for f in ("train_summary.json", "adapter_config.json", "adapter_model.safetensors"))
    newest = list_checkpoints(run)[-1][1]
    code, _, err = cli("merge", run, "--output", tmp_path / "m")
    assert code == 1 and f"is a run that has not finished (no adapter_config.json yet): resume it with lora train " \
                          f"--output {run} --resume, or use its newest checkpoint, {newest}" in err, err
    assert cli("train", "--output", run, "--resume", "--max-steps", str(list_checkpoints(run)[-1][0] + 1))[0] == 0
    assert json.loads((run / "train_summary.json").read_text())["steps"] == list_checkpoints(run)[-1][0]


def test_a_signal_during_a_checkpoint_stops_at_that_checkpoint(cli, tiny_llama, chat_data, tmp_path, monkeypatch):
    """A Ctrl-C that came while step 2's checkpoint was written ran step 3 and wrote its checkpoint too."""
    import lora_cli.training

    save = lora_cli.training.save_checkpoint

    def save_then_signal(run_dir, step, *a, **k):
        save(run_dir, step, *a, **k)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(lora_cli.training, "save_checkpoint", save_then_signal)
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "8",
                       "--save-every", "2")
    assert code == 130 and "stopped by SIGINT after step 2; checkpoint saved" in err, err
    assert [s for s, _ in list_checkpoints(run)] == [2]


@pytest.mark.parametrize("edit,said", [("\nrank: 4\n", "rank 4 → 8, alpha 8 → 16"), ("\nalpha: null", "alpha 8 → 64"),
                                       ("\ntargets: attention\n", "targets ['k_proj', 'o_proj', 'q_proj', 'v_proj'] → "
                                                                    "['q_proj']")])
def test_a_run_config_edited_is_named_on_resume(cli, tiny_llama, chat_data, tmp_path, edit, said):
    """An edited rank was an internal error, narrowed targets a checkpoint called damaged (to be deleted), and
    an edited alpha resumed at another scale without a word."""
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "2",
               "--rank", "4")[0] == 0
    config = run / "train_config.yaml"
    new = {"\nrank: 4\n": "\nrank: 8\n", "\nalpha: null": "\nalpha: 64", "\ntargets: attention\n": "\ntargets: q_proj\n"}
    assert edit in config.read_text()
    config.write_text(config.read_text().replace(edit, new[edit]))
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "3")
    assert code == 1 and f"{config} no longer says how the run was started (edited?): {said} since step-000002; " \
                         "restore it" in " ".join(err.split()), err


def test_a_process_the_launcher_ended_says_so(monkeypatch):
    """Under torchrun, the processes that the launcher stopped after another failed said only 'terminated'."""
    from lora_cli.cli import stopped

    assert stopped([signal.SIGTERM]) == ("terminated", 143)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert stopped([signal.SIGTERM])[0].startswith("process 1 terminated: the launcher ends every process of a run "
                                                   "when one of them fails (its error says why)")


def test_a_run_being_replaced_by_merge_force_cannot_be_resumed_meanwhile(cli, tiny_llama, chat_data, tmp_path,
                                                                         monkeypatch):
    """merge --force checked the output's lock only at its start: a --resume started during the merge had its
    folder deleted under it (and failed with an IndexError). The merge now holds the run's lock until it is done."""
    import lora_cli.merging

    run, other = tmp_path / "run", tmp_path / "other"
    for d in (run, other):
        assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", d, "--max-steps", "1")[0] == 0
    seen = []
    real = lora_cli.merging.base_directory

    def resume_meanwhile(*a, **k):  # the slow part of the merge: a resume of the run tries to start
        seen.append(subprocess.run([sys.executable, "-m", "lora_cli", "train", "--output", str(run), "--resume",
                                    "--max-steps", "3"], capture_output=True, text=True))
        return real(*a, **k)

    monkeypatch.setattr(lora_cli.merging, "base_directory", resume_meanwhile)
    assert cli("merge", other, "--output", run, "--force")[0] == 0
    assert seen[0].returncode == 1 and "is in use by another lora run (locked)" in seen[0].stderr, seen[0].stderr
    assert (run / "config.json").is_file() and not (run / "train_config.yaml").exists()  # the merge, whole


def test_a_checkpoint_copied_out_of_its_run_keeps_the_chat_template_it_trained_with(cli, tiny_gpt2, chat_data,
                                                                                    tmp_path):
    """The template a run trained with (here the built-in one: the base has none) was kept in the run folder only:
    a checkpoint copied out of it was prompted as raw text by generate and merged without a template."""
    from lora_cli.config import run_chat_template

    run = tmp_path / "run"
    code, _, err = cli("train", "--model", tiny_gpt2, "--data", chat_data, "--output", run, "--max-steps", "2",
                       "--save-every", "1")
    assert code == 0, err
    template = (run / "chat_template.jinja").read_text()
    copied = tmp_path / "copied"
    shutil.copytree(run / "checkpoints" / "step-000001", copied)
    assert run_chat_template(copied) == template
    answers = []
    for adapter in (run / "checkpoints" / "step-000001", copied):
        code, out, err = cli("generate", "--model", tiny_gpt2, "--adapter", adapter, "--prompt", "hi",
                             "--max-new-tokens", "4", "--json")
        assert code == 0, err
        answers.append(json.loads(out)["answer"])
    assert answers[0] == answers[1]
    assert cli("merge", copied, "--output", tmp_path / "m")[0] == 0
    assert (tmp_path / "m" / "chat_template.jinja").read_text() == template


def test_a_run_whose_base_moved_says_where_to_name_it(cli, tiny_llama, chat_data, tmp_path):
    """The resume said only that the model does not exist, and --model is refused on a resume: the way out, to
    set model: in the run's train_config.yaml, was nowhere."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    run = tmp_path / "run"
    assert cli("train", "--model", base, "--data", chat_data, "--output", run, "--max-steps", "1")[0] == 0
    base.rename(tmp_path / "moved")
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "2")
    assert code == 1 and "does not exist" in err and (f"(the model the run started with, as its {run}/train_config.yaml "
                                                        "names it; if it moved, set model: there to its new place)") \
        in " ".join(err.split()), err
    config = run / "train_config.yaml"
    config.write_text(config.read_text().replace(str(base), str(tmp_path / "moved")))
    code, _, err = cli("train", "--output", run, "--resume", "--max-steps", "2")
    assert code == 0, err


def test_a_run_started_before_the_warmup_was_rounded_up_resumes_on_its_own_schedule(cli, tiny_llama, chat_data,
                                                                                      tmp_path):
    """4 steps × --warmup 0.125 is half a step: rounded to none then, up to one now. A run started before (its
    checkpoints lack warmup_rounded_up) went on at the other schedule's lr after a resume."""
    from lora_cli.training import lr_factor

    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, "--max-steps", "4", "--warmup",
               "0.125", "--save-every", "1", "--save-total-limit", "10", "--lr", "1e-2")[0] == 0
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-2 * lr_factor(s, 4, 1, "cosine") for s in range(4)])
    for step in (3, 4):
        shutil.rmtree(run / "checkpoints" / f"step-00000{step}")
    state = run / "checkpoints" / "step-000002" / "trainer_state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "warmup_rounded_up"}))
    code, _, err = cli("train", "--output", run, "--resume")
    assert code == 0, err
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs[2:] == pytest.approx([1e-2 * lr_factor(s, 4, 0, "cosine") for s in (2, 3)])
