"""`lora train` end to end through the CLI entry point, on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_cli.lora.adapter import load_adapter

FAST = ["--max-steps", "6", "--lr", "1e-2", "--dropout", "0", "--batch-size", "4"]


def adapter(run):
    return load_file(str(run / "adapter_model.safetensors"))


def logits(model, ids=None):
    ids = ids if ids is not None else torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_loss_falls_on_a_memorisable_dataset(cli, tiny_llama, chat_data, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run,
                       "--max-steps", "40", "--lr", "1e-2")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 40 and summary["world_size"] == 1
    assert summary["final_loss"] == pytest.approx(rows[-1]["loss"], rel=1e-4)
    assert summary["peak_memory_bytes"] > 0 and summary["trainable_params"] == 8 * 16 * (32 + 32) - 4 * 16 * 16
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.yaml", "loss.png"):
        assert (run / name).is_file()
    assert "final loss" in err and "lora merge" in err
    # the time before the first step (loading, tokenizing) is reported beside the training's (it was left out)
    assert summary["setup_s"] > 0 and f"after {summary['setup_s']:.1f} s loading and tokenizing" in " ".join(err.split())


def test_run_dir_loads_in_peft_with_our_logits(cli, tiny_llama, chat_data, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, *FAST)[0] == 0
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run).eval()
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama)
    load_adapter(ours, run)
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_llama))
    assert (logits(ours.eval()) - logits(theirs)).abs().max() < 1e-5
    assert (logits(ours) - base).abs().max() > 1e-3  # it learned something


def test_merge_output_loads_in_plain_transformers(cli, tiny_gpt2, tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}:", "completion": " yes"}) + "\n" for i in range(8)))
    run, merged = tmp_path / "run", tmp_path / "merged"
    assert cli("train", "--model", tiny_gpt2, "--data", data, "--output", run, *FAST)[0] == 0
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["attn.c_proj", "c_attn"]
    code, _, err = cli("merge", run, "--output", merged, "--verify")
    assert code == 0, err
    assert "verify: max" in err
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    ours = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    load_adapter(ours, run)
    ref = logits(ours.eval())
    assert (logits(plain) - ref).abs().max() / ref.abs().max() < 1e-4


def test_batch_equals_grad_accumulation(cli, tiny_llama, chat_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--model", tiny_llama, "--data", chat_data, "--max-steps", "4", "--lr", "1e-3", "--dropout", "0"]
    assert cli("train", *common, "--output", a, "--batch-size", "8")[0] == 0
    assert cli("train", *common, "--output", b, "--batch-size", "4", "--grad-accum", "2")[0] == 0
    ta, tb = adapter(a), adapter(b)
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-5), k
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)


def test_same_seed_same_adapter_other_seed_differs(cli, tiny_llama, chat_data, tmp_path):
    common = ["--model", tiny_llama, "--data", chat_data, "--max-steps", "3", "--dropout", "0.1"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert cli("train", *common, "--output", tmp_path / name, "--seed", seed)[0] == 0
    ta, tb, tc = adapter(tmp_path / "a"), adapter(tmp_path / "b"), adapter(tmp_path / "c")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_train_config_yaml_reruns_the_run(cli, tiny_llama, chat_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("train", "--model", tiny_llama, "--data", chat_data, "--output", a, *FAST)[0] == 0
    assert cli("train", "--config", a / "train_config.yaml", "--output", b)[0] == 0
    ta, tb = adapter(a), adapter(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # with another rank, the default alpha follows it (2 × rank), as for a fresh run: it kept the old 2 × 16
    code, stdout, _ = cli("train", "--config", a / "train_config.yaml", "--rank", "4", "--dry-run", "--force")
    assert code == 0 and "\nalpha: null  # 2 × rank = 8\n" in stdout


def test_precedence_flag_over_yaml_over_default_and_dry_run(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rank: 8\nlr: 0.001\nbatch_size: 2\ntargets: [q_proj, v_proj]\n")
    out = tmp_path / "never"
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    code, stdout, _ = cli("train", "-m", "m", "--data", tmp_path / "d.jsonl", "--config", cfg, "--rank", "4",
                          "-o", out, "--dry-run")  # -m / -o as in the other commands
    assert code == 0
    resolved = yaml.safe_load(stdout)
    assert resolved["model"] == "m" and resolved["output"] == str(out)
    assert resolved["rank"] == 4  # flag beats YAML
    assert resolved["lr"] == 0.001 and resolved["batch_size"] == 2  # YAML beats default
    assert resolved["dropout"] == 0.05 and resolved["alpha"] is None  # defaults (alpha follows the rank)
    assert "\nalpha: null  # 2 × rank = 8\n" in stdout
    assert resolved["targets"] == "q_proj,v_proj"  # a YAML list of modules reads as the comma list
    assert not out.exists()
    cfg.write_text("max_steps: 6\nepochs: 1\n")  # as a run started with --max-steps saves it
    for flags, steps in ((["--epochs", "3"], None), (["--epochs", "3", "--max-steps", "9"], 9), ([], 6)):
        code, stdout, _ = cli("train", "-m", "m", "--data", tmp_path / "d.jsonl", "--config", cfg, *flags, "-o", out,
                              "--dry-run")  # --epochs given counts in epochs: the YAML's max_steps silently won
        assert code == 0 and yaml.safe_load(stdout)["max_steps"] == steps


def test_dry_run_says_a_data_file_is_missing(cli, tmp_path):
    """It printed a config for a file that is not there: the run it describes fails at once."""
    code, stdout, err = cli("train", "-m", "m", "--data", tmp_path / "nope.jsonl", "--eval-data", "./held.csv",
                            "--dry-run")
    assert code == 1 and stdout == ""
    assert f"--data '{tmp_path / 'nope.jsonl'}' does not exist; --eval-data './held.csv' does not exist" in err
    assert cli("train", "-m", "m", "--data", "org/dataset", "--dry-run")[0] == 0  # a Hub id is not a file


def test_dry_run_refuses_an_output_the_run_would_refuse(cli, tmp_path):
    """It printed a config for a folder the run then refused (exists, not empty)."""
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ("train", "-m", "m", "--data", tmp_path / "d.jsonl", "-o", out, "--dry-run")
    for force in ((), ("--force",)):  # --force replaces an earlier run's files, never writes among the user's
        code, stdout, err = cli(*args, *force)
        assert code == 1 and stdout == "" and "is not a lora run (it holds notes.txt)" in err
    (out / "notes.txt").unlink()
    assert cli(*args)[0] == 0  # an empty folder is the run's to fill
    (tmp_path / "afile").write_text("")
    code, stdout, err = cli("train", "-m", "m", "--data", tmp_path / "d.jsonl", "-o", tmp_path / "afile" / "run",
                            "--dry-run")
    assert code == 1 and stdout == "" and f"{tmp_path / 'afile'} is a file, not a folder" in err


def test_unknown_yaml_key_is_an_error(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rnak: 8\n")
    code, _, err = cli("train", "--model", "m", "--data", "d", "--config", cfg, "--dry-run")
    assert code == 1 and "unknown key 'rnak'" in err and "did you mean 'rank'" in err


def test_existing_output_needs_force(cli, tiny_llama, chat_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", run, *FAST)
    assert code == 1 and err.startswith("error: ") and "--force" in err
    assert (run / "keep.txt").read_text() == "x"


def test_gradient_checkpointing_trains_the_same(cli, tiny_llama, chat_data, tmp_path):
    """With dropout: the recompute must draw the dropout positions the forward drew (q/k/v share one set)."""
    common = ["--model", tiny_llama, "--data", chat_data, "--max-steps", "6", "--lr", "1e-2", "--batch-size", "4",
              "--dropout", "0.1"]
    assert cli("train", *common, "--output", tmp_path / "a")[0] == 0
    code, _, err = cli("train", *common, "--output", tmp_path / "b", "--gradient-checkpointing")
    assert code == 0, err
    ta, tb = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-5) for k in ta)
    assert any(tb[k].abs().sum() > 0 for k in tb if "lora_B" in k)


@pytest.mark.slow
def test_compile_trains_the_same(cli, tiny_llama, chat_data, tmp_path):
    """--compile (regional torch.compile, inductor on CPU) gives the eager run's losses and adapter."""
    common = ["--model", tiny_llama, "--data", chat_data, "--max-steps", "3", "--lr", "1e-2", "--dropout", "0"]
    assert cli("train", *common, "--output", tmp_path / "a")[0] == 0
    code, _, err = cli("train", *common, "--output", tmp_path / "b", "--compile")
    assert code == 0, err
    loss = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert loss[0] == pytest.approx(loss[1], rel=1e-4)
    ta, tb = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-5) for k in ta)


@pytest.mark.parametrize("path", ["cpu-demo.yaml", "chat-0.5b-8gb.yaml", "llama-8b-24gb.yaml"])
def test_shipped_configs_load_and_validate(path):
    from pathlib import Path

    from lora_cli.config import TrainConfig, read_yaml_config

    values = read_yaml_config(str(Path(__file__).parents[1] / "configs" / path))
    if values["data"] == "chats.jsonl":  # the placeholder the comment next to it says to replace
        values["data"] = str(Path(__file__).parents[1] / "data/demo")
    TrainConfig.from_dict(values).resolved().validate()


def test_warmup_is_rounded_up_as_in_transformers_and_never_at_lr_zero():
    """A fractional --warmup was rounded half to even (8 steps × 0.03: none; 150 × 0.03: 4), where transformers
    rounds up (1 and 5): a recipe ported from Trainer got another schedule."""
    import math

    from transformers.optimization import get_cosine_schedule_with_warmup

    from lora_cli.training import lr_factor, warmup_steps

    for total, frac in ((8, 0.03), (150, 0.03), (25, 0.1), (35, 0.1), (40, 0.03), (100, 0.03)):
        assert warmup_steps(frac, total) == math.ceil(total * frac)  # transformers' get_warmup_steps
    assert warmup_steps(0.1, 30) == 3  # (30 × 0.1 is 3.0000000000000004 in floats)
    assert warmup_steps(4, 100) == 4 and warmup_steps(0, 100) == 0
    # the warmup ramps to the peak without a step at lr 0; after it, transformers' cosine exactly
    assert [lr_factor(s, 10, 4, "cosine") for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = get_cosine_schedule_with_warmup(opt, 4, 10).lr_lambdas
    assert [lr_factor(s, 10, 4, "cosine") for s in range(4, 10)] == pytest.approx([theirs[0](s) for s in range(4, 10)])


def test_epoch_batches_cover_each_record_once_and_group_by_length():
    from lora_cli.training import epoch_batches

    lengths = [((i * 37) % 101) + 1 for i in range(100)]
    for group in (False, True):
        batches = epoch_batches(lengths, 8, seed=3, epoch=0, group=group)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(100)) and len(batches) == 13 and len(batches[-1]) == 4
        assert batches == epoch_batches(lengths, 8, seed=3, epoch=0, group=group)  # deterministic
        assert batches != epoch_batches(lengths, 8, seed=3, epoch=1, group=group)  # reshuffled each epoch

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    assert padding(epoch_batches(lengths, 8, 3, 0, True)) < 0.3 * padding(epoch_batches(lengths, 8, 3, 0, False))
    # the short last batch is a random draw: it was the 4 shortest records, every epoch, a whole step to themselves
    shortest = set(sorted(range(100), key=lambda i: lengths[i])[:4])
    lasts = [set(epoch_batches(lengths, 8, 3, e, True)[-1]) for e in range(8)]
    assert len({frozenset(b) for b in lasts}) == 8 and sum(b == shortest for b in lasts) == 0


def test_default_max_length_is_capped_to_the_context_with_a_note(cli, tiny_llama, chat_data, tmp_path):
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", tmp_path / "r", *FAST)
    assert code == 0 and "max length 1024 → 256" in err
    assert yaml.safe_load((tmp_path / "r/train_config.yaml").read_text())["max_length"] == 256
    # --dry-run's YAML writes the default down (1024): run from it, it is still the default, capped (it was refused
    # as an explicit --max-length beyond the context); a value of one's own beyond it still is refused
    code, yaml_text, _ = cli("train", "--model", tiny_llama, "--data", chat_data, *FAST, "--dry-run")
    (tmp_path / "dry.yaml").write_text(yaml_text)
    code, _, err = cli("train", "--config", tmp_path / "dry.yaml", "--output", tmp_path / "r2")
    assert code == 0 and "max length 1024 → 256" in err, err
    code, _, err = cli("train", "--config", tmp_path / "dry.yaml", "--output", tmp_path / "r3", "--max-length", "300")
    assert code == 1 and "--max-length 300 exceeds the model's context of 256 tokens" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting")
def test_freed_memory_is_reused_without_page_faults():
    """A training step frees and reallocates the same activations. When glibc hands freed blocks back to
    the OS (its default for large blocks until its adaptive threshold catches up, which varies from run to
    run; pinned here at its 128 KiB default to make the control deterministic) they are faulted in again
    every round; after keep_freed_memory they are reused (once the heap has settled: in the first rounds
    small Python objects may take the front of a freed block, so a tensor or three gets fresh pages)."""
    code = """
import resource, sys, torch
from lora_cli.training import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:
    import ctypes
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD, fixed: freed blocks are unmapped
faults = []
for _ in range(6):
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.ones(10 << 18) for _ in range(6)]  # 6 x 10 MB of activations
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    del ts
print(*faults[1:])
"""
    pages = (60 << 20) // 4096

    def later_rounds(mode):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stdout
        return [int(x) for x in out.split()]

    assert sum(later_rounds("keep")[-2:]) < pages // 4
    assert min(later_rounds("unmap")) > pages // 2


def test_runs_in_one_process_do_not_share_accelerate_settings(cli, tiny_llama, chat_data, tmp_path):
    """A bf16 run after an fp32 one in the same process (a notebook, a test session) gets bf16: Accelerate's
    process-wide state is reset per run. bf16 autocast on CPU gives the fp32 first loss up to rounding."""
    common = ["--model", tiny_llama, "--data", chat_data, "--max-steps", "2", "--dropout", "0"]
    assert cli("train", *common, "--output", tmp_path / "a", "--dtype", "float32")[0] == 0
    code, _, err = cli("train", *common, "--output", tmp_path / "b", "--dtype", "bfloat16")
    assert code == 0, err
    first = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0])["loss"] for d in "ab"]
    assert first[1] == pytest.approx(first[0], rel=2e-2) and first[1] != first[0]
    if torch.cuda.is_available():
        return
    # a CPU without bf16 instructions emulates it, many times slower: said, and float16 does not point at it
    from lora_cli.training import cpu_has_bf16

    assert ("bfloat16 is emulated" in " ".join(err.split())) == (not cpu_has_bf16())
    code, _, err = cli("train", *common, "--output", tmp_path / "c", "--dtype", "float16")
    assert code == 1 and "--dtype float16 needs a GPU; on CPU use float32" in err
    assert ("or bfloat16" in err) == cpu_has_bf16()


def test_modules_whose_weights_the_model_reads_directly_are_named(cli, chat_data, tmp_path):
    """Mamba: PEFT refuses LoRA on out_proj (the fused kernel bypasses it), and the slow path reads
    dt_proj.weight directly, so LoRA there never runs and cannot learn: refused, and warned about."""
    from tiny import save_tiny

    base = save_tiny(tmp_path / "mamba", "mamba")
    run = ["train", "--model", base, "--data", chat_data, *FAST]
    code, _, err = cli(*run, "--targets", "all-linear", "--output", tmp_path / "all")
    assert code == 1 and "PEFT refuses LoRA on out_proj of mamba models" in err and "--targets in_proj,x_proj" in err
    assert not (tmp_path / "all").exists()
    code, _, err = cli(*run, "--targets", "in_proj,dt_proj", "--output", tmp_path / "run")
    assert code == 0, err
    assert "warning: LoRA on 2 module(s) never runs (e.g. backbone.layers.0.mixer.dt_proj)" in " ".join(err.split())
    b = {k: v for k, v in adapter(tmp_path / "run").items() if "lora_B" in k}
    assert all(v.abs().sum() == 0 for k, v in b.items() if "dt_proj" in k)  # as warned: nothing learned
    assert all(v.abs().sum() > 0 for k, v in b.items() if "in_proj" in k)


def test_log_every_rows_average_their_steps_and_a_log_gets_progress_lines(cli, tiny_llama, chat_data, tmp_path):
    """--log-every 2 writes the mean (per loss token) of each two steps, not the second step alone; without a
    terminal the progress still shows as plain lines while it runs."""
    args = ["--model", tiny_llama, "--data", chat_data, "--max-steps", "5", "--dropout", "0", "--lr", "5e-3"]
    code, _, err = cli("train", *args, "--output", tmp_path / "each")
    assert code == 0, err
    assert "step 1/5 (20%)" in err and "step 5/5 (100%)" in err and "ETA" in err
    code, _, err = cli("train", *args, "--output", tmp_path / "pairs", "--log-every", "2")
    assert code == 0, err
    rows = lambda r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    each, pairs = rows(tmp_path / "each"), rows(tmp_path / "pairs")
    assert [r["step"] for r in pairs] == [2, 4, 5]
    for row, window in zip(pairs, (each[0:2], each[2:4], each[4:5])):
        n = sum(r["loss_tokens"] for r in window)
        assert row["loss_tokens"] == n
        assert row["loss"] == pytest.approx(sum(r["loss"] * r["loss_tokens"] for r in window) / n, rel=1e-5)


def test_eval_every_without_eval_data_says_it_is_not_used(cli, tiny_llama, chat_data, tmp_path):
    """--eval-every with no eval data did nothing, silently (an unused --eval-split has its note)."""
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", tmp_path / "a", *FAST,
                       "--eval-every", "2")
    assert code == 0 and "note: --eval-every 2 is not used: there is no eval data" in " ".join(err.split()), err
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", tmp_path / "b", *FAST,
                       "--eval-every", "2", "--eval-split", "0.25")
    assert code == 0 and "--eval-every 2 is not used" not in " ".join(err.split()), err


def test_the_header_counts_in_the_singular_too(cli, tiny_llama, chat_data, tmp_path):
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", tmp_path / "a", "--max-steps",
                       "1", "--targets", "lm_head")
    assert code == 0 and "1 module: lm_head" in err and "1 modules" not in err, err


def test_train_takes_the_fused_head_where_it_is_the_models_own(cli, tiny_llama, chat_data, tmp_path, monkeypatch):
    """The check runs before the weights are frozen; a check that said no to every model would cost every run the
    full-vocabulary logits (no wrong number to show it): a plain Llama must get the fused head."""
    import lora_cli.training
    from lora_cli.loss import CausalLMLoss

    made = []

    class Watched(CausalLMLoss):
        def __init__(self, model, fused=True):
            super().__init__(model, fused)
            made.append(self.head is not None)

    monkeypatch.setattr(lora_cli.training, "CausalLMLoss", Watched)
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", tmp_path / "r", "--max-steps", "1")
    assert code == 0 and made == [True], err


def test_the_live_progress_bar_keeps_the_last_eval_and_the_plot_whole_steps(tmp_path, monkeypatch):
    """The eval field showed on eval steps only, so a terminal's bar changed width at each (at 80 columns it cut
    the elapsed time); a 3-step run's loss.png had ticks at 1.25, 1.5…."""
    import io

    import matplotlib.pyplot as plt
    from rich.console import Console

    from lora_cli.display import TrainProgress, plot_loss

    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    with TrainProgress(terminal, total=3) as bar:
        for step, extra in ((1, ""), (2, "eval 1.2345"), (3, "")):
            bar.update(step, loss=2.0, lr=1e-4, tps=100.0, extra=extra)
            shown = bar.progress.tasks[0].fields["extra"]
            assert shown == ("" if step == 1 else "eval 1.2345")
    made, subplots = [], plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: made.append(subplots(*a, **k)) or made[-1])
    assert plot_loss([{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)], tmp_path / "loss.png")
    ticks = made[0][1].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize("variable,asked", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_fsdp_or_deepspeed_that_accelerate_drops_on_cpu_is_an_error(cli, tiny_llama, chat_data, tmp_path, monkeypatch,
                                                                      variable, asked):
    """accelerate launch --config_file fsdp.yaml (or a DeepSpeed one) on CPUs ran plain DDP, each process holding
    the whole base, and said nothing: Accelerate keeps them for GPUs."""
    monkeypatch.setenv(variable, "true")
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", tmp_path / "run", "--max-steps",
                       "1")
    assert code == 1 and f"error: the launch asks for {asked} (accelerate launch --config_file …), which Accelerate " \
                         "runs on GPUs only: this run would be one process" in err, err
    assert not (tmp_path / "run").exists()


def test_gradient_checkpointing_where_the_architecture_has_none_is_named(cli, chat_data, tmp_path):
    from tiny import save_tiny

    base = save_tiny(tmp_path / "gpt1", "openai-gpt")
    code, _, err = cli("train", "--model", base, "--data", chat_data, "--output", tmp_path / "run", "--max-steps", "1",
                       "--gradient-checkpointing")
    assert code == 1 and err.strip().splitlines()[-1] == (
        "error: OpenAIGPTLMHeadModel does not support gradient checkpointing (transformers has none for this "
        "architecture); train without --gradient-checkpointing"), err


def test_a_chat_template_kept_in_chat_template_json_is_the_models(cli, chat_data, tmp_path):
    """AutoTokenizer does not read chat_template.json (where processors save the template): such a model trained
    in lora's built-in "User:" format instead of its own, silently, and merged with two conflicting templates."""
    from tiny import CHATML, save_tiny

    base = save_tiny(tmp_path / "base", "llama")
    (base / "chat_template.jinja").unlink()
    (base / "chat_template.json").write_text(json.dumps({"chat_template": CHATML}))
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", base, "--data", chat_data, "--output", run, "--max-steps", "1")
    assert code == 0, err
    assert not (run / "chat_template.jinja").exists()  # the model's own template: nothing of the run's to keep
    assert cli("merge", run, "--output", tmp_path / "m")[0] == 0
    assert (tmp_path / "m" / "chat_template.jinja").read_text() == CHATML
    assert json.loads((tmp_path / "m" / "chat_template.json").read_text())["chat_template"] == CHATML
    (base / "chat_template.json").write_text("{not json")  # damaged: read as before, not at all (the model loads)
    code, _, err = cli("train", "--model", base, "--data", chat_data, "--output", tmp_path / "r2", "--max-steps", "1")
    assert code == 0, err
