"""Every file type and record shape trains end to end through the CLI; eval numbers by hand."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from tiny import save_tiny, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_cli.data import IGNORE, Encoder, read_file
from lora_cli.errors import UserError
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


@pytest.mark.parametrize("first,second", [("messages", "prompt_completion"), ("text", "prompt_completion"),
                                           ("prompt_completion", "text"), ("alpaca", "messages")])
def test_a_file_mixing_record_shapes_names_the_record_that_differs(cli, tiny_llama, tmp_path, first, second):
    # the Arrow reader gives every record every key (None where absent): a null key is not a shape
    data = write(tmp_path / "d.jsonl", SHAPES[first][:3] + SHAPES[second][:1])
    code, _, err = cli("train", "--model", tiny_llama, "--data", data, "--output", tmp_path / "run", *RUN)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: training data record 4: shape {second} (keys: ")
    assert f"differs from the first record's ({first})" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("orient", ["columns", "index", "split"])
def test_a_pandas_table_saved_as_json_says_how_to_save_records(tmp_path, orient):
    """DataFrame.to_json()'s default (orient='columns') failed with 'prompt must be a string, got dict', the
    other layouts as an unknown shape with keys columns, data, index."""
    df = pd.DataFrame(SHAPES["prompt_completion"][:3])
    df.to_json(tmp_path / "d.json", orient=orient)
    with pytest.raises(UserError, match=rf"saved with to_json\(orient='{orient}'\), not records: save it with "
                                        r"df.to_json\(path, orient='records', lines=True\)"):
        read_file(tmp_path / "d.json")
    df.to_json(tmp_path / "r.json", orient="records")  # and what it says to do reads
    assert read_file(tmp_path / "r.json") == SHAPES["prompt_completion"][:3]


@pytest.mark.parametrize("header,hint", [("prompt, completion", "a column name has spaces around it"),
                                         ("prompt\tcompletion", "separated by tabs or semicolons"),
                                         ("prompt;completion", "separated by tabs or semicolons")])
def test_a_csv_header_read_wrong_gets_a_hint(tmp_path, header, hint):
    from tiny import tiny_tokenizer

    sep = {"prompt\tcompletion": "\t", "prompt;completion": ";"}.get(header, ",")
    (tmp_path / "d.csv").write_text(f"{header}\nhello{sep}world\n")
    with pytest.raises(UserError, match=rf"unknown shape .*\(.*{hint}"):
        Encoder(tiny_tokenizer(), 64).encode_all(read_file(tmp_path / "d.csv"))
    (tmp_path / "ok.csv").write_text("prompt,completion\nhello,world\n")  # (a header read right has no hint)
    assert len(Encoder(tiny_tokenizer(), 64).encode_all(read_file(tmp_path / "ok.csv"))[0]) == 1


def test_csv_cells_are_text_as_written(tmp_path):
    """pandas' defaults would read 'None', 'NA' and empty cells as null and '007' as the number 7."""
    from lora_cli.data import load_records

    (tmp_path / "d.csv").write_text("prompt,completion\nIs there a bug?,None\nwhat is 6*7,42\nbond,007\n"
                                    "a,NA\nb,\n")
    records, _ = load_records(str(tmp_path / "d.csv"))
    assert [r["completion"] for r in records] == ["None", "42", "007", "NA", ""]


def test_records_that_answer_with_nothing_are_counted_in_a_warning(cli, tiny_llama, tmp_path):
    """An empty CSV cell in the answer column trained the model to say nothing there, without a word."""
    (tmp_path / "d.csv").write_text("prompt,completion\nhello,world\ncolor,\nsize, \nname,Ann\n")
    code, out, err = cli("train", "--model", tiny_llama, "--data", tmp_path / "d.csv", "--output", tmp_path / "r",
                         *RUN)
    said = " ".join((out + err).split())
    assert code == 0 and "warning 2 records answer with nothing (an empty completion" in said, said
    code, out, err = cli("train", "--model", tiny_llama, "--data", tmp_path / "d.csv", "--output", tmp_path / "r2",
                         *RUN, "--train-on-prompt")
    assert code == 0 and "answer with nothing" in " ".join((out + err).split())
    (tmp_path / "ok.csv").write_text("prompt,completion\nhello,world\n")
    code, out, err = cli("train", "--model", tiny_llama, "--data", tmp_path / "ok.csv", "--output", tmp_path / "r3",
                         *RUN)
    assert code == 0 and "answer with nothing" not in out + err


def test_eval_records_cut_or_empty_are_counted_as_training_ones_are(cli, tiny_llama, tmp_path):
    """An eval record whose answer the length limit cut away vanished from the eval without a count, and empty
    eval answers went unmentioned: the header says both, and train_summary.json counts them."""
    (tmp_path / "train.csv").write_text("prompt,completion\nhello,world\nsize,big\n")
    (tmp_path / "eval.csv").write_text(f"prompt,completion\n{'hello ' * 100},world\ncolor,\nname,Ann\n")
    code, out, err = cli("train", "--model", tiny_llama, "--data", tmp_path / "train.csv", "--eval-data",
                         tmp_path / "eval.csv", "--max-length", "64", "--output", tmp_path / "r", *RUN)
    said = " ".join((out + err).split())
    assert code == 0, said
    assert "eval 3 records → 2 sequences" in said and "dropped 1 with nothing to score · truncated 1" in said
    assert "warning 1 record answers with nothing" in said and "the eval loss scores saying nothing there" in said
    summary = json.loads((tmp_path / "r" / "train_summary.json").read_text())
    assert (summary["eval_records"], summary["eval_examples"], summary["eval_dropped_no_loss"],
            summary["eval_truncated"]) == (3, 2, 1, 1)


def test_txt_paragraphs_split_at_lines_of_only_spaces(tmp_path):
    from lora_cli.data import load_records

    (tmp_path / "d.txt").write_text("first line\nstill first\n \t\nsecond\n\n\n   \nthird\n")
    records, _ = load_records(str(tmp_path / "d.txt"))
    assert records == [{"text": "first line\nstill first"}, {"text": "second"}, {"text": "third"}]


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


def test_line_separators_inside_strings_are_text(tmp_path):
    """JSON holds U+2028, U+2029 and U+0085 raw in strings (json.dumps(ensure_ascii=False) writes them so); a
    line of JSONL ends at a line feed only, and a .txt paragraph keeps them too."""
    recs = [{"prompt": "hello\u2028world", "completion": "red\x85green"}, {"prompt": "a\u2029b\x0cc", "completion": "d"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in recs), "utf-8")
    assert read_file(tmp_path / "d.jsonl") == recs
    (tmp_path / "d.txt").write_text("one\u2028line\r\nstill one\n\nsecond\x85end", "utf-8")
    assert read_file(tmp_path / "d.txt") == [{"text": "one\u2028line\nstill one"}, {"text": "second\x85end"}]


def test_arrow_null_fill_never_reaches_tool_calls(tmp_path):
    """Parquet (the Hub's format) gives a struct column the keys of every row, None where a row had none: a
    call to get_weather(city) would gain `"x": null, "y": null` from another row's add(x, y), and be trained
    so. JSON is read as written: a null there is the data's own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def call(name, args):
        return [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                   "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]}]

    def tool(name, props):
        return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}

    tools = [tool("get_weather", {"city": {"type": "string"}}), tool("add", {"x": {"type": "number"}})]
    recs = [{"messages": call("get_weather", {"city": "Paris"}), "tools": tools},
            {"messages": call("add", {"x": 1, "unit": None}), "tools": tools[1:]}]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    assert pa.Table.from_pylist(recs).to_pylist()[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] \
        == {"city": "Paris", "x": None, "unit": None}  # what Arrow makes of them
    got = read_file(tmp_path / "d.parquet")
    assert got[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert got[1]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}  # null either way
    assert got[0]["tools"] == tools and got[1]["tools"] == tools[1:]
    assert read_file(write(tmp_path / "d.jsonl", recs)) == recs



MESSAGES = SHAPES["messages"][:3]


@pytest.mark.parametrize("layout", ["columns", "one list of records", "pretty-printed record", "list", "lines"])
def test_json_file_layouts(tmp_path, layout):
    """What people save as .json: a list, lines, one object of columns (pandas' orient='list'), one object
    holding the records ({"version": …, "data": [...]}), or a single pretty-printed record."""
    from lora_cli.data import load_records

    text = {"columns": json.dumps({"messages": [r["messages"] for r in MESSAGES]}),
            "one list of records": json.dumps({"version": "1.0", "data": MESSAGES}, indent=2),
            "pretty-printed record": json.dumps(MESSAGES[0], indent=2),
            "list": json.dumps(MESSAGES, indent=2),
            "lines": "".join(json.dumps(r) + "\n" for r in MESSAGES)}[layout]
    (tmp_path / "d.json").write_text(text)
    records, _ = load_records(str(tmp_path / "d.json"), "train")
    assert records == (MESSAGES[:1] if layout == "pretty-printed record" else MESSAGES)


def test_a_csv_cell_may_hold_the_messages_as_json(cli, tiny_llama, tmp_path):
    from lora_cli.data import load_records

    pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in MESSAGES]}).to_csv(tmp_path / "d.csv", index=False)
    write(tmp_path / "d.jsonl", MESSAGES)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    from_csv = Encoder(tok, 512).encode_all(load_records(str(tmp_path / "d.csv"))[0])[0]
    from_jsonl = Encoder(tok, 512).encode_all(load_records(str(tmp_path / "d.jsonl"))[0])[0]
    assert [(e.input_ids.tolist(), e.labels.tolist()) for e in from_csv] == [(e.input_ids.tolist(), e.labels.tolist()) for e in from_jsonl]
    pd.DataFrame({"messages": ["[not json"]}).to_csv(tmp_path / "bad.csv", index=False)
    code, _, err = cli("train", "--model", tiny_llama, "--data", tmp_path / "bad.csv", "--output", tmp_path / "run")
    assert code == 1 and "record 1: 'messages' is a string but not valid JSON" in err


def test_directory_with_valid_split_and_packing(cli, tiny_llama, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write(d / "train.jsonl", SHAPES["messages"])
    write(d / "valid.jsonl", SHAPES["messages"][:3])
    code, _, err = cli("train", "--model", tiny_llama, "--data", d, "--output", tmp_path / "run", *RUN, "--packing",
                       "--eval-split", "0.25")
    assert code == 0, err
    assert "packed into" in err and "8 records" in err  # the split file is the eval data: nothing held out
    assert "note: --eval-split 0.25 is not used:" in err and "own validation split (3 records)" in " ".join(err.split())
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" in rows[-1] and "eval_ppl" in rows[-1]
    summary = json.loads((tmp_path / "run/train_summary.json").read_text())
    assert (summary["train_examples"], summary["chunked"]) == (8, 0)
    assert f"8 sequences packed into {summary['packed_sequences']} of" in " ".join(err.split())


def test_a_directory_laid_out_as_a_hub_dataset_repository(cli, tiny_llama, tmp_path):
    """A local copy of a Hub dataset: sharded data/train-*.parquet and data/test-*.parquet, found by name."""
    from lora_cli.data import load_records

    d = tmp_path / "repo"
    (d / "data").mkdir(parents=True)
    recs = SHAPES["alpaca"]
    write(d / "data" / "train-00000-of-00002.parquet", recs[:5])
    write(d / "data" / "train-00001-of-00002.parquet", recs[5:])
    write(d / "data" / "test-00000-of-00001.parquet", recs[:2])
    (d / "README.md").write_text("# a dataset card without metadata\n")
    train, valid = load_records(str(d))
    assert sorted(r["input"] for r in train) == sorted(r["input"] for r in recs) and len(valid) == 2
    code, _, err = cli("train", "--model", tiny_llama, "--data", d, "--output", tmp_path / "run", *RUN)
    assert code == 0, err
    assert "8 records (alpaca)" in err and "Repo card" not in err
    (d / "data" / "train-00000-of-00002.parquet").unlink()
    (d / "data" / "train-00001-of-00002.parquet").unlink()
    code, _, err = cli("train", "--model", tiny_llama, "--data", d, "--output", tmp_path / "run2", *RUN)
    assert code == 1 and "has no train split (it holds test)" in err and "--data-split" in err


def test_a_hub_layout_folder_with_named_splits(cli, tiny_llama, tmp_path):
    """HuggingFaceH4/ultrachat_200k's layout: train_sft / test_sft (and *_gen) splits. --data-split picks one;
    its eval split is the test split of the same suffix; --eval-data-split picks any."""
    from lora_cli.data import load_eval_records, load_records

    d = tmp_path / "ultrachat" / "data"
    d.mkdir(parents=True)
    recs = SHAPES["messages"]
    for split, part in (("train_sft", recs[:6]), ("test_sft", recs[6:]), ("train_gen", recs[:1]), ("test_gen", recs[:3])):
        write(d / f"{split}-00000-of-00001.parquet", part)
    train, valid = load_records(str(d.parent), "train_sft")
    assert (len(train), len(valid)) == (6, 2)
    assert len(load_eval_records(str(d.parent), "test_gen")) == 3
    code, _, err = cli("train", "--model", tiny_llama, "--data", d.parent, "--data-split", "train_sft",
                       "--output", tmp_path / "run", *RUN)
    assert code == 0, err
    assert "6 records (messages)" in err and "→ 2 sequences, " in err.split("eval  ", 1)[1].splitlines()[0]
    code, _, err = cli("train", "--model", tiny_llama, "--data", d.parent, "--output", tmp_path / "run2", *RUN)
    assert code == 1 and "has no train split (it holds" in err and "pick one with --data-split" in err
    code, _, err = cli("train", "--model", tiny_llama, "--data", d.parent, "--data-split", "train_sft", "--eval-data",
                       d.parent, "--eval-data-split", "dev", "--output", tmp_path / "run3", *RUN)
    assert code == 1 and "has no dev split" in err


def test_custom_chat_template_file(cli, tiny_gpt2, tmp_path):
    tpl = tmp_path / "t.jinja"
    body = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
    tpl.write_text("\ufeff" + body, encoding="utf-8")  # saved by a Windows editor: the BOM is not template text
    data = write(tmp_path / "d.jsonl", SHAPES["messages"])
    code, _, err = cli("train", "--model", tiny_gpt2, "--data", data, "--output", tmp_path / "run", *RUN,
                       "--chat-template", tpl)
    assert code == 0, err
    tpl.unlink()  # the run keeps the template it trained with: it needs no file outside it
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == body
    code, _, err = cli("merge", tmp_path / "run", "--output", tmp_path / "m")
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template == body
    code, _, err = cli("export", tmp_path / "run", "--output", tmp_path / "x")
    assert code == 0, err
    code, _, err = cli("merge", tmp_path / "x", "--output", tmp_path / "mx")  # the export carries it too
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(tmp_path / "mx").chat_template == body
    text = write(tmp_path / "t.jsonl", SHAPES["text"])  # plain text has no turns: the template is unused, said so
    tpl.write_text(body)
    code, out, err = cli("train", "--model", tiny_gpt2, "--data", text, "--output", tmp_path / "run-text", *RUN,
                         "--chat-template", tpl)
    said = " ".join((out + err).split())
    assert code == 0 and f"note: --chat-template {tpl} is not used: text records are learned as written" in said, said
    assert not (tmp_path / "run-text" / "chat_template.jinja").exists()


def test_a_run_on_a_base_without_a_template_prompts_the_way_it_trained(cli, tmp_path):
    """Chats on a tokenizer without a chat template train with our built-in one: the run, its export and its
    merge keep it, so generation prompts the same way; plain prompt/completion pairs need none."""
    from lora_cli.data import BUILTIN_CHAT_TEMPLATE
    from lora_cli.generation import chat_template_for

    base = save_tiny(tmp_path / "base", "gpt2", chat_template=None)
    chats, pairs = write(tmp_path / "c.jsonl", SHAPES["messages"]), write(tmp_path / "p.jsonl", SHAPES["prompt_completion"])
    assert cli("train", "--model", base, "--data", chats, "--output", tmp_path / "run", *RUN)[0] == 0
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == BUILTIN_CHAT_TEMPLATE
    assert cli("export", tmp_path / "run", "--output", tmp_path / "x")[0] == 0
    tok = AutoTokenizer.from_pretrained(base)
    assert chat_template_for(tok, [str(tmp_path / "x")]) == BUILTIN_CHAT_TEMPLATE
    assert cli("merge", tmp_path / "run", "--output", tmp_path / "m")[0] == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template == BUILTIN_CHAT_TEMPLATE
    assert cli("train", "--model", base, "--data", pairs, "--output", tmp_path / "plain", *RUN)[0] == 0
    assert not (tmp_path / "plain" / "chat_template.jinja").exists()
    assert chat_template_for(tok, [str(tmp_path / "plain")]) is None


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
            logp = torch.log_softmax(model.eval()(input_ids=torch.from_numpy(e.input_ids).long()[None]).logits[0].double(), -1)
            for t in range(1, len(e.input_ids)):
                if e.labels[t] != IGNORE:
                    total -= float(logp[t - 1, e.labels[t]])
                    count += 1
    assert summary["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert summary["best_eval_step"] == 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_ppl"] == pytest.approx(2.718281828 ** (total / count), rel=1e-4)


def test_an_eval_directory_gives_its_eval_split(tmp_path):
    """`--eval-data DIR` evaluates on DIR's valid/test split (its train.* only when it has nothing else);
    a directory holding only a test split, as a Hub layout, is an eval set, not an error."""
    from lora_cli.data import load_eval_records

    recs = SHAPES["alpaca"]
    files = tmp_path / "files"
    files.mkdir()
    write(files / "train.jsonl", recs[:5])
    assert load_eval_records(str(files)) == recs[:5]
    write(files / "test.jsonl", recs[5:7])
    assert load_eval_records(str(files)) == recs[5:7]
    write(files / "valid.jsonl", recs[7:])
    assert load_eval_records(str(files)) == recs[7:]
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    write(hub / "data" / "test-00000-of-00001.parquet", recs[:2])
    assert load_eval_records(str(hub)) == recs[:2]
    write(hub / "data" / "train-00000-of-00001.parquet", recs[2:])
    assert load_eval_records(str(hub)) == recs[:2]


def test_a_named_eval_split_is_the_one_read(cli, tiny_llama, tmp_path):
    """--eval-data-split test reads test even where a validation split would be the default, of --eval-data
    or, without it, of --data; a folder of train/valid/test files takes the name too."""
    from lora_cli.data import load_eval_records, load_records

    recs = SHAPES["alpaca"]
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    for split, part in (("train", recs[:4]), ("validation", recs[4:6]), ("test", recs[6:])):
        write(hub / "data" / f"{split}-00000-of-00001.parquet", part)
    assert load_eval_records(str(hub)) == recs[4:6] and load_eval_records(str(hub), "test") == recs[6:]
    assert load_records(str(hub)) == (recs[:4], recs[4:6]) and load_records(str(hub), "train", "test") == (recs[:4], recs[6:])
    flat = tmp_path / "flat"
    flat.mkdir()
    for split, part in (("train", recs[:4]), ("valid", recs[4:6]), ("test", recs[6:])):
        write(flat / f"{split}.jsonl", part)
    assert load_eval_records(str(flat), "test") == recs[6:] and load_records(str(flat), "train", "valid")[1] == recs[4:6]
    with pytest.raises(UserError, match=r"has no dev split \(it holds train, valid, test\); --eval-data-split names"):
        load_eval_records(str(flat), "dev")
    code, _, err = cli("train", "--model", tiny_llama, "--data", hub, "--eval-data-split", "test",
                       "--output", tmp_path / "run", *RUN)
    assert code == 0, err
    assert "→ 2 sequences, " in err.split("eval  ", 1)[1].splitlines()[0]
    code, _, err = cli("train", "--model", tiny_llama, "--data", flat / "train.jsonl", "--eval-data-split", "valid",
                       "--output", tmp_path / "run2", *RUN)
    assert code == 1 and "--eval-data-split 'valid' picks a split of a Hub dataset or a folder, but --data" in err
    # a held-out split named dev (or eval) is the eval data; the train split of a folder with others never is
    (hub / "data" / "validation-00000-of-00001.parquet").unlink()
    (hub / "data" / "test-00000-of-00001.parquet").rename(hub / "data" / "dev-00000-of-00001.parquet")
    assert load_eval_records(str(hub)) == recs[6:] and load_records(str(hub))[1] == recs[6:]
    (hub / "data" / "dev-00000-of-00001.parquet").rename(hub / "data" / "extra-00000-of-00001.parquet")
    with pytest.raises(UserError, match=r"has no split named as eval data .* it holds train, extra: pick one with"):
        load_eval_records(str(hub))


@pytest.mark.parametrize("layout", [
    {"train.jsonl": 3, "more_train.jsonl": 5},  # train.jsonl alone was read: 5 records left out, silently
    {"train.jsonl": 3, "train-2.jsonl": 2, "valid.jsonl": 1},
    {"train-part1.jsonl": 3, "train-part2.jsonl": 5, "test.jsonl": 2},  # was "has no train split (it holds test)"
    {"train.jsonl": 2, "test.jsonl": 1, "notes.txt.bak": 0},
])
def test_a_folder_splits_as_datasets_splits_it(tmp_path, layout):
    """The exact train.* / valid.* names were a shortcut that skipped datasets' rules whenever one existed; a
    folder's splits are the ones datasets.load_dataset gives it, record for record."""
    import datasets

    from lora_cli.data import folder_splits

    for name, n in layout.items():
        if n:
            write(tmp_path / name, [{"prompt": f"{name} {i}", "completion": "x"} for i in range(n)])
        else:
            (tmp_path / name).write_text("not data")
    ours = {split: read() for split, read in folder_splits(tmp_path, str(tmp_path)).items()}
    theirs = datasets.load_dataset(str(tmp_path))
    assert {split: sorted(r["prompt"] for r in recs) for split, recs in ours.items()} == \
        {split: sorted(theirs[split]["prompt"]) for split in theirs}


def test_a_folder_with_two_layouts_says_which_it_leaves_out(tmp_path):
    """datasets reads data/train-*.jsonl and leaves train.jsonl beside it out: one would be lost without a word."""
    from lora_cli.data import load_records

    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "train-00000-of-00001.jsonl", SHAPES["prompt_completion"][:3])
    write(tmp_path / "train.jsonl", SHAPES["prompt_completion"][3:])
    with pytest.raises(UserError, match=r"holds two layouts: datasets reads data/train-00000-of-00001.jsonl and "
                                        r"leaves out train.jsonl; move one of them out"):
        load_records(str(tmp_path))
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                        "    path: data/*.jsonl\n---\n")  # a README that names its files decides
    assert load_records(str(tmp_path))[0] == SHAPES["prompt_completion"][:3]


def test_hub_layout_shards_are_read_as_single_files_are(tmp_path):
    """Each shard is read as --data FILE would be: shards may differ in columns, CSV cells stay text, and a
    broken line or a non-UTF-8 byte is named by shard and line."""
    from lora_cli.data import load_records

    d = tmp_path / "repo" / "data"
    d.mkdir(parents=True)
    write(d / "train-00000-of-00002.jsonl", [{"prompt": "a", "completion": "b", "id": 1}])
    write(d / "train-00001-of-00002.jsonl", [{"prompt": "c", "completion": "d", "source": "x"}])
    assert load_records(str(d.parent)) == ([{"prompt": "a", "completion": "b", "id": 1},
                                            {"prompt": "c", "completion": "d", "source": "x"}], None)
    (tmp_path / "csv" / "data").mkdir(parents=True)
    (tmp_path / "csv" / "data" / "train-00000-of-00001.csv").write_text("prompt,completion\nWhat is 2+2?,4\nzero?,007\n")
    assert load_records(str(tmp_path / "csv"))[0] == [{"prompt": "What is 2+2?", "completion": "4"},
                                                     {"prompt": "zero?", "completion": "007"}]
    (d / "train-00001-of-00002.jsonl").write_text('{"prompt": "c", "completion": "d"}\n{"prompt": [}\n')
    with pytest.raises(UserError, match=r"train-00001-of-00002.jsonl line 2: not valid JSON"):
        load_records(str(d.parent))
    (d / "train-00001-of-00002.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "d"}\n')
    with pytest.raises(UserError, match=r"train-00001-of-00002.jsonl is not UTF-8 text \(byte 0xe9 on line 1"):
        load_records(str(d.parent))


def test_saved_datasets_and_compressed_files_are_read(tmp_path):
    """A folder written by save_to_disk (a Dataset: the train split; a DatasetDict: its splits), and files
    compressed as the Hub's often are, alone or in a data folder."""
    import bz2
    import gzip
    import lzma

    import datasets

    from lora_cli.data import load_records

    recs = SHAPES["prompt_completion"]
    datasets.Dataset.from_list(recs).save_to_disk(tmp_path / "saved")
    assert load_records(str(tmp_path / "saved")) == (recs, None)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs[:6]),
                          "test": datasets.Dataset.from_list(recs[6:])}).save_to_disk(tmp_path / "saved_dict")
    assert load_records(str(tmp_path / "saved_dict")) == (recs[:6], recs[6:])
    jsonl = write(tmp_path / "d.jsonl", recs).read_bytes()
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "d.jsonl.xz").write_bytes(lzma.compress(jsonl))
    (tmp_path / "d.csv.bz2").write_bytes(bz2.compress(write(tmp_path / "d.csv", recs).read_bytes()))
    for name in ("d.jsonl.gz", "d.jsonl.xz"):
        assert load_records(str(tmp_path / name)) == (recs, None)
    assert load_records(str(tmp_path / "d.csv.bz2"))[0] == [{k: str(v) for k, v in r.items()} for r in recs]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (folder / "valid.jsonl").write_bytes(jsonl)
    assert load_records(str(folder)) == (recs, recs)
    (tmp_path / "d.jsonl.zst").write_bytes(b"(\xb5/\xfd")
    with pytest.raises(UserError, match=r"d.jsonl.zst: reading .zst files needs the zstandard package"):
        load_records(str(tmp_path / "d.jsonl.zst"))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"cannot read .*bad.jsonl.gz: not valid .gz data"):
        load_records(str(tmp_path / "bad.jsonl.gz"))


def test_turns_mixing_strings_and_content_parts_are_read(cli, tiny_llama, tmp_path):
    """One turn's content a string, another's a list of parts: Arrow cannot hold that column, the reader
    still must (and an image part is refused by name, not by an Arrow type error)."""
    parts = lambda t: [{"type": "text", "text": t}]  # noqa: E731
    mixed = [{"messages": [{"role": "user", "content": parts(f"colour {i}?")}, {"role": "assistant", "content": "purple"}]}
             for i in range(7)]
    mixed.append({"messages": [{"role": "user", "content": "colour 7?"}, {"role": "assistant", "content": parts("purple")}]})
    plain = [{"messages": [{"role": "user", "content": f"colour {i}?"}, {"role": "assistant", "content": "purple"}]}
             for i in range(8)]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ours, _ = Encoder(tok, 256).encode_all(read_file(write(tmp_path / "mixed.jsonl", mixed)))
    want, _ = Encoder(tok, 256).encode_all(plain)
    assert [(e.input_ids.tolist(), e.labels.tolist()) for e in ours] == [(e.input_ids.tolist(), e.labels.tolist()) for e in want]
    code, _, err = cli("train", "--model", tiny_llama, "--data", tmp_path / "mixed.jsonl", "--output", tmp_path / "r", *RUN)
    assert code == 0, err
    image = [{"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                           {"role": "assistant", "content": "a cat"}]}] + plain
    code, _, err = cli("train", "--model", tiny_llama, "--data", write(tmp_path / "img.jsonl", image),
                       "--output", tmp_path / "i", *RUN)
    assert code == 1 and "has a 'image' part; only text parts" in err, err


def test_what_is_not_data_is_named_for_what_it_is(tmp_path, tiny_llama):
    """A .json of splits, a CSV of Python reprs (pandas' to_csv of a list column), a model folder, a compressed
    Parquet: each refused with what it is and what to do."""
    from lora_cli.data import load_records

    (tmp_path / "splits.json").write_text(json.dumps({"train": SHAPES["text"][:2], "test": SHAPES["text"][2:4]}))
    with pytest.raises(UserError, match=r"holds several lists of records \(train, test\); one file is one split"):
        load_records(str(tmp_path / "splits.json"))
    pd.DataFrame({"messages": [SHAPES["messages"][0]["messages"]]}).to_csv(tmp_path / "repr.csv", index=False)
    with pytest.raises(UserError, match=r"record 1: 'messages' is a string but not valid JSON .*; it is Python's repr"):
        Encoder(AutoTokenizer.from_pretrained(tiny_llama), 64).encode_all(load_records(str(tmp_path / "repr.csv"))[0])
    with pytest.raises(UserError, match=r"llama' holds a model \(config.json and weights\), not training data"):
        load_records(str(tiny_llama))
    (tmp_path / "short.json").write_text(json.dumps({"prompt": ["a", "b"], "completion": ["x"]}))
    with pytest.raises(UserError, match=r"holds columns of different lengths \(prompt 2, completion 1\)"):
        load_records(str(tmp_path / "short.json"))
    (tmp_path / "d.parquet.gz").write_bytes(b"x")
    with pytest.raises(UserError, match=r"unsupported data file type '.parquet.gz'; use one of .* each but .parquet also"):
        load_records(str(tmp_path / "d.parquet.gz"))


def test_a_csv_cell_over_windows_lines_holds_line_feeds(tmp_path):
    (tmp_path / "d.csv").write_bytes(b'prompt,completion\r\n"two\r\nlines",yes\r\n')
    assert read_file(tmp_path / "d.csv") == [{"prompt": "two\nlines", "completion": "yes"}]


def test_a_record_error_names_its_file_and_line(tmp_path, tiny_llama):
    """"record N" counts over a split; in a folder of shards, or a JSONL file with blank lines, the error also
    names the file and its line."""
    from lora_cli.data import load_records

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    good = json.dumps(SHAPES["prompt_completion"][0])
    (tmp_path / "gaps.jsonl").write_text(f"{good}\n\n\n{good}\n\n" + '{"prompt": "x"}\n')
    with pytest.raises(UserError, match=r"data record 3 \(gaps.jsonl line 6\): shape unknown"):
        Encoder(tok, 64).encode_all(load_records(str(tmp_path / "gaps.jsonl"))[0])
    (tmp_path / "plain.jsonl").write_text(f"{good}\n" + '{"prompt": "x"}\n')
    with pytest.raises(UserError, match=r"data record 2: shape unknown"):  # its line already
        Encoder(tok, 64).encode_all(load_records(str(tmp_path / "plain.jsonl"))[0])
    d = tmp_path / "repo" / "data"
    d.mkdir(parents=True)
    write(d / "train-00000-of-00002.parquet", SHAPES["prompt_completion"][:3])
    write(d / "train-00001-of-00002.jsonl", [SHAPES["prompt_completion"][0], {"prompt": 1, "completion": "a"}])
    with pytest.raises(UserError, match=r"mixes file formats: datasets reads its .parquet files and would leave out "
                                        r"train-00001-of-00002.jsonl; convert"):  # datasets would, silently
        load_records(str(d.parent))
    (d / "train-00000-of-00002.parquet").unlink()
    write(d / "train-00000-of-00002.jsonl", SHAPES["prompt_completion"][:3])
    with pytest.raises(UserError, match=r"data record 5 \(train-00001-of-00002.jsonl line 2\): prompt must be a string"):
        Encoder(tok, 64).encode_all(load_records(str(d.parent))[0])
    for f in d.iterdir():
        f.unlink()
    write(d / "train-00000-of-00002.parquet", [*SHAPES["prompt_completion"][:1], {"prompt": "a"}])
    write(d / "train-00001-of-00002.parquet", SHAPES["prompt_completion"][:2])
    with pytest.raises(UserError, match=r"data record 2 \(train-00000-of-00002.parquet record 2\): shape unknown"):
        Encoder(tok, 64).encode_all(load_records(str(d.parent))[0])


def test_a_record_error_in_a_held_out_part_names_its_line(cli, tmp_path, tiny_llama):
    """--eval-split renumbers both parts: "eval data record 2" alone would not find the record in the file."""
    from lora_cli.data import split_eval

    bad = 13
    lines = [json.dumps({"prompt": f"q{i}", "completion": "a"}) for i in range(1, 21)]
    lines[bad - 1] = '{"prompt": "x", "completion": 7}'
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    train, held = split_eval(read_file(tmp_path / "d.jsonl"), 0.25, seed=0)
    part, name = (held, "eval data") if any(r["completion"] == 7 for r in held) else (train, "training data")
    at = next(i for i, r in enumerate(part) if r["completion"] == 7)
    assert at + 1 != bad  # (else the position alone would find it)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(UserError, match=rf"{name} record {at + 1} \(d.jsonl line {bad}\): completion must be a string"):
        Encoder(tok, 64).encode_all(part, name)
    code, _, err = cli("train", "-m", tiny_llama, "--data", tmp_path / "d.jsonl", "--eval-split", "0.25",
                       "--max-steps", "1", "-o", tmp_path / "o")
    assert code == 1 and f"(d.jsonl line {bad})" in " ".join(err.split()), err


def test_a_dataset_configuration_is_picked_with_data_config(cli, tiny_llama, tmp_path):
    """A folder whose README lists configurations (openai/gsm8k's main and socratic): --data-config picks one,
    as load_dataset's name does; without it the error names them. A file has none to pick."""
    from lora_cli.data import load_eval_records, load_records

    d = tmp_path / "gsm"
    recs = SHAPES["prompt_completion"]
    for config, split, part in (("main", "train", recs[:5]), ("main", "test", recs[5:]), ("socratic", "train", recs[:2])):
        (d / config).mkdir(parents=True, exist_ok=True)
        write(d / config / f"{split}-00000-of-00001.jsonl", part)
    (d / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n" + "".join(f"  - split: {s}\n    path: {c}/{s}-*.jsonl\n" for s in splits)
        for c, splits in (("main", ("train", "test")), ("socratic", ("train",)))) + "---\n")
    assert load_records(str(d), config="main") == (recs[:5], recs[5:])
    assert load_records(str(d), config="socratic") == (recs[:2], None)
    assert load_eval_records(str(d), config="main") == recs[5:]
    with pytest.raises(UserError, match=rf"^data directory '{d}': it has several configurations \(main, socratic\): "
                                        "pick one with --data-config$"):
        load_records(str(d))
    with pytest.raises(UserError, match=rf"^data directory '{d}': it has no configuration 'mian'; it has main, "
                                        "socratic: pick one with --eval-data-config$"):
        load_eval_records(str(d), config="mian")
    readme = (d / "README.md").read_text()
    (d / "README.md").write_text(readme.replace("socratic/train-*.jsonl", "socratic/tain-*.jsonl"))
    with pytest.raises(UserError, match=r"its train split matches no file"):  # (was: no records, silently)
        load_records(str(d), config="socratic")
    (d / "README.md").write_text(readme.replace("socratic/train-*.jsonl", "socratic/train.jsonl"))
    with pytest.raises(UserError, match=r"its README.md's configs name 'socratic/train.jsonl', which matches no "
                                        r"file$"):  # (was datasets' list of its 80 file extensions)
        load_records(str(d), config="socratic")
    (d / "README.md").write_text(readme.replace("data_files:\n", "data_files: [\n", 1))
    with pytest.raises(UserError, match=r"its README.md's YAML header does not parse \(line 5\): expected the "
                                        r"node content, but found '-'$"):
        load_records(str(d), config="main")
    (d / "README.md").write_text(readme)
    code, _, err = cli("train", "--model", tiny_llama, "--data", d, "--data-config", "main", "--output", tmp_path / "r", *RUN)
    assert code == 0, err
    assert "5 records (prompt_completion)" in err and "→ 3 sequences, " in err.split("eval  ", 1)[1].splitlines()[0]
    code, _, err = cli("train", "--model", tiny_llama, "--data", d / "main" / "train-00000-of-00001.jsonl",
                       "--data-config", "main", "--output", tmp_path / "r2", *RUN)
    assert code == 1 and "--data-config 'main' picks a configuration of a Hub dataset" in err and "is a file" in err


def test_a_hub_dataset_in_the_hub_cache_loads_offline(tmp_path, monkeypatch):
    """A dataset fetched with `hf download` lives in the hub cache, which datasets does not read offline (only
    its own cache of an earlier load_dataset): 'it is not in the local Hugging Face cache', though it was."""
    import huggingface_hub

    from lora_cli.data import load_records

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "datasets--org--chats"
    snapshot = repo / "snapshots" / ("0" * 40)
    (snapshot / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for split, n in (("train", 3), ("test", 2)):
        rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(n)]
        (snapshot / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = load_records("org/chats", "train", "test")
    assert [r["prompt"] for r in train] == ["q0", "q1", "q2"] and [r["completion"] for r in held] == ["a0", "a1"]
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_records("org/other")
    with pytest.raises(UserError, match=r"^dataset 'org/chats' has no validation split \(it holds train, test\)"):
        load_records("org/chats", "train", "validation")  # (a Hub id, not a "data directory")


def test_csv_cells_hold_conversational_pairs_and_histories_as_json(tmp_path):
    """A CSV's prompt/completion cells holding turns (as Dataset.to_csv of TRL's conversational form writes them,
    or as JSON) were learned as literal text, the brackets included; a `history` cell was refused."""
    from lora_cli.data import load_records

    tok = tiny_tokenizer()
    pairs = [{"prompt": [{"role": "user", "content": f"hello {i}"}],
              "completion": [{"role": "assistant", "content": "world"}]} for i in range(3)]
    alpaca = [{"instruction": "and now?", "input": "", "output": "red", "history": [["color?", "blue"]]}]

    def examples(path):
        return [(e.input_ids.tolist(), e.labels.tolist()) for e in Encoder(tok, 512).encode_all(
            load_records(str(path))[0])[0]]

    for name, recs in (("pairs", pairs), ("alpaca", alpaca)):
        as_json = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in recs]
        pd.DataFrame(as_json).to_csv(tmp_path / f"{name}.csv", index=False)
        assert examples(tmp_path / f"{name}.csv") == examples(write(tmp_path / f"{name}.jsonl", recs))
    pd.DataFrame(pairs).to_csv(tmp_path / "repr.csv", index=False)  # Python's repr of the lists: not JSON
    with pytest.raises(UserError, match=r"repr.csv record 1: its prompt cell holds a list, but not valid JSON .*Python's repr"):
        examples(tmp_path / "repr.csv")
    for prompt in ("[{1, 2}] is a set of sets?", '[{"role": "user"}] is JSON', "[{'role': 'x'}] what is this?"):
        text = write(tmp_path / "text.jsonl", [{"prompt": prompt, "completion": '[{"role": "user", "content": "hi"}]'}])
        got = tok.decode(Encoder(tok, 128).encode_all(load_records(str(text))[0])[0][0].input_ids)  # JSON text is text
        assert got.startswith(f"<|im_start|>user\n{prompt}<|im_end|>"), got


def test_kto_data_in_a_csv_is_refused_as_in_jsonl(tmp_path):
    """CSV cells read "True"/"False": the KTO check saw no bool, and the run learned the answers labelled bad."""
    pd.DataFrame([{"prompt": "2+2?", "completion": "4", "label": True},
                  {"prompt": "2+2?", "completion": "5", "label": False}]).to_csv(tmp_path / "kto.csv", index=False)
    (tmp_path / "gap.csv").write_text("prompt,completion,label\np,good,\np,bad answer,False\n")  # record 1's empty
    from lora_cli.data import load_records

    for name, record in (("kto.csv", 1), ("gap.csv", 2)):
        with pytest.raises(UserError, match=f"record {record}: .*unpaired preference data \\(KTO\\)"):
            Encoder(tiny_tokenizer(), 64).encode_all(load_records(str(tmp_path / name))[0])


def test_without_a_template_a_run_learns_one_format(cli, tmp_path):
    """On a tokenizer without a chat template, string pairs were learned plainly and the records of the same file
    that have a system prompt or a history in the built-in template: two formats, and the run kept the second."""
    from lora_cli.data import BUILTIN_CHAT_TEMPLATE

    base = save_tiny(tmp_path / "base", "gpt2", chat_template=None)
    tok = AutoTokenizer.from_pretrained(base)
    plain = [{"instruction": "What is 2+2?", "input": "", "output": "4"}]
    mixed = plain + [{"system": "Be brief.", "instruction": "What is 3+3?", "input": "", "output": "6"}]

    def texts(records, eval_records=None):
        enc = Encoder(tok, 256)
        enc.one_format(records, eval_records)
        return [tok.decode(e.input_ids) for e in enc.encode_all(records)[0]]

    assert texts(plain) == ["What is 2+2?4" + tok.eos_token]
    assert texts(mixed)[0] == f"User: What is 2+2?{tok.eos_token}\nAssistant: 4{tok.eos_token}\n"
    assert texts(plain, eval_records=mixed[1:])[0].startswith("User: ")  # eval counts: one format per run
    assert cli("train", "--model", base, "--data", write(tmp_path / "m.jsonl", mixed * 4), "--output", tmp_path / "run",
               *RUN)[0] == 0
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == BUILTIN_CHAT_TEMPLATE


def test_empty_tool_calls_and_reasoning_are_as_if_absent(tmp_path):
    """Exports write "tool_calls": [] on every assistant turn: it was refused (the template never reads it)."""
    tok = tiny_tokenizer()
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    empty = [turns[:1] + [{**turns[1], "tool_calls": [], "reasoning_content": ""}]]
    want, got = (Encoder(tok, 64).encode_all([{"messages": m}])[0][0] for m in (turns, empty[0]))
    assert want.input_ids.tolist() == got.input_ids.tolist() and want.labels.tolist() == got.labels.tolist()
    with pytest.raises(UserError, match="has tool_calls but the chat template never reads it"):
        Encoder(tok, 64).encode_all([{"messages": turns[:1] + [{**turns[1], "tool_calls": [{"type": "function"}]}]}])


def test_json_lines_oddities_get_plain_words(tmp_path):
    """A byte-order mark where files were concatenated is not an error; a raw tab inside a string names its
    column (json's own message ends in 'at'); an object holding an empty list of records holds no records; the
    Responses API's input_text/output_text parts are text."""
    from lora_cli.data import load_records

    line = json.dumps(SHAPES["messages"][0])
    (tmp_path / "bom.jsonl").write_text(f"{line}\n\ufeff{line}\n")
    assert len(load_records(str(tmp_path / "bom.jsonl"))[0]) == 2
    (tmp_path / "tab.jsonl").write_text(f'{line}\n{{"text": "a\tb"}}\n')
    with pytest.raises(UserError, match=r"tab.jsonl line 2: not valid JSON \(Invalid control character at column 12\)"):
        load_records(str(tmp_path / "tab.jsonl"))
    (tmp_path / "empty.json").write_text('{"version": "1.0", "data": []}')
    with pytest.raises(UserError, match=r"empty.json holds no records \(its 'data' is an empty list\)"):
        load_records(str(tmp_path / "empty.json"))
    parts = [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "world"}]}]
    plain = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    tok = tiny_tokenizer()
    assert (Encoder(tok, 64).encode_all([{"messages": parts}])[0][0].input_ids.tolist()
            == Encoder(tok, 64).encode_all([{"messages": plain}])[0][0].input_ids.tolist())


def test_eval_data_that_is_a_fraction_or_standard_input_is_named(cli, tmp_path):
    data = write(tmp_path / "d.jsonl", SHAPES["messages"])
    for fraction in ("0.1", ".5"):
        code, _, err = cli("train", "--model", tmp_path, "--data", data, "--eval-data", fraction, "--dry-run")
        assert code == 1 and f"to hold out a fraction of --data, use --eval-split {fraction}" in err
    code, _, err = cli("train", "--model", tmp_path, "--data", "-", "--dry-run")
    assert code == 1 and "--data -: records are not read from standard input; save them to a file" in err
