"""Every user mistake: one `error:` line, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_cli.errors import atomic_write_text

GOOD_FAST = ["--max-steps", "2", "--dropout", "0"]


def assert_user_error(result, *fragments, code=1):
    rc, out, err = result
    assert rc == code, (rc, err)
    assert "Traceback" not in err
    if code == 1:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert lines[-1].startswith("error: "), err
        for f in fragments:
            assert f in lines[-1], (f, lines[-1])


@pytest.fixture
def bad_inputs(tmp_path, tiny_llama, chat_data):
    d = tmp_path
    (d / "empty.jsonl").write_text("")
    (d / "truncated.jsonl").write_text('{"text": "hello"}\n{"text": "wor')
    (d / "notjson.jsonl").write_text("this is not json\n")
    (d / "shape.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    (d / "kto.jsonl").write_text('{"prompt": "2+2?", "completion": "5", "label": false}\n')
    (d / "dpo.jsonl").write_text('{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n')
    (d / "dpo-chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}],
                                                  "chosen": [{"role": "assistant", "content": "4"}],
                                                  "rejected": [{"role": "assistant", "content": "5"}]}) + "\n")
    (d / "dpo-turns.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "2+2?"}],
                                                   "chosen": [{"role": "assistant", "content": "4"}],
                                                   "rejected": [{"role": "assistant", "content": "5"}]}) + "\n")
    (d / "broken.yaml").write_text("rank: [1, 2\n")
    (d / "unknown.yaml").write_text("rnak: 8\n")
    (d / "twice.yaml").write_text("rank: 8\nlr: 0.001\nrank: 16\n")
    (d / "twice-spelled.yaml").write_text("batch_size: 2\nbatch-size: 8\n")
    shutil.copytree(tiny_llama, d / "badcfg")  # a config.json value of the wrong type (was "cannot load tokenizer")
    (d / "badcfg/config.json").write_text(json.dumps({**json.loads((tiny_llama / "config.json").read_text()),
                                                      "rms_norm_eps": "x"}))
    pickled = d / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_llama / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    (d / "utf16.jsonl").write_bytes('{"text": "hello"}\n'.encode("utf-16"))
    (d / "broken.csv").write_text('text\n"unterminated\n')
    (d / "one-empty-record.jsonl").write_text('{"messages": []}\n')
    (d / "plain-messages.csv").write_text('messages\nhello there\n')
    (d / "latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    (d / "latin1-wrapped.json").write_bytes('{"version": 1, "data": [{"text": "café"}]}'.encode("latin-1"))
    (d / "latin1-prompts.txt").write_bytes("café\n".encode("latin-1"))
    (d / "null-completion.jsonl").write_text('{"prompt": "hello", "completion": null}\n')
    (d / "surrogate.jsonl").write_text('{"text": "a \\ud83d\\ude00 pair"}\n{"text": "half \\ud83d of one"}\n')
    (d / "arrays.jsonl").write_text("[1, 2]\n[3, 4]\n")
    (d / "empty.jinja").write_text("  \n")
    (d / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% for %}")
    (d / "no-data").mkdir()
    (d / "no-data" / "notes.md").write_text("nothing to train on\n")
    (d / "two-train").mkdir()
    (d / "two-train" / "train.jsonl").write_text('{"text": "a"}\n')
    (d / "two-train" / "train.csv").write_text('text\nb\n')
    (d / "an-adapter").mkdir()
    (d / "an-adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "org/base"}')
    untokenized = d / "untokenized"  # weights and config, no tokenizer files
    untokenized.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, untokenized / name)
    unweighted = d / "unweighted"  # config and tokenizer, the weights not downloaded
    shutil.copytree(tiny_llama, unweighted, ignore=shutil.ignore_patterns("*.safetensors"))
    unknown = d / "unknown-type"
    shutil.copytree(tiny_llama, unknown)
    (unknown / "config.json").write_text(json.dumps(json.loads((unknown / "config.json").read_text())
                                                    | {"model_type": "nosuch"}))
    (d / "shard-missing").mkdir()
    (d / "shard-missing" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    shutil.copy(tiny_llama / "model.safetensors", d / "shard-missing" / "model-00001-of-00002.safetensors")
    shutil.copytree(tiny_llama, d / "shard-missing", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    remote = d / "remote"  # the shape of a remote-code repo: a model type transformers does not know, an auto_map
    shutil.copytree(tiny_llama, remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="mycustom", auto_map={"AutoConfig": "configuration_x.MyConfig",
                                                   "AutoModelForCausalLM": "modeling_x.MyForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    return d


def train_args(model, data, out, *extra):
    return ("train", "--model", model, "--data", data, "--output", out, *GOOD_FAST, *extra)


CASES = {
    "missing model": (lambda d, m, c: train_args(d / "nope", c, d / "o"), ["does not exist"]),
    "unknown hub model": (lambda d, m, c: train_args("nobody-xyz/no-such-model", c, d / "o"), ["cannot load"]),
    "missing data": (lambda d, m, c: train_args(m, d / "nope.jsonl", d / "o"), ["does not exist"]),
    "data given twice": (lambda d, m, c: train_args(m, c, d / "o", "--data=" + str(c)),  # click kept the last, silently
                         ["--data is given 2 times, and only one is used", "--data FOLDER"]),
    "eval data given twice": (lambda d, m, c: train_args(m, c, d / "o", "--eval-data", c, "--eval-data", c),
                              ["--eval-data is given 2 times"]),
    "model given twice, short and long": (lambda d, m, c: train_args(m, c, d / "o", "-m", m),
                                          ["--model is given 2 times"]),
    "prompt given twice": (lambda d, m, c: ("generate", "-m", m, "-p", "a", "--prompt", "b"),
                           ["--prompt is given 2 times", "--prompt-file"]),
    "rank 0": (lambda d, m, c: train_args(m, c, d / "o", "--rank", "0"), ["--rank must be >= 1"]),
    "rank beyond 64 bits": (lambda d, m, c: train_args(m, c, d / "o", "--rank", str(10**20)),  # was a C++ backtrace
                            ["--rank is too large (got 100000000000000000000)"]),
    "grad-accum beyond the data": (lambda d, m, c: train_args(m, c, d / "o", "--grad-accum", "1000"),  # ate all RAM
                                   ["--grad-accum 1000 makes 1000 micro-batches per step, but the training data is"]),
    "alpha <= 0": (lambda d, m, c: train_args(m, c, d / "o", "--alpha", "-1"), ["--alpha must be a finite number > 0"]),
    "alpha inf": (lambda d, m, c: train_args(m, c, d / "o", "--alpha", "inf"), ["--alpha must be a finite number > 0"]),
    "weight decay inf": (lambda d, m, c: train_args(m, c, d / "o", "--weight-decay", "inf"),
                         ["--weight-decay must be a finite number >= 0 (got inf)"]),
    "dropout 1": (lambda d, m, c: train_args(m, c, d / "o", "--dropout", "1"), ["--dropout must be in [0, 1)"]),
    "no target matched": (lambda d, m, c: train_args(m, c, d / "o", "--targets", "foo_proj"),
                          ["matched no linear module", "q_proj"]),
    "empty dataset": (lambda d, m, c: train_args(m, d / "empty.jsonl", d / "o"), ["is empty"]),
    "truncated dataset": (lambda d, m, c: train_args(m, d / "truncated.jsonl", d / "o"), ["line 2", "not valid JSON"]),
    "non-JSON dataset": (lambda d, m, c: train_args(m, d / "notjson.jsonl", d / "o"), ["line 1", "not valid JSON"]),
    "JSONL of lists": (lambda d, m, c: train_args(m, d / "arrays.jsonl", d / "o"),
                       ["arrays.jsonl line 1: expected a JSON object, got list"]),  # (was "line 2: Extra data")
    "DPO preference data": (lambda d, m, c: train_args(m, d / "dpo.jsonl", d / "o"),  # 'unknown shape'
                            ["chosen and rejected answers are preference data (DPO)", "give them as completion"]),
    "DPO data in turns, one record": (lambda d, m, c: train_args(m, d / "dpo-turns.jsonl", d / "o"),  # 'several lists'
                                      ["chosen and rejected answers are preference data (DPO)"]),
    "DPO data beside messages": (lambda d, m, c: train_args(m, d / "dpo-chat.jsonl", d / "o"),  # messages only, silently
                                 ["chosen and rejected answers are preference data (DPO)"]),
    "KTO preference data": (lambda d, m, c: train_args(m, d / "kto.jsonl", d / "o"),  # trained on the bad answers
                            ["record 1", "unpaired preference data (KTO)", "keep the label=true records"]),
    "unknown record shape": (lambda d, m, c: train_args(m, d / "shape.jsonl", d / "o"),
                             ["record 1", "unknown shape", "question", "messages"]),
    "nothing to learn": (lambda d, m, c: train_args(m, c, d / "o", "--max-length", "5"), ["no record has a token"]),
    "config.json value of a wrong type": (lambda d, m, c: train_args(d / "badcfg", c, d / "o"),
                                          ["has an invalid config.json", "rms_norm_eps", "expected float, got str"]),
    "max-length beyond the context": (lambda d, m, c: train_args(m, c, d / "o", "--max-length", "4096"),
                                      ["exceeds the model's context of 256 tokens"]),
    "lr 0": (lambda d, m, c: train_args(m, c, d / "o", "--lr", "0"), ["--lr must be a finite number > 0"]),
    "max-length 0": (lambda d, m, c: train_args(m, c, d / "o", "--max-length", "0"), ["--max-length must be >= 1"]),
    "num-proc 0": (lambda d, m, c: train_args(m, c, d / "o", "--num-proc", "0"), ["--num-proc must be >= 1 (got 0)"]),
    "batch-size 0": (lambda d, m, c: train_args(m, c, d / "o", "--batch-size", "0"), ["--batch-size must be >= 1"]),
    "missing yaml": (lambda d, m, c: train_args(m, c, d / "o", "--config", d / "nope.yaml"), ["no such file"]),
    "resume and force": (lambda d, m, c: train_args(m, c, d / "o", "--resume", "--force"),
                         ["--resume continues the run and --force starts it over; give one of them"]),
    "a folder as yaml": (lambda d, m, c: train_args(m, c, d / "o", "--config", d), ["a folder, not a YAML file"]),
    "broken yaml": (lambda d, m, c: train_args(m, c, d / "o", "--config", d / "broken.yaml"), ["not valid YAML"]),
    "yaml key given twice": (lambda d, m, c: train_args(m, c, d / "o", "--config", d / "twice.yaml"),
                             ["not valid YAML ('rank' is given twice (line 3))"]),
    "yaml key spelled twice": (lambda d, m, c: train_args(m, c, d / "o", "--config", d / "twice-spelled.yaml"),
                               ["batch_size and batch-size are one option given twice; keep one"]),  # (8 won)
    "unknown yaml key": (lambda d, m, c: train_args(m, c, d / "o", "--config", d / "unknown.yaml"),
                         ["unknown key 'rnak'"]),
    "unknown dtype": (lambda d, m, c: train_args(m, c, d / "o", "--dtype", "float8"), ["--dtype must be one of"]),
    "bad scheduler": (lambda d, m, c: train_args(m, c, d / "o", "--scheduler", "step"), ["--scheduler must be"]),
    "negative seed": (lambda d, m, c: train_args(m, c, d / "o", "--seed", "-1"), ["--seed must be in [0, 2**32)"]),
    "empty targets": (lambda d, m, c: train_args(m, c, d / "o", "--targets", " "), ["--targets is empty"]),
    "NaN warmup": (lambda d, m, c: train_args(m, c, d / "o", "--warmup", "nan"), ["--warmup must be a finite number >= 0"]),
    "max length 1": (lambda d, m, c: train_args(m, c, d / "o", "--max-length", "1"), ["--max-length must be >= 2"]),
    "two train files": (lambda d, m, c: train_args(m, d / "two-train", d / "o"),
                        ["holds train.jsonl and train.csv: one train split, one file"]),
    "folder without data": (lambda d, m, c: train_args(m, d / "no-data", d / "o"),
                            ["data directory", "no-data' holds no data file (.jsonl, .json"]),
    "two eval sources": (lambda d, m, c: train_args(m, c, d / "o", "--eval-data", c, "--eval-split", "0.1"),
                         ["--eval-split 0.1 holds out part of --data, but --eval-data is the eval data"]),
    "Latin-1 JSON lines": (lambda d, m, c: train_args(m, d / "latin1.jsonl", d / "o"),
                           ["latin1.jsonl is not UTF-8 text (byte 0xe9 on line 1", "save it as UTF-8"]),
    "Latin-1 JSON object": (lambda d, m, c: train_args(m, d / "latin1-wrapped.json", d / "o"),
                            ["latin1-wrapped.json is not UTF-8 text (byte 0xe9"]),  # was read with U+FFFD
    "a null completion": (lambda d, m, c: train_args(m, d / "null-completion.jsonl", d / "o"),
                          ["record 1: unknown shape (keys: prompt; null: completion)"]),
    "empty chat template": (lambda d, m, c: train_args(m, c, d / "o", "--chat-template", d / "empty.jinja"),
                            ["--chat-template", "empty.jinja' is empty"]),
    "broken chat template": (lambda d, m, c: train_args(m, c, d / "o", "--chat-template", d / "broken.jinja"),
                             ["broken.jinja': not a valid Jinja template (line 2: Expected an expression"]),
    "Latin-1 prompt file": (lambda d, m, c: ("generate", "--model", m, "--prompt-file", d / "latin1-prompts.txt"),
                            ["--prompt-file", "is not UTF-8 text (byte 0xe9 on line 1"]),
    "folder as prompt file": (lambda d, m, c: ("generate", "--model", m, "--prompt-file", d),
                              ["--prompt-file", "is a folder, not a file"]),
    "split of a local file": (lambda d, m, c: train_args(m, c, d / "o", "--data-split", "test"),
                              ["--data-split 'test' picks a split of a Hub dataset", "is a file"]),
    "eval split of a local file": (lambda d, m, c: train_args(m, c, d / "o", "--eval-data", c, "--eval-data-split", "dev"),
                                   ["--eval-data-split 'dev' picks a split of a Hub dataset or a folder, but --eval-data", "is a file"]),
    "test split of a local file": (lambda d, m, c: train_args(m, c, d / "o", "--eval-data-split", "test"),
                                   ["--eval-data-split 'test' picks a split of a Hub dataset or a folder, but --data", "is a file"]),
    "output inside a file": (lambda d, m, c: train_args(m, c, c / "o"), ["cannot write", "is a file, not a folder"]),
    "lone surrogate": (lambda d, m, c: train_args(m, d / "surrogate.jsonl", d / "o"),
                       ["surrogate.jsonl line 2: \\ud83d is half of a UTF-16 surrogate pair, not a character"]),
    "UTF-16 data": (lambda d, m, c: train_args(m, d / "utf16.jsonl", d / "o"), ["is UTF-16 text; save it as UTF-8"]),
    "malformed CSV": (lambda d, m, c: train_args(m, d / "broken.csv", d / "o"),
                      ["cannot read", "EOF inside string"]),  # the parser's words, not datasets' wrapper
    "one record, empty messages": (lambda d, m, c: train_args(m, d / "one-empty-record.jsonl", d / "o"),
                                   ["record 1: 'messages' must be a non-empty list", "got an empty list"]),
    "CSV messages cell not JSON": (lambda d, m, c: train_args(m, d / "plain-messages.csv", d / "o"),
                                   ["record 1: 'messages' must be a non-empty list", "got str 'hello there'"]),
    "adapter given as the model": (lambda d, m, c: ("generate", "--model", d / "an-adapter", "--prompt", "x"),
                                   ["is a LoRA adapter, not a model; its base is 'org/base'", "--adapter"]),
    "model without a tokenizer": (lambda d, m, c: train_args(d / "untokenized", c, d / "o"),
                                  ["has no tokenizer", "copy the tokenizer files of its base model"]),
    "model without weights": (lambda d, m, c: train_args(d / "unweighted", c, d / "o"),
                              ["unweighted' has no weights (no *.safetensors file)"]),  # (was: pass --allow-pickle)
    "unknown model type": (lambda d, m, c: ("generate", "--model", d / "unknown-type", "--prompt", "x"),
                           ["model_type 'nosuch' is not an architecture transformers"]),
    "missing shard": (lambda d, m, c: ("generate", "--model", d / "shard-missing", "--prompt", "x"),
                      ["lacks model-00002-of-00002.safetensors, which its model.safetensors.index.json lists"]),
    "4-bit on CPU": (lambda d, m, c: train_args(m, c, d / "o", "--load-in-4bit"), ["--load-in-4bit needs a CUDA GPU"]),
    "remote code (train)": (lambda d, m, c: train_args(d / "remote", c, d / "o"),
                            ["needs its own Python code: pass --trust-remote-code if you trust it"]),
    "remote code (generate)": (lambda d, m, c: ("generate", "--model", d / "remote", "--prompt", "x"),
                               ["needs its own Python code: pass --trust-remote-code if you trust it"]),
    "pickled weights": (lambda d, m, c: train_args(d / "pickled", c, d / "o"), ["pickled", "--allow-pickle"]),
    "resume without checkpoint": (lambda d, m, c: ("train", "--output", d / "nope-run", "--resume"),
                                  ["no train_config.yaml"]),
    "merge missing adapter": (lambda d, m, c: ("merge", d / "nope", "--output", d / "o"), ["does not exist"]),
    "inspect non-adapter": (lambda d, m, c: ("inspect", d / "no-data"), ["no adapter_config.json"]),
    "inspect a folder holding an adapter": (lambda d, m, c: ("inspect", d), ["is not an adapter itself",
                                                                             "pass one of them"]),
    "generate missing adapter": (lambda d, m, c: ("generate", "--model", m, "--adapter", d / "nope", "--prompt", "x"),
                                 ["does not exist"]),
    "generate without prompt": (lambda d, m, c: ("generate", "--model", m), ["--prompt"]),
    "temperature not a number": (lambda d, m, c: ("generate", "--model", m, "--prompt", "x", "--temperature", "nan"),
                                  ["--temperature must be >= 0"]),
    "empty prompt file": (lambda d, m, c: ("generate", "--model", m, "--prompt-file", d / "empty.jsonl"),
                          ["holds no prompts"]),
    "extract from an unknown tuned model": (lambda d, m, c: ("extract", "--base", m, "--tuned", "nobody-xyz/none",
                                                             "--rank", "2", "--output", d / "o"),
                                            ["cannot get model 'nobody-xyz/none'", "pass --tuned"]),
    "top-p while greedy": (lambda d, m, c: ("generate", "--model", m, "--prompt", "x", "--top-p", "0.9"),
                           ["--top-p is for sampling", "--temperature > 0"]),
    "system turn as raw text": (lambda d, m, c: ("generate", "--model", m, "--prompt", "x", "--system", "s",
                                                 "--no-chat"), ["--system", "--no-chat"]),
    "compare without an adapter": (lambda d, m, c: ("generate", "--model", m, "--prompt", "x", "--compare"),
                                   ["--compare answers with the base model beside each --adapter"]),
    "export missing adapter": (lambda d, m, c: ("export", d / "nope", "--output", d / "o"), ["does not exist"]),
    "export bad dtype": (lambda d, m, c: ("export", d, "--output", d / "o", "--dtype", "int8"), ["--dtype"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(cli, bad_inputs, tiny_llama, chat_data, name):
    make_args, fragments = CASES[name]
    result = cli(*make_args(bad_inputs, tiny_llama, chat_data))
    assert_user_error(result, *fragments)
    assert not (bad_inputs / "o").exists()


def test_a_failed_run_leaves_no_folder_it_made(cli, tmp_path, tiny_llama, chat_data, monkeypatch):
    """The run's folder was removed, but parents it made stayed: an empty runs/ after the README's first
    command run offline, or sub/dir/ for --output sub/dir/run. A folder that was there stays."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    for out in ("sub/dir/run", "kept/new/run", None):
        flags = ["--output", out] if out else []
        result = cli("train", "--model", tiny_llama, "--data", chat_data, "--targets", "nosuch", *flags)
        assert_user_error(result, "--targets")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_a_model_that_fails_its_own_forward_is_named(cli, tmp_path, tiny_llama, chat_data, monkeypatch):
    """A model (or config) that transformers cannot run was reported as lora's 'internal error'."""
    import transformers.models.llama.modeling_llama as llama

    def broken(self, *args, **kwargs):
        raise RuntimeError("shape '[1, 4, 4, 8]' is invalid for input of size 64")

    monkeypatch.setattr(llama.LlamaAttention, "forward", broken)
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", tmp_path / "run")
    assert code == 1 and "error: LlamaForCausalLM fails in its own forward pass over 4 tokens, before any LoRA " \
                         "(RuntimeError: shape '[1, 4, 4, 8]' is invalid for input of size 64); the model or its " \
                         "config.json does not run in transformers" in " ".join(err.split()), err
    assert "internal error" not in err and not (tmp_path / "run").exists()


def test_all_flag_problems_are_reported_at_once(cli, tmp_path, tiny_llama, chat_data):
    result = cli(*train_args(tiny_llama, chat_data, tmp_path / "o", "--rank", "0", "--lr", "-1", "--batch-size", "0"))
    assert_user_error(result, "--rank", "--lr", "--batch-size")


def test_malformed_command_line_is_usage_error(cli, tiny_llama, chat_data, tmp_path):
    assert_user_error(cli(*train_args(tiny_llama, chat_data, tmp_path / "o", "--rank", "abc")), code=2)
    assert_user_error(cli("train", "--no-such-flag"), code=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama, chat_data):
    from lora_cli.cli import main

    run = tmp_path_factory.mktemp("runs") / "run"
    with pytest.raises(SystemExit) as e:
        main(list(map(str, train_args(tiny_llama, chat_data, run, "--save-every", "1"))))
    assert e.value.code == 0
    return run


def test_resume_with_changed_rank(cli, run_dir):
    assert_user_error(cli("train", "--output", run_dir, "--resume", "--rank", "8"), "cannot change --rank")


def test_resume_finished_run_says_how_to_continue(cli, run_dir):
    assert_user_error(cli("train", "--output", run_dir, "--resume"), "--max-steps")


def test_merge_with_corrupt_or_configless_adapter(cli, run_dir, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir, corrupt, ignore=shutil.ignore_patterns("checkpoints"))
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(cli("merge", corrupt, "--output", tmp_path / "o"), "corrupt or truncated")
    (corrupt / "adapter_config.json").unlink()
    assert_user_error(cli("merge", corrupt, "--output", tmp_path / "o"), "no adapter_config.json")
    assert not (tmp_path / "o").exists()


def test_merge_onto_base_with_other_shapes(cli, run_dir, tmp_path):
    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama", vocab=320)
    model.config.hidden_size = 32
    wide = tmp_path / "wide"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64)).save_pretrained(wide)
    tiny_tokenizer().save_pretrained(wide)
    assert_user_error(cli("merge", run_dir, "--base", wide, "--output", tmp_path / "o"), "does not fit", "q_proj")
    assert not (tmp_path / "o").exists()


def test_merge_dtype_values(cli, run_dir, tmp_path):
    """auto (the base's dtype) as train and generate read it; the short names the message lists work."""
    assert_user_error(cli("merge", run_dir, "--output", tmp_path / "o", "--dtype", "float8"),
                      "--dtype 'float8' is not one of auto, float32, bfloat16, float16 (or fp32, bf16, fp16)")
    from safetensors.torch import load_file

    for value, stored in (("auto", torch.float32), ("bf16", torch.bfloat16)):  # (the tiny base is float32)
        code, _, err = cli("merge", run_dir, "--output", tmp_path / value, "--dtype", value)
        assert code == 0, err
        assert {t.dtype for t in load_file(tmp_path / value / "model.safetensors").values()} == {stored}


def test_merge_onto_a_base_without_tokenizer_writes_none(cli, run_dir, bad_inputs):
    """transformers 5 builds an empty tokenizer for such a directory: it must not be saved as if it were one. The
    merged model has none either: said."""
    code, _, err = cli("merge", run_dir, "--base", bad_inputs / "untokenized", "--output", bad_inputs / "m")
    assert code == 0, err
    assert "warning: the base" in err and "has no tokenizer files, so neither has the merged model" in " ".join(
        err.split())
    assert sorted(p.name for p in (bad_inputs / "m").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]


@pytest.mark.parametrize("command", ["merge", "export"])
def test_output_the_file_system_refuses_names_the_users_path(cli, run_dir, tmp_path, command):
    (tmp_path / "file").write_text("")
    assert_user_error(cli(command, run_dir, "--output", tmp_path / "file" / "o"),
                      f"cannot write {tmp_path / 'file' / 'o'}: {tmp_path / 'file'} is a file, not a folder")


def test_output_exists_without_force(cli, run_dir, tiny_llama, chat_data):
    before = sorted(p.name for p in run_dir.iterdir())
    assert_user_error(cli(*train_args(tiny_llama, chat_data, run_dir)), "holds an earlier run; pass --force")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_force_never_deletes_what_lora_did_not_write(cli, run_dir, tiny_llama, chat_data, tmp_path, monkeypatch):
    """train --force replaces an earlier run's files (what else its folder holds, an export of it say, stays), and
    never writes a run among a folder of other files (it did: the user's, a data folder's), nor tells to pass
    --force where --force would not help; merge and export replace a whole folder, so they refuse one of other
    files, the current folder and any folder holding it."""
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("meow")
    for args in (("merge", run_dir, "--output", other, "--force"), ("export", run_dir, "--output", other, "--force")):
        assert_user_error(cli(*args), f"--output {other} is a folder lora did not write")
    for force in ((), ("--force",)):
        assert_user_error(cli(*train_args(tiny_llama, chat_data, other, *force)),
                          f"--output {other} is not a lora run (it holds cat.jpg); the run would be written among "
                          "its files (--force replaces only an earlier run's)")
    assert [p.name for p in other.iterdir()] == ["cat.jpg"]
    run_copy = tmp_path / "run_copy"
    shutil.copytree(run_dir, run_copy)
    assert cli("export", run_copy, "--output", run_copy / "export")[0] == 0  # a run folder holding its export
    (run_copy / ".lock").write_text("")
    code, _, err = cli(*train_args(tiny_llama, chat_data, run_copy, "--force"))  # over the run it holds
    assert code == 0 and (run_copy / "export" / "adapter_model.safetensors").is_file(), err
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".gitkeep").write_text("")  # an empty folder, to the run
    assert cli(*train_args(tiny_llama, chat_data, hidden))[0] == 0 and (hidden / ".gitkeep").is_file()
    (tmp_path / "notes.txt").write_text("mine")  # a file where a folder goes
    assert_user_error(cli("merge", run_dir, "--output", tmp_path / "notes.txt", "--force"), "is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for args in (("export", copy, "--output", copy, "--force"), ("merge", copy, "--output", copy, "--force"),
                 ("resize", copy, "--rank", "2", "--output", copy, "--force"),
                 ("merge", copy, "--output", tiny_llama, "--force"),  # the adapter read, or its base
                 ("export", copy, "--output", tiny_llama, "--force")):
        assert_user_error(cli(*args), "which this command reads")
    assert (copy / "checkpoints").is_dir() and (tiny_llama / "model.safetensors").is_file()
    merged = tmp_path / "work" / "merged"
    assert cli("merge", run_dir, "--output", merged)[0] == 0
    (merged / "NOTES.md").write_text("my notes")  # a model folder with the user's own files
    assert_user_error(cli("merge", run_dir, "--output", merged, "--force"), "lora did not write (it holds NOTES.md)")
    (merged / "NOTES.md").unlink()
    assert cli("merge", run_dir, "--output", merged, "--force")[0] == 0  # its own output: replaced
    monkeypatch.chdir(merged)
    for out in (".", "..", str(merged)):
        assert_user_error(cli("merge", run_dir, "--output", out, "--force"), "is the current folder or holds it")
    assert (merged / "config.json").is_file()


def test_force_never_replaces_a_model_or_adapter_another_tool_wrote(cli, run_dir, tiny_llama, chat_data, tmp_path):
    """A downloaded model or a PEFT adapter holds the very file names lora writes: export/merge --force replaced
    any such folder (even the base the adapter names), train --force deleted a PEFT adapter's files. What lora
    writes carries its mark (safetensors metadata), and --force replaces only that."""
    model, adapter = tmp_path / "model", tmp_path / "peft"
    shutil.copytree(tiny_llama, model)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    before = {d: sorted(p.name for p in d.iterdir()) for d in (model, adapter)}
    for command in ("merge", "export"):
        assert_user_error(cli(command, run_dir, "--output", model, "--force"),
                          f"--output {model} is a folder lora did not write (it holds model.safetensors)")
        assert_user_error(cli(command, run_dir, "--output", adapter, "--force"),
                          f"--output {adapter} is a folder lora did not write (it holds adapter_model.safetensors)")
    assert_user_error(cli(*train_args(tiny_llama, chat_data, adapter, "--force")),
                      f"--output {adapter} holds adapter_config.json but is not a lora run")
    assert before == {d: sorted(p.name for p in d.iterdir()) for d in (model, adapter)}
    exported = tmp_path / "exported"  # lora's own outputs are replaced, as before
    for _ in range(2):
        code, _, err = cli("export", run_dir, "--output", exported, "--force")
        assert code == 0, err


def test_a_system_message_for_a_model_without_a_chat_template(cli, tiny_gpt2):
    assert_user_error(cli("generate", "--model", tiny_gpt2, "--system", "be brief", "--prompt", "hi"),
                      "--system needs a chat template, and this model has none")


def test_generate_with_a_template_that_refuses_the_prompt(cli, tmp_path):
    """Gemma's template raises on a system turn: one error line with what to try, no traceback."""
    from tiny import save_tiny

    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    model = save_tiny(tmp_path / "m", chat_template=no_system)
    assert_user_error(cli("generate", "--model", model, "--system", "be brief", "--prompt", "hi"),
                      "chat template cannot render this prompt", "System role not supported", "without --system")


def test_unsupported_adapter_tensors_are_named(cli, run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    odd = tmp_path / "odd"
    shutil.copytree(run_dir, odd, ignore=shutil.ignore_patterns("checkpoints"))
    t = load_file(str(odd / "adapter_model.safetensors"))
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 320)
    save_file(t, str(odd / "adapter_model.safetensors"))
    from tiny import tiny_model

    from lora_cli.errors import UserError
    from lora_cli.lora.adapter import load_adapter

    with pytest.raises(UserError, match=r"holds LoRA on embedding layers \(model.embed_tokens\); lora implements"):
        load_adapter(tiny_model("llama", vocab=320), odd)
    # every command that reads the factors says so too, never dropping the embedding part silently
    for args in (("merge", odd, "--output", tmp_path / "m"), ("export", odd, "--output", tmp_path / "x"),
                 ("resize", odd, "--rank", "2", "--output", tmp_path / "r"),
                 ("combine", odd, run_dir, "--output", tmp_path / "c")):
        assert_user_error(cli(*args), "LoRA on embedding layers (model.embed_tokens)")


def test_a_pickled_adapter_is_refused_with_the_conversion_to_run(cli, run_dir, tmp_path):
    """Older PEFT adapters are adapter_model.bin: never unpickled (--allow-pickle is for base models, it said
    nothing of it); the error gives the one-liner."""
    from safetensors.torch import load_file

    old = tmp_path / "it's old"  # a quote in the path: the one-liner still pastes
    old.mkdir()
    shutil.copy(run_dir / "adapter_config.json", old)
    torch.save(load_file(str(run_dir / "adapter_model.safetensors")), old / "adapter_model.bin")
    code, _, err = cli("inspect", old)
    assert code == 1 and "lora reads adapters as safetensors only, --allow-pickle is for base models" in err
    command = err.split("convert it once: ")[1].strip()
    assert command.startswith("python -c ")
    subprocess.run(shlex.quote(sys.executable) + command[len("python"):], shell=True, check=True)
    code, out, err = cli("inspect", old, "--json")
    assert code == 0 and json.loads(out)["trainable_params"] == json.loads(cli("inspect", run_dir, "--json")[1])["trainable_params"]


def test_ctrl_c_is_one_error_line_and_exit_130(monkeypatch, capsys, run_dir):
    """typer turns KeyboardInterrupt into a silent exit 130: the user still gets the one line."""
    import lora_cli.inspection
    from lora_cli.cli import main

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_cli.inspection, "adapter_facts", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(run_dir)])
    assert exit_.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"


def test_debug_shows_the_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lora_cli", "inspect", str(tmp_path), "--debug"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "UserError" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lora_cli", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, json.dumps({"v": 1}))
    code = ("import os, sys; from lora_cli.errors import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_text('{\"v\": 2, \"half')\n"
            "    os._exit(9)\n")  # the process dies mid-write, before the rename
    r = subprocess.run([sys.executable, "-c", code, str(target)])
    assert r.returncode == 9
    assert json.loads(target.read_text()) == {"v": 1}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Atomic writes go through a private temp file/folder; what lands has the mode a plain write would give."""
    import os

    from safetensors.torch import save_file

    from lora_cli.errors import atomic_dir, atomic_path

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
        with atomic_path(tmp_path / "w.safetensors") as tmp:  # safetensors creates its files 0600
            save_file({"w": torch.zeros(2)}, str(tmp))
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inside.txt").write_text("x")
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    finally:
        os.umask(old)
    for f in ("f.json", "w.safetensors", "d/inside.txt", "d/model.safetensors"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_broken_parquet_file_gets_our_line_only(cli, tiny_llama, tmp_path):
    (tmp_path / "bad.parquet").write_text("not parquet")
    code, _, err = cli(*train_args(tiny_llama, tmp_path / "bad.parquet", tmp_path / "o"))
    assert code == 1 and "Failed to read schema" not in err, err  # datasets logs what it then raises
    assert err.strip().splitlines()[-1].startswith(f"error: cannot read {tmp_path / 'bad.parquet'}: Parquet magic")


def test_without_a_network_hub_ids_are_read_from_the_cache_at_once(cli, tiny_llama, tmp_path, monkeypatch):
    """No DNS for the Hub: a note, then the cache only (huggingface_hub would retry every file for ~45 s,
    logging each try, before falling back to the cache all the same)."""
    import socket

    import datasets
    from huggingface_hub import constants

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    for args in (("generate", "--model", "nobody-xyz/none", "--prompt", "hi"),
                 train_args(tiny_llama, "nobody-xyz/no-data", tmp_path / "o")):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        code, _, err = cli(*args)
        assert code == 1 and "cannot be reached (offline?)" in " ".join(err.split()), err
        assert "Retrying" not in err and err.strip().splitlines()[-1].startswith("error: cannot load")
    assert datasets.config.HF_HUB_OFFLINE


@pytest.mark.parametrize("rank", ["1", "0"])  # process 0 too: the one that failed may be another (a checkpoint's
def test_a_peer_gone_is_not_an_internal_error(monkeypatch, capsys, rank):  # rng_state_1.pt missing on resume)
    """Under torchrun, when process 0 stopped on a user error, process 1 printed gloo's 'Connection closed by
    peer' as an internal error, which read as a crash of the tool."""
    import lora_cli.cli

    def app(**_):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:4")

    monkeypatch.setattr(lora_cli.cli, "app", app)
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as e:
        lora_cli.cli.main(["train"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.strip() == (f"error: process {rank} stopped: another process of this run ended "
                                                 "first (its error says why)")


@pytest.mark.parametrize("raised", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 16192 vs 16080"),
                                    RuntimeError("Error while serializing: IoError(No space left on device (os error 28))"),
                                    RuntimeError("basic_ios::clear: iostream error"),  # torch.save, another moment
                                    OSError("3072 requested and 2624 written"),  # numpy's tofile (GGUF export)
                                    OSError(28, "No space left on device", "/run/x.safetensors")])
def test_a_full_disk_is_said_plainly(monkeypatch, capsys, raised):
    """torch.save and safetensors report a full disk in their own words (not OSError): one plain line."""
    import lora_cli.cli

    def app(**_):
        raise raised

    monkeypatch.setattr(lora_cli.cli, "app", app)
    with pytest.raises(SystemExit) as e:
        lora_cli.cli.main(["train"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.lower().startswith("error: no space left on device")
    assert "internal error" not in err and len(err.strip().splitlines()) == 1


def test_an_adapter_config_whose_rank_is_not_the_weights_is_refused(cli, run_dir, tmp_path):
    """r edited (or the config of another adapter): merging scaled every update by alpha / r with the wrong r.
    PEFT refuses it with a size mismatch; so does every command here, inspect included."""
    edited = tmp_path / "edited"
    shutil.copytree(run_dir, edited, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = json.loads((edited / "adapter_config.json").read_text())
    cfg["r"] = 2 * cfg["r"]
    (edited / "adapter_config.json").write_text(json.dumps(cfg))
    said = f"has rank {cfg['r'] // 2}, its config says r={cfg['r']}"
    for args in (("merge", edited, "--output", tmp_path / "m"), ("export", edited, "--output", tmp_path / "x"),
                 ("inspect", edited), ("resize", edited, "--rank", "1", "--output", tmp_path / "r")):
        assert_user_error(cli(*args), "does not match its adapter_config.json", said)
    assert not any((tmp_path / n).exists() for n in "mxr")


def test_an_adapter_config_that_says_dora_or_a_fractional_rank_is_checked(cli, run_dir, tmp_path):
    """use_dora without magnitudes was an internal KeyError in merge (inspect took it); r 4.5 was read as 4."""
    for edit, said in ((dict(use_dora=True), "no DoRA magnitude (lora_magnitude_vector) for "),
                       (dict(r=4.5), "malformed value (r must be a whole number, got 4.5)")):
        edited = tmp_path / "edited"
        shutil.rmtree(edited, ignore_errors=True)
        shutil.copytree(run_dir, edited, ignore=shutil.ignore_patterns("checkpoints"))
        cfg = json.loads((edited / "adapter_config.json").read_text())
        (edited / "adapter_config.json").write_text(json.dumps(cfg | edit))
        for args in (("merge", edited, "--output", tmp_path / "m"), ("inspect", edited)):
            assert_user_error(cli(*args), said)
        assert not (tmp_path / "m").exists()


def test_a_run_that_has_not_finished_points_to_its_checkpoint(cli, run_dir, tmp_path):
    cut = tmp_path / "cut run"
    shutil.copytree(run_dir, cut)
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_summary.json"):
        (cut / name).unlink()
    assert_user_error(cli("inspect", cut), "is a run that has not finished",
                      f"lora train --output '{cut}' --resume", str(cut / "checkpoints/step-000002"))


def test_merge_says_where_a_missing_base_came_from(cli, run_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    for command in (("merge", moved, "--output", tmp_path / "m"),
                    ("export", moved, "--format", "gguf", "--output", tmp_path / "m.gguf")):
        assert_user_error(cli(*command), "does not exist", "base_model_name_or_path; --base MODEL gives another")


def test_a_tokenizer_of_another_model_is_named(cli, tiny_llama, chat_data, tmp_path):
    """Token ids past the embedding table were an IndexError inside the forward."""
    from tiny import tiny_model

    small = tmp_path / "small-vocab"
    tiny_model("llama", vocab=64).save_pretrained(small)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, small / f.name)
    assert_user_error(cli(*train_args(small, chat_data, tmp_path / "o")), "the model's embedding table has 64 rows",
                      "is not this model's")
    assert_user_error(cli("generate", "--model", small, "--prompt", "What is color 3?", "--max-new-tokens", "2"),
                      "the model's embedding table has 64 rows")
    # the model's own tokenizer with tokens added and the embeddings not resized: said so, not "another model's"
    grown = tmp_path / "grown"
    shutil.copytree(tiny_llama, grown)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(grown)
    tok.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    tok.save_pretrained(grown)
    assert_user_error(cli("generate", "--model", grown, "--prompt", "call <tool>", "--max-new-tokens", "2"),
                      f"the tokenizer's added token '<tool>' (id {len(tok) - 1}) has no row in the model's embedding "
                      "table", "without resizing the model's embeddings")


def test_a_run_stopped_before_its_first_checkpoint_says_to_start_again(cli, tiny_llama, chat_data, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args(tiny_llama, chat_data, run))[0] == 0
    shutil.rmtree(run / "checkpoints")
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_summary.json"):
        (run / name).unlink()
    assert_user_error(cli("train", "--output", run, "--resume"), "has no complete checkpoint",
                      "start it again with --force")
    assert_user_error(cli("inspect", run), "stopped before its first checkpoint",
                      f"lora train --config {run / 'train_config.yaml'} --force")
    code, _, err = cli("train", "--config", run / "train_config.yaml", "--force")  # as the message says
    assert code == 0, err
    assert (run / "adapter_config.json").is_file()


def test_an_error_every_process_raises_is_said_once(monkeypatch, capsys):
    """Under torchrun every process stops on the same signal or NaN: only rank 0 prints the line."""
    import lora_cli.cli
    from lora_cli.errors import UserError

    def app(**_):
        raise UserError("stopped by SIGTERM after step 3", exit_code=143, shared=True)

    monkeypatch.setattr(lora_cli.cli, "app", app)
    for rank, said in (("1", ""), ("0", "error: stopped by SIGTERM after step 3\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            lora_cli.cli.main(["train"])
        assert e.value.code == 143 and capsys.readouterr().err == said


def test_temp_files_of_a_killed_process_are_swept_and_no_others(tmp_path):
    import os
    import socket

    from lora_cli.errors import atomic_write_text, sweep_stale_temps

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    host = socket.gethostname().replace(".", "_")
    names = {"dead": f".model-00001.safetensors.{host}-{dead}.ab_1.tmp",  # the name holds dots
             "alive": f".model-00001.safetensors.{host}-{os.getpid()}.cd_2.tmp",
             "elsewhere": f".model-00001.safetensors.box-{dead}.ef_3.tmp",
             "other file": f".config.json.{host}-{dead}.gh_4.tmp", "not ours": ".model.tmp"}
    for n in names.values():
        (tmp_path / n).write_text("half")
    sweep_stale_temps(tmp_path, "model-00001.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "dead")
    atomic_write_text(tmp_path / "config.json", "{}")  # writing a file sweeps its own leftovers
    assert not (tmp_path / names["other file"]).exists() and (tmp_path / "config.json").read_text() == "{}"
    sweep_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["alive"], names["elsewhere"],
                                                                 names["not ours"], "config.json"])


def test_sigterm_unwinds_like_ctrl_c(cli, run_dir, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's, `timeout`'s) outside the training loop killed the process where it stood: a merge
    left its temporary folder, a run stopped before its first step left an empty folder, and nothing was said.
    It now unwinds as Ctrl-C does: exit 143, `error: terminated`, nothing half-written left behind."""
    import os
    import signal

    import lora_cli.merging as merging

    def killed(*args):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(merging, "_write_tokenizer_and_generation", killed)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = cli("merge", run_dir, "--output", tmp_path / "m")
    assert code == 143 and err.strip().splitlines()[-1] == "error: terminated" and "Traceback" not in err, err
    assert not (tmp_path / "m").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handler is back


def test_a_run_still_training_is_named_as_such(cli, run_dir, tmp_path):
    """export/merge of a run that is still training said 'resume it', which then said 'in use'."""
    import fcntl

    run = tmp_path / "training"
    shutil.copytree(run_dir, run)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()
    with open(run / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_user_error(cli("export", run, "--output", tmp_path / "x"), "is a run still training (a lora train "
                          "holds it): wait for it to finish, or use one of its checkpoints")
    assert_user_error(cli("export", run, "--output", tmp_path / "x"), "is a run that has not finished", "--resume")


def test_an_ascii_terminal_gets_escapes_not_a_crash(run_dir, tmp_path):
    """stdout in ASCII (PYTHONIOENCODING, LANG=C on old systems): a path or answer with é was an internal error."""
    import os

    odd = tmp_path / "dir ü"
    shutil.copytree(run_dir, odd)
    r = subprocess.run([sys.executable, "-m", "lora_cli", "inspect", str(odd)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr
    assert "dir \\xfc" in " ".join(r.stdout.split()) and "rank" in r.stdout


def test_a_setting_given_twice_keeps_the_last(cli, tiny_llama, chat_data, tmp_path):
    """Only options that name inputs and outputs must be given once; a setting overridden later on the line (a
    script's defaults, then the user's) keeps the last value, as click does."""
    code, out, err = cli(*train_args(tiny_llama, chat_data, tmp_path / "o", "--rank", "4", "--rank", "8", "--dry-run"))
    assert code == 0 and "\nrank: 8\n" in out, err


def test_a_folder_of_named_adapters_says_to_pass_one(cli, run_dir, tmp_path):
    """PEFT saves adapters other than "default" in folders of their names: the parent was 'not an adapter'."""
    for name in ("alpha", "beta"):
        shutil.copytree(run_dir, tmp_path / "many" / name, ignore=shutil.ignore_patterns("checkpoints"))
    assert_user_error(cli("inspect", tmp_path / "many"), "is not an adapter itself: it holds the adapters alpha, beta",
                      f"pass one of them, e.g. {tmp_path / 'many' / 'alpha'}")
    assert cli("inspect", tmp_path / "many" / "beta")[0] == 0


def test_a_stopped_run_exits_though_a_librarys_thread_would_not(tmp_path):
    """A second Ctrl-C cut the tokenizing pool's clean-up half-way: its thread waited forever, and the
    interpreter's exit with it, after 'error: interrupted'. A stopped run now ends anyway."""
    code = ("import sys, threading; import lora_cli.inspection as i, lora_cli.cli as c\n"
            "def stuck(*_):\n"
            "    threading.Thread(target=threading.Event().wait).start()  # never ends, not a daemon\n"
            "    raise KeyboardInterrupt\n"
            "i.adapter_facts = stuck\n"
            "sys.argv = ['lora', 'inspect', '.']\n"
            "c.main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 130 and r.stderr == "error: interrupted\n", r.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_ctrl_c_a_library_swallowed_still_stops_the_run(cli, tiny_llama, chat_data, tmp_path, monkeypatch, sig):
    """A Ctrl-C while modules import can land in a library's clean-up (a __del__), where Python prints
    'Exception ignored … KeyboardInterrupt' and goes on: the run trained to its end and exited 0. The CLI's
    handler remembers it; the loop stops at its first step with a checkpoint to resume from."""
    import signal

    import lora_cli.training

    real = lora_cli.training.encode_datasets

    number = getattr(signal, sig)

    class CleanedUp:
        def __del__(self):
            signal.getsignal(number)(number, None)

    def encode(*args, **kwargs):
        CleanedUp()  # the interrupt raised inside __del__: swallowed
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_cli.training, "encode_datasets", encode)
    before = signal.getsignal(number)
    code, _, err = cli("train", "--model", tiny_llama, "--data", chat_data, "--output", tmp_path / "r", "--max-steps", "6")
    assert code == 128 + number and err.strip().splitlines()[-1].startswith(f"error: stopped by {sig} after step 1; "
                                                                           "checkpoint"), err
    assert json.loads((tmp_path / "r" / "checkpoints" / "step-000001" / "trainer_state.json").read_text())["step"] == 1
    assert signal.getsignal(number) is before


def test_a_model_saved_without_its_lm_head_is_refused(cli, chat_data, tmp_path):
    """A decoder saved by AutoModel (no lm_head.weight) trained against the random head transformers made up, a
    new one in every process: generate answered differently each time and merge --verify blamed itself."""
    from tiny import save_tiny

    full = save_tiny(tmp_path / "full", "llama")
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(full).model.save_pretrained(bare)  # the body alone: LlamaModel
    for f in full.glob("tokenizer*"):
        shutil.copy(f, bare)
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    for args in (("train", "--model", bare, "--data", chat_data, "--output", tmp_path / "run", "--max-steps", "1"),
                 ("generate", "--model", bare, "--prompt", "hi", "--max-new-tokens", "2")):
        code, _, err = cli(*args)
        assert code == 1 and err.strip().splitlines()[-1] == (
            f"error: model '{bare}' lacks weights its architecture has: lm_head.weight; transformers would start them "
            "at random (saved without its LM head, by AutoModel rather than AutoModelForCausalLM?)"), err
    assert not (tmp_path / "run").exists()


def test_a_missing_shard_is_named_and_pickles_are_offered_once():
    """A Hub model whose download stopped between shards was told to 'pass --allow-pickle' (a security switch
    for an unfinished download), and so was one loaded with --allow-pickle already."""
    from lora_cli.models import ModelSource, _load_failure

    hub = ModelSource("org/m", "org/m", "hub")
    shard = OSError("org/m does not appear to have a file named model-00002-of-00002.safetensors. Checkout …")
    said = _load_failure(hub, "model", shard)
    assert "model-00002-of-00002.safetensors, one of its weight shards, is missing" in said and "pickle" not in said
    none = OSError("org/m does not appear to have a file named model.safetensors or model.safetensors.index.json")
    assert "if its weights are pickled (*.bin), --allow-pickle loads them" in _load_failure(hub, "model", none)
    assert "--allow-pickle" not in _load_failure(hub, "model", none, allow_pickle=True)
    gone = FileNotFoundError("[Errno 2] No such file or directory: '/c/snapshots/1/pytorch_model-00002-of-00002.bin'")
    assert "pytorch_model-00002-of-00002.bin, one of its weight shards, is missing" in _load_failure(hub, "model", gone,
                                                                                                    allow_pickle=True)
    cut = ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a `tokenizers` file,\n(2) …")
    assert _load_failure(hub, "tokenizer", cut).endswith("from one of: (1) a `tokenizers` file,")  # (ended at ':')


def test_hub_dataset_split_and_configuration_errors_name_the_flag():
    """datasets' 'Unknown split "validation". Should be one of [...]' and its offline 'multiple configurations
    in the cache' named neither --data-split nor --data-config."""
    from lora_cli.data import _dataset_error

    split = ValueError('Unknown split "validation". Should be one of [\'train\', \'test\'].')
    assert _dataset_error(split, "--eval-data-config") == ("it has no split 'validation' (it has train, test): "
                                                          "--eval-data-split names one")
    cached = ValueError("There are multiple 'org/two' configurations in the cache: b, a\nPlease specify which …")
    assert _dataset_error(cached, "--data-config") == ("the cache holds several of its configurations (b, a): pick "
                                                       "one with --data-config")


def test_a_gguf_named_in_capitals_is_read_as_one(smollm2_gguf, tmp_path):
    """`X.GGUF` was "a file; give a transformers directory, a .gguf file or a Hub id"."""
    from lora_cli.models import resolve_model

    link = tmp_path / "SmolLM2.GGUF"
    link.symlink_to(smollm2_gguf)
    assert resolve_model(str(link)).kind == "gguf"


def test_weights_saved_as_a_variant_only_are_named_so(cli, chat_data, tmp_path):
    """save_pretrained(variant="fp16") writes model.fp16.safetensors: the error said there were no safetensors
    weights and offered --allow-pickle, which cannot help."""
    from tiny import tiny_model, tiny_tokenizer

    folder = tmp_path / "variant"
    tiny_model("llama", vocab=320).save_pretrained(folder, variant="fp16")
    tiny_tokenizer().save_pretrained(folder)
    assert (folder / "model.fp16.safetensors").is_file()
    assert_user_error(cli(*train_args(folder, chat_data, tmp_path / "o")),
                      "holds its weights as the fp16 variant only (model.fp16.safetensors",
                      "rename the files without the variant")
    # pickled weights beside the variant: what --allow-pickle loads (the variant check refused them)
    torch.save(tiny_model("llama", vocab=320).state_dict(), folder / "pytorch_model.bin")
    assert_user_error(cli(*train_args(folder, chat_data, tmp_path / "o")), "--allow-pickle")
    code, _, err = cli(*train_args(folder, chat_data, tmp_path / "o"), "--allow-pickle")
    assert code == 0, err
