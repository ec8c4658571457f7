"""Every file type and record shape trains end to end through the CLI; eval numbers by hand."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_cli.data import IGNORE, Encoder
from lora_cli.lora.adapter import load_adapter

SHAPES = {
    "text": [{"text": f"The color number {i} is purple and the sky is blue."} for i in range(8)],
    "prompt_completion": [{"prompt": f"Question {i}:", "completion": " purple", "id": i} for i in range(8)],
    "messages": [{"messages": [{"role": "user", "content": f"hello {i}"},
                               {"role": "assistant", "content": "purple"}]} for i in range(8)],
    "alpaca": [{"instruction": "Name a color", "input": f"number {i}", "output": "purple"} for i in range(8)],
    "sharegpt": [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": "purple"}]}
                 for i in range(8)],
}
RUN = ["--max-steps", "2", "--batch-size", "4", "--dropout", "0"]


def write(path, records):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".csv":
        pd.DataFrame(records).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(records).to_parquet(path)
    elif suffix == ".txt":
        path.write_text("\n\n".join(r["text"] for r in records) + "\n")
    return path


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_record_shape_trains(cli, tiny_llama, tmp_path, shape):
    data = write(tmp_path / "d.jsonl", SHAPES[shape])
    code, _, err = cli("train", "--model", tiny_llama, "--data", data, "--output", tmp_path / "run", *RUN)
    assert code == 0, err
    assert f"({shape})" in err and json.loads((tmp_path / "run/train_summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("suffix,shape", [(".json", "messages"), (".csv", "prompt_completion"),
                                          (".parquet", "alpaca"), (".txt", "text"), (".csv", "text")])
def test_each_file_type_trains(cli, tiny_llama, tmp_path, suffix, shape):
    data = write(tmp_path / f"d{suffix}", SHAPES[shape])
    code, _, err = cli("train", "--model", tiny_llama, "--data", data, "--output", tmp_path / "run", *RUN)
    assert code == 0, err
    assert "8 records" in err


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
def test_a_leading_byte_order_mark_is_not_data(tmp_path, suffix):
    """Windows editors start UTF-8 files with a BOM: it must neither fail the JSON check nor enter the text."""
    from lora_cli.data import load_records

    shape = "text" if suffix == ".txt" else "prompt_completion"
    path = write(tmp_path / f"d{suffix}", SHAPES[shape][:2])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    records, _ = load_records(str(path), "train")
    first = records[0]["text" if shape == "text" else "prompt"]
    assert first == SHAPES[shape][0]["text" if shape == "text" else "prompt"]


def test_directory_with_valid_split_and_packing(cli, tiny_llama, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write(d / "train.jsonl", SHAPES["messages"])
    write(d / "valid.jsonl", SHAPES["messages"][:3])
    code, _, err = cli("train", "--model", tiny_llama, "--data", d, "--output", tmp_path / "run", *RUN, "--packing")
    assert code == 0, err
    assert "packed into" in err
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" in rows[-1] and "eval_ppl" in rows[-1]


def test_custom_chat_template_file(cli, tiny_gpt2, tmp_path):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                   "{% if add_generation_prompt %}<assistant>{% endif %}")
    data = write(tmp_path / "d.jsonl", SHAPES["messages"])
    code, _, err = cli("train", "--model", tiny_gpt2, "--data", data, "--output", tmp_path / "run", *RUN,
                       "--chat-template", tpl)
    assert code == 0, err
    code, _, err = cli("merge", tmp_path / "run", "--output", tmp_path / "m")
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template == tpl.read_text()


def test_eval_loss_equals_a_hand_computation(cli, tiny_llama, tmp_path):
    train = write(tmp_path / "train.jsonl", SHAPES["messages"])
    valid = write(tmp_path / "valid.jsonl", SHAPES["prompt_completion"][:3])
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_llama, "--data", train, "--eval-data", valid, "--output", run, *RUN,
               "--lr", "1e-2")[0] == 0
    summary = json.loads((run / "train_summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    load_adapter(model, run)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    exs, _ = Encoder(tok, 1024).encode_all([json.loads(x) for x in valid.read_text().splitlines()])
    total, count = 0.0, 0
    with torch.no_grad():
        for e in exs:  # one record at a time, no padding, plain log-softmax
            logp = torch.log_softmax(model.eval()(input_ids=torch.tensor([e.input_ids])).logits[0].double(), -1)
            for t in range(1, len(e.input_ids)):
                if e.labels[t] != IGNORE:
                    total -= float(logp[t - 1, e.labels[t]])
                    count += 1
    assert summary["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert summary["best_eval_step"] == 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_ppl"] == pytest.approx(2.718281828 ** (total / count), rel=1e-4)
