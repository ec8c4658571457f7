"""Records → token ids + loss labels.

Record shapes are detected by their keys (SPEC "DATA"). Chat records are rendered with the chat template
prefix by prefix: the text before each assistant turn (with the generation prompt) and after it. Every
rendering must be a prefix of the next (a template that rewrites earlier turns is refused), and the
characters between them are the assistant's: the tokens that start there carry the loss.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import io
import json
import logging
import os
import random
import re
import signal
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_cli.errors import UserError, few, lines, read_text

IGNORE = -100
REWRITES = ("the chat template rewrites earlier turns when the conversation grows, so loss masks cannot be derived "
            "safely; use --chat-template FILE with a template that only appends, or one that marks the assistant's "
            "text with {% generation %} … {% endgeneration %}")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}  # suffix: the module that reads it
EVAL_SPLIT_NAMES = ("valid", "validation", "val", "dev", "eval", "evaluation", "test", "testing")  # datasets' words
SHARE_GPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   # LLaMA-Factory's tool turns: the call (as its text) is the assistant's, the result the tool's
                   "function_call": "assistant", "observation": "tool", "tool": "tool"}
ACCEPTED_SHAPES = ("text", "prompt+completion", "messages", "instruction+input+output (alpaca)",
                   "conversations (ShareGPT)")
# A run or adapter keeps the template it trained with here, when it is not the base tokenizer's own.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# For tokenizers without a chat template (GPT-2, NeoX, base models). Prefix-stable by construction.
BUILTIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def builtin_template(tokenizer) -> str:
    """The plain template for a tokenizer without one; it starts with BOS where the tokenizer puts one before
    text (Llama, Mistral bases), as `text` and plain prompt/completion records get it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    starts = bos is not None and list(tokenizer("a", add_special_tokens=True)["input_ids"][:1]) == [bos]
    return ("{{ bos_token }}" if starts else "") + BUILTIN_CHAT_TEMPLATE


@dataclass(eq=False)
class Example:
    """One training sequence: token ids and labels (IGNORE where there is no loss), as int32 arrays: 8 bytes a
    token for both, where lists of Python ints took ~45 (20k chats, 16.3M tokens: 263 MB held, not 728 MB).

    A packed sequence also has per-record `position_ids` and `segments` (the record index of each token).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray | None = None
    segments: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("input_ids", "labels", "position_ids", "segments"):
            if (value := getattr(self, name)) is not None:
                setattr(self, name, np.asarray(value, dtype=np.int32))

    @property
    def n_loss(self) -> int:
        """Loss tokens: labels are predicted from the previous position, so position 0 never counts."""
        return int(np.count_nonzero(self.labels[1:] != IGNORE))


@dataclass
class Rendered:
    """A conversation as its template renders it, and the character spans of the text that carries the loss."""

    text: str
    spans: list[tuple[int, int]]


BLOCK = 512  # records rendered, then tokenized in one batch
PARALLEL_MIN_RECORDS = 2 * BLOCK  # fewer are tokenized in one process by default


@dataclass
class EncodeStats:
    records: int = 0
    examples: int = 0
    dropped_no_loss: int = 0
    truncated: int = 0
    chunked: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    shape: str = ""
    packed: int = 0  # sequences after --packing (0 = not packed)
    empty_answers: int = 0  # records whose answer (an assistant turn with loss) is empty: an empty CSV cell, often
    no_answer: int = 0  # records of turns without an assistant turn with loss (only a user turn): nothing to learn
    template: str | None = None  # the chat template rendered with, if not the tokenizer's own (custom, built-in)

    def add(self, part: EncodeStats) -> None:
        """Count in what encoding a part of the records counted."""
        for name in ("dropped_no_loss", "truncated", "chunked", "empty_answers", "no_answer"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        self.template = self.template or part.template


# ---------------------------------------------------------------- loading

def load_records(spec: str, split: str = "train", eval_split: str | None = None, config: str | None = None,
                 flag: str = "--data-config") -> tuple[list[dict], list[dict] | None]:
    """(records of `split`, eval records or None) from a file, a data folder or a Hub id. The eval records are
    `eval_split`'s; unnamed, a folder's valid/validation/val/dev/eval/test split, with the train split's suffix if it
    has one (train_sft → test_sft, as in HuggingFaceH4/ultrachat_200k). `config` is the dataset's configuration
    (load_dataset's name), named `flag` in messages."""
    p = Path(spec).expanduser()
    if p.is_dir():
        splits = folder_splits(p, spec, config, flag)
        read = _pick(splits, split, spec, "--data-split")
        suffix = split[len("train"):] if split.startswith("train") else None
        valid = eval_split or next((n + suffix for n in EVAL_SPLIT_NAMES if suffix is not None and n + suffix in splits),
                                   None)
        return read(), (_pick(splits, valid, spec, "--eval-data-split")() if valid else None)
    if p.exists():
        return read_file(p), None
    if names_missing_file(spec):
        raise UserError(f"data file {spec!r} does not exist")
    return _read_hub(spec, split, config, flag), (_read_hub(spec, eval_split, config, flag) if eval_split else None)


def load_eval_records(spec: str, split: str | None = None, config: str | None = None) -> list[dict]:
    """Records of `--eval-data`: a file; a Hub dataset's `split` (default test); a folder's `split`, by default
    its valid/validation/val/dev/eval/test split, or its one split (a folder holding an eval set as train.*)."""
    p = Path(spec).expanduser()
    if not p.is_dir():
        return read_file(p) if p.exists() else load_records(spec, split or "test", None, config, "--eval-data-config")[0]
    splits = folder_splits(p, spec, config, "--eval-data-config")
    name = split or next((n for n in EVAL_SPLIT_NAMES if n in splits), next(iter(splits)) if len(splits) == 1 else None)
    if name is None:  # never the train split of a folder that has others: that would evaluate on training data
        raise UserError(f"--eval-data {spec!r} has no split named as eval data ({', '.join(EVAL_SPLIT_NAMES)}); "
                        f"it holds {', '.join(splits)}: pick one with --eval-data-split")
    return _pick(splits, name, spec, "--eval-data-split")()


def _pick(splits: dict, name: str, spec: str, flag: str, what: str = "data directory") -> Callable[[], list[dict]]:
    if name not in splits:
        raise UserError(f"{what} {spec!r} has no {name} split (it holds {', '.join(splits)}); "
                        + (f"pick one with {flag}" if name in ("train", "test") else f"{flag} names one of them"))
    return splits[name]


def names_missing_file(spec: str) -> bool:
    """Whether DATA names a local file that is not there (rather than a Hub dataset id, `owner/name`)."""
    p = Path(spec).expanduser()
    return not p.exists() and (_format(p)[0] in DATA_SUFFIXES or spec.startswith((".", "/", "~")) or spec.count("/") > 1)


def folder_splits(p: Path, spec: str, config: str | None = None, flag: str = "--data-config"
                  ) -> dict[str, Callable[[], list[dict]]]:
    """The splits of a data folder by name, each read when called: its `train.*`, `valid.*`… files; what
    `save_to_disk` wrote; or, laid out as a Hub dataset repository (`data/train-00000-of-00002.parquet`,
    `train/*.jsonl`, a README's `configs:`), the files datasets assigns to each split, as on the Hub, each read
    as a single file is (so shards may differ in columns, and errors name the file and line)."""
    import datasets

    files = [f for f in p.rglob("*") if f.is_file() and _format(f)[0] in DATA_SUFFIXES
             and not any(part.startswith(".") for part in f.relative_to(p).parts)]  # (datasets skips hidden ones)
    flat = {name: f for name in ("train", *EVAL_SPLIT_NAMES) if (f := _split_file(p, name))}
    if set(flat.values()) != set(files):  # more files than train.jsonl, valid.jsonl…: datasets' rules take all of
        flat = {}  # them (train-part2.jsonl, more_train.jsonl are train too), not the exact names alone
    saved = (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()
    if config is not None and (flat or saved):
        raise UserError(f"{flag} {config!r} picks a configuration of a folder laid out as a Hub dataset, but {spec!r} "
                        f"holds {'train.*/valid.* files' if flat else 'what save_to_disk wrote'}")
    if flat:
        return {name: functools.partial(read_file, f) for name, f in flat.items()}
    datasets.disable_progress_bars()
    if saved:
        try:
            with quiet_logs():
                on_disk = datasets.load_from_disk(str(p))
        except Exception as e:
            raise UserError(f"cannot read data directory {spec!r} (written by save_to_disk): {_root_message(e)}") from None
        parts = {"train": on_disk} if isinstance(on_disk, datasets.Dataset) else dict(on_disk)
        return {str(name): functools.partial(lambda n, d: Records.numbered(arrow_records(d.to_list()), f"{n} split record"),
                                             name, d) for name, d in parts.items()}
    if (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin"))):
        raise UserError(f"data directory {spec!r} holds a model (config.json and weights), not training data")
    if not files:
        raise UserError(f"data directory {spec!r} holds no data file ({', '.join(DATA_SUFFIXES)})")
    try:
        with quiet_logs():
            found = datasets.load_dataset_builder(str(p), config).config.data_files or {}
    except Exception as e:
        raise UserError(f"data directory {spec!r}: {_folder_error(e, p, flag)}") from None
    if not found:
        raise UserError(f"data directory {spec!r}: datasets finds no split in it")
    splits = {str(name): [Path(f) for f in files] for name, files in found.items()}
    if empty := [name for name, files in splits.items() if not files]:
        raise UserError(f"data directory {spec!r}: its {empty[0]} split matches no file (its README.md's configs "
                        "name the files of each split)")
    read = {f for files in splits.values() for f in files}
    folders = {f.parent for f in read}
    left = sorted(f.name for f in files if f.parent in folders and f not in read and f.name.startswith(tuple(splits)))
    if left:  # datasets takes one file format per folder and leaves the others' shards out, silently
        raise UserError(f"data directory {spec!r} mixes file formats: datasets reads its {_format(next(iter(read)))[0]} "
                        f"files and would leave out {few(left)}; convert them to one format")
    unread = sorted(str(f.relative_to(p)) for f in files if f not in read and f.name.startswith(tuple(splits)))
    if unread and not _readme_configs(p):  # (a README that lists the files says which are meant)
        raise UserError(f"data directory {spec!r} holds two layouts: datasets reads "
                        f"{few(sorted(str(f.relative_to(p)) for f in read))} and leaves out {few(unread)}; move one "
                        "of them out")
    return {name: functools.partial(_read_files, files) for name, files in splits.items()}


def _readme_configs(folder: Path) -> bool:
    """Whether the folder's README.md has a YAML header with `configs:` (a Hub dataset's list of its files)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return False
    head = readme.read_text(encoding="utf-8", errors="replace").split("\n---", 1)[0]
    return head.startswith("---") and re.search(r"^configs:", head, re.MULTILINE) is not None


def _read_files(files: list[Path]) -> Records:
    out = Records()
    for f in files:
        out.extend_from(read_file(f), f"{f.name} record")
    return out


def _split_file(directory: Path, name: str) -> Path | None:
    candidates = (directory / f"{name}{suffix}{packed}" for suffix in DATA_SUFFIXES for packed in ("", *COMPRESSIONS))
    found = [f for f in candidates if f.is_file()]
    if len(found) > 1:
        raise UserError(f"data directory {str(directory)!r} holds {' and '.join(f.name for f in found)}: one "
                        f"{name} split, one file")
    return found[0] if found else None


def _format(path: Path) -> tuple[str, str | None]:
    """(data suffix, compression suffix or None): `train.jsonl.gz` → (".jsonl", ".gz")."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[0] if len(suffixes) == 2 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def _root_message(e: BaseException) -> str:
    """The first line of the innermost cause: datasets wraps parser errors in "An error occurred while
    generating the dataset", which says nothing of what is wrong."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _dataset_error(e: BaseException, flag: str) -> str:
    """datasets' reason, in one line; a missing or unknown configuration names the ones there are and the flag."""
    import ast

    whole = str(e)
    named = re.search(r"(?:available configs|Available: |one among the available configs:)\s*(\[[^\]]*\])", whole)
    with contextlib.suppress(ValueError, SyntaxError):
        named = named and ", ".join(map(str, ast.literal_eval(named.group(1))))
    unknown = re.search(r"BuilderConfig (.*) not found", whole)
    if named and unknown:
        return f"it has no configuration {unknown.group(1)}; it has {named}: pick one with {flag}"
    if named and "Config name is missing" in whole:
        return f"it has several configurations ({named}): pick one with {flag}"
    if cached := re.search(r"There are multiple '[^']*' configurations in the cache: (.*)", whole):
        return f"the cache holds several of its configurations ({cached.group(1).strip()}): pick one with {flag}"
    if split := re.search(r"Unknown split \"([^\"]*)\"\. Should be one of (\[[^\]]*\])", whole):
        with contextlib.suppress(ValueError, SyntaxError):
            return (f"it has no split {split.group(1)!r} (it has {', '.join(ast.literal_eval(split.group(2)))}): "
                    f"{flag.replace('-config', '-split')} names one")
    return _root_message(e)


def _folder_error(e: BaseException, folder: Path, flag: str) -> str:
    """Why datasets cannot read a folder laid out as a Hub dataset repository, in one line."""
    import yaml

    if isinstance(e, yaml.MarkedYAMLError):  # lines counted from the header's first, after its opening ---
        where = f" (line {e.problem_mark.line + 2})" if e.problem_mark else ""
        return f"its README.md's YAML header does not parse{where}: {e.problem or e.context}"
    missing = re.match(r"Unable to find '([^']*)'", str(e))
    if missing and (folder / "README.md").is_file():
        pattern = os.path.relpath(missing.group(1), folder)
        return f"its README.md's configs name {pattern!r}, which matches no file"
    reason = _dataset_error(e, flag)
    return reason if reason.startswith("it has") else f"read as a Hub dataset repository (no train.* file): {reason}"


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """datasets logs what it then raises ("Failed to read schema …") and notes a local folder needs none of
    ("Repo card metadata block was not found"): the user gets our one error line instead."""
    before = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(before)


def read_file(path: Path) -> list[dict]:
    """Records of a local data file, which may be compressed (.gz, .bz2, .xz, .zst). JSON is read as written
    (through Arrow, records would gain the keys of every other record's tool calls, as nulls)."""
    suffix, packed = _format(path)
    if suffix not in DATA_SUFFIXES or (packed and suffix == ".parquet"):
        kinds = ", ".join(DATA_SUFFIXES) + f", each but .parquet also compressed as {', '.join(COMPRESSIONS)}"
        raise UserError(f"{path}: unsupported data file type {''.join(path.suffixes[-2:]) or path.name!r}; use one of {kinds}")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = arrow_records(pq.read_table(path).to_pylist())
        except Exception as e:  # pyarrow names the file again: "Could not open Parquet input source '…': …"
            msg = re.sub(r"^Could not open Parquet input source '.*?': ", "", _root_message(e))
            raise UserError(f"cannot read {path}: {msg}") from None
    else:
        text = read_text(path, data=_decompressed(path, packed) if packed else None)  # UTF-8, or one clear error
        records = (paragraphs_as_records(text) if suffix == ".txt" else _csv_records(path, text) if suffix == ".csv"
                   else _json_records(path, text))
    if not records:
        raise UserError(f"{path} holds no records")
    return records if isinstance(records, Records) else Records.numbered(records, f"{path.name} record")


class Records(list):
    """Records that know where each was read, so an error about record N of a folder's shards, or of a JSONL
    file with blank lines, names the file and line: "record 7 (train-00001-of-00002.jsonl line 3)"."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[int] = []  # index of each file's first record
        self.labels: list[str] = []  # each file's "NAME line" (JSON lines) or "NAME record"
        self.numbers = array("i")  # each record's line or number in its file

    @classmethod
    def numbered(cls, records: list[dict], label: str) -> Records:
        """Records of one source, the Nth named "LABEL N"."""
        return cls().extend_from(records, label)

    def extend_from(self, records: list[dict], label: str) -> Records:
        if isinstance(records, Records) and records.starts:
            self.starts += [start + len(self) for start in records.starts]
            self.labels += records.labels
            self.numbers += records.numbers
        else:
            self.starts.append(len(self))
            self.labels.append(label)
            self.numbers.extend(range(1, len(records) + 1))
        self.extend(records)
        return self

    def subset(self, keep: list[int]) -> Records:
        """The records at the (ascending) indices `keep`, each still placed in its file."""
        out, run = Records(), -1
        for i in keep:
            f = bisect.bisect_right(self.starts, i) - 1
            if f != run:
                out.starts.append(len(out))
                out.labels.append(self.labels[f])
                run = f
            out.append(self[i])
            out.numbers.append(self.numbers[i])
        return out

    def place(self, i: int) -> str:
        """' (FILE line L)' for record i (0-based), where "record i+1" alone would not find it; else ''."""
        if i >= len(self.numbers) or (len(self.starts) < 2 and self.numbers[i] == i + 1):
            return ""
        return f" ({self.labels[bisect.bisect_right(self.starts, i) - 1]} {self.numbers[i]})"


def _decompressed(path: Path, packed: str) -> bytes:
    import importlib

    module = COMPRESSIONS[packed]
    try:
        opened = importlib.import_module(module)
    except ImportError:
        raise UserError(f"{path}: reading {packed} files needs the {module} package (pip install {module}); "
                        "or decompress it first") from None
    try:
        if module == "zstandard":
            with open(path, "rb") as f, opened.ZstdDecompressor().stream_reader(f) as r:
                return r.read()
        return opened.decompress(path.read_bytes())
    except Exception as e:
        raise UserError(f"cannot read {path}: not valid {packed} data ({_root_message(e)})") from None


def arrow_records(records: list[dict]) -> list[dict]:
    """Rows of an Arrow table (Parquet, a Hub or saved dataset), cleaned. Arrow gives every row of a column one
    type: a struct holds the keys of all rows, None where a row had none. Top-level keys and turn keys are read as
    absent when None; inside tool calls and tool definitions such nulls are dropped here, or a call would be
    trained with arguments it never had (`{"city": "Paris", "x": null}`) and a schema with parameters it lacks."""
    for rec in records:
        if isinstance(rec.get("tools"), list):
            rec["tools"] = _without_nulls(rec["tools"])
        for key in ("messages", "conversations", "prompt", "completion"):
            for turn in rec.get(key) if isinstance(rec.get(key), list) else ():
                if isinstance(turn, dict) and isinstance(turn.get("tool_calls"), list):
                    turn["tool_calls"] = _without_nulls(turn["tool_calls"])
    return records


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def paragraphs_as_records(text: str) -> list[dict]:
    """The records of a .txt file: runs of lines separated by blank lines (spaces and tabs count as blank)."""
    out, current = [], []
    for line in lines(text) + [""]:
        if line.strip():
            current.append(line)
        elif current:
            out.append({"text": "\n".join(current).strip()})
            current = []
    return out


def _csv_records(path: Path, text: str) -> list[dict]:
    """Every cell as text as written: by default pandas reads 'None', 'NA' or an empty cell as null, '007' as 7."""
    import pandas as pd

    try:
        # a cell spanning lines keeps them as \n: \r\n inside quotes is a Windows file's line ending, not text
        rows = pd.read_csv(io.StringIO(text.replace("\r\n", "\n")), dtype=str, keep_default_na=False).to_dict("records")
    except Exception as e:
        raise UserError(f"cannot read {path}: {_root_message(e)}") from None
    for i, row in enumerate(rows, 1):  # a cell holds a list as its text (JSON): the turns of TRL's conversational
        for key in ("prompt", "completion", "history"):  # prompt/completion, LLaMA-Factory's history pairs
            value = row.get(key)
            if isinstance(value, str) and LIST_CELL.match(value):
                row[key] = _from_json(value, f"{path} record {i}", f"its {key} cell holds a list, but")
    return rows


LIST_CELL = re.compile(r"""\s*\[\s*(\{\s*["'](role|from)["']|\[)""")  # [{"role": …, [{'from': …, [["q", "a"]…


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(line: str) -> bool:
    """Whether the JSON strings of `line` hold a surrogate that is not one of a pair (json pairs the others)."""
    values = re.findall(r'"(?:[^"\\]|\\.)*"', line)  # each string literal, escapes and all
    try:
        "".join(json.loads(v) for v in values).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except json.JSONDecodeError:  # a string cut by the line's end (pretty-printed JSON never splits one)
        pass
    return False


def _json_records(path: Path, text: str) -> list[dict]:
    """The records of a .json or .jsonl file, pointing at the first malformed line.

    A JSON list of records; one record per line; or a file that is one JSON object (on one line or
    pretty-printed): the object itself when it is a record, its rows when it holds equal-length columns
    ({"text": [...]}), or the one list of records it holds ({"version": …, "data": [...]})."""
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{path} is empty")
    if SURROGATE_ESCAPE.search(text):  # JSON may escape half a UTF-16 pair, which no tokenizer takes
        for number, line in enumerate(lines(text), 1):
            if (bad := SURROGATE_ESCAPE.search(line)) and _lone_surrogate(line):
                raise UserError(f"{path} line {number}: {bad.group()} is half of a UTF-16 surrogate pair, not a "
                                "character; fix or drop it")
    data = None
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # (a list per line: read as lines, which says a line is not an object)
                raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if data is not None:
        if not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a JSON list of objects")
        return data
    if stripped[0] == "{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # one object per line
        if isinstance(whole, dict):
            if orient := _pandas_orient(whole):
                raise UserError(f"{path} is a pandas table saved with to_json(orient={orient!r}), not records: save "
                                "it with df.to_json(path, orient='records', lines=True)")
            lists = [v for v in whole.values() if isinstance(v, list)]
            if (len(lists) == len(whole) and len({len(v) for v in lists}) == 1 and lists[0]
                    and not any(isinstance(x, dict) for v in lists for x in v)):  # a record's turns are objects
                return [dict(zip(whole, row)) for row in zip(*lists)]
            if len(lists) == len(whole) > 1 and len({len(v) for v in lists}) > 1 and not any(
                    isinstance(x, dict) for v in lists for x in v):  # columns, one of them short
                lengths = ", ".join(f"{k} {len(v)}" for k, v in whole.items())
                raise UserError(f"{path} holds columns of different lengths ({lengths}); each column needs a value "
                                "for every record")
            if record_shape(whole) is not None or {"chosen", "rejected"} <= whole.keys():  # (DPO's: refused later)
                return [whole]
            records = {k: v for k, v in whole.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
            if len(records) == 1:
                return next(iter(records.values()))
            if len(records) > 1:  # {"train": [...], "test": [...]}
                raise UserError(f"{path} holds several lists of records ({', '.join(records)}); one file is one split: "
                                "save each as its own file (train.jsonl, test.jsonl…) in a folder, and give the folder")
            if empty := [k for k, v in whole.items() if v == []]:  # {"version": …, "data": []}
                raise UserError(f"{path} holds no records (its {empty[0]!r} is an empty list)")
            return [whole]  # one record of an unknown shape: the encoder names its keys
    records = Records()
    for i, line in enumerate(lines(text), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.lstrip("\ufeff"))  # (a file's byte-order mark, where files were concatenated)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {i}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                            "expected one JSON object per line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path} line {i}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
        records.numbers.append(i)
    records.starts.append(0)
    records.labels.append(f"{path.name} line")
    return records


def _pandas_orient(whole: dict) -> str | None:
    """'columns' ({column: {row: value}}: to_json's default), 'index' ({row: {column: value}}) or 'split'
    ({"columns", "index", "data"}) for what DataFrame.to_json writes, else None."""
    if whole and {"columns", "data"} <= set(whole) <= {"columns", "index", "data"} and isinstance(whole["data"], list):
        return "split"
    if not whole or not all(isinstance(v, dict) and v for v in whole.values()):
        return None
    if all(k.isdigit() for v in whole.values() for k in v):
        return "columns"
    return "index" if all(k.isdigit() for k in whole) else None


def _read_hub(name: str, split: str, config: str | None = None, flag: str = "--data-config") -> Records:
    import datasets

    from lora_cli.models import cache_only_if_offline

    offline = cache_only_if_offline()
    if offline:
        datasets.config.HF_HUB_OFFLINE = True  # datasets keeps its own copy of the setting
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # ('Using the latest cached version…': the note said so already)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        # offline, datasets reads only its own cache: a dataset fetched with `hf download` is in the hub's
        if offline and (folder := _hub_cache_folder(name)):
            return _pick(folder_splits(folder, name, config, flag), split, name, flag.replace("-config", "-split"),
                         "dataset")()
        msg = _dataset_error(e, flag)
        if offline and "is not cached" in msg:  # datasets says "… is not cached in None"
            msg = "there is no network, and it is not in the local Hugging Face cache"
        raise UserError(f"cannot load dataset {name!r} (split {split!r}): not a local path, and the Hub "
                        f"did not provide it: {msg}") from None
    return Records.numbered(arrow_records(ds.to_list()), f"{name} {split} record")


def _hub_cache_folder(name: str) -> Path | None:
    """The dataset repo's snapshot in the Hugging Face hub cache, if one is there."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a valid id): the caller's error stands
        return None


def split_eval(records: Records, fraction: float, seed: int) -> tuple[Records, Records]:
    """Hold out `fraction` of the records (at least one) for evaluation, reproducibly. Both parts keep each
    record's place in its file, so an error names the line, not the position in the part."""
    if not isinstance(records, Records):
        records = Records.numbered(records, "record")
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(len(records) * fraction))
    if n_eval >= len(records):
        raise UserError(f"--eval-split {fraction} leaves no training records ({len(records)} in all)")
    held = set(idx[:n_eval])
    return (records.subset([i for i in range(len(records)) if i not in held]), records.subset(sorted(held)))


# ---------------------------------------------------------------- record shapes

def record_shape(rec: Any) -> str | None:
    """'text' | 'prompt_completion' | 'messages' | 'alpaca' | 'sharegpt', or None if unknown.

    A null value counts as absent: Arrow fills a key that any record has into every record, as None.
    """
    if not isinstance(rec, dict):
        return None
    rec = {k: v for k, v in rec.items() if v is not None}
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "text" in rec:
        return "text"
    return None


NO_LOSS = "_lora_no_loss"  # marks a turn of weight 0 until it is rendered (templates never see it)
TURN_EXTRAS = ("tool_calls", "name", "tool_call_id", "reasoning_content", "thinking")  # what templates read
MUST_BE_READ = ("tool_calls", "reasoning_content", "thinking")  # names and call ids may be left out
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")  # a template that marks the assistant's tokens


def to_chat(rec: dict, shape: str, where: str) -> tuple[list[dict], int, bool]:
    """(messages, index of the first turn that may carry loss, whether the record is a plain string pair).

    Raises UserError on malformed content. prompt/completion may also be lists of messages (TRL's
    conversational prompt-completion): the loss then goes on the completion's assistant turns only.
    A record's `system` field (LLaMA-Factory's alpaca and ShareGPT) becomes its first turn.
    """
    messages, first_loss, plain = _shape_to_chat(rec, shape, where)
    system = rec.get("system")
    if system is None or system == "":
        return messages, first_loss, plain
    system = _str(system, where, "system")
    if messages[0]["role"] == "system":
        if messages[0]["content"] != system:
            raise UserError(f"{where}: the record has a system field and another system turn; keep one")
        return messages, first_loss, plain
    return [{"role": "system", "content": system}, *messages], first_loss + 1 if first_loss else 0, False


def _plain_pair(rec: Any) -> bool:
    """Whether a record is learned as a plain string pair where there is no chat template (text: no pair, and
    no turns either)."""
    shape = record_shape(rec)
    if shape in (None, "text"):
        return True
    try:
        return to_chat(rec, shape, "")[2]
    except UserError:  # raised again where the record is encoded, in file order
        return True


def _shape_to_chat(rec: dict, shape: str, where: str) -> tuple[list[dict], int, bool]:
    if shape == "prompt_completion":
        prompt, completion = rec["prompt"], rec["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return _turns(prompt, where, "prompt") + _turns(completion, where, "completion"), len(prompt), False
        if isinstance(prompt, list) or isinstance(completion, list):
            raise UserError(f"{where}: prompt and completion must both be strings or both lists of messages")
        return [{"role": "user", "content": _str(prompt, where, "prompt")},
                {"role": "assistant", "content": _str(completion, where, "completion")}], 0, True
    if shape == "alpaca":
        prompt = _str(rec["instruction"], where, "instruction")
        extra = rec.get("input")
        if extra:
            prompt = f"{prompt}\n\n{_str(extra, where, 'input')}"
        turns = [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": _str(rec["output"], where, "output")}]
        history = rec.get("history")  # LLaMA-Factory's earlier [user, assistant] pairs, learned as turns are
        if history in (None, [], ""):
            return turns, 0, True
        if not (isinstance(history, list) and all(isinstance(h, list) and len(h) == 2 for h in history)):
            raise UserError(f"{where}: history must be a list of [user, assistant] pairs")
        earlier = [{"role": role, "content": _str(text, where, f"history {role} turn")}
                   for pair in history for role, text in zip(("user", "assistant"), pair)]
        return earlier + turns, 0, False
    key = "messages" if shape == "messages" else "conversations"
    return _turns(rec[key], where, key), 0, False


def _turns(turns: Any, where: str, key: str) -> list[dict]:
    """Chat turns in either style, `role`/`content` or ShareGPT's `from`/`value`, as template messages."""
    if isinstance(turns, str) and turns.lstrip().startswith("["):  # a CSV cell holds the list as JSON
        turns = _from_json(turns, where, f"'{key}' is a string but")
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else f"{type(turns).__name__} {str(turns)[:40]!r}"
        raise UserError(f"{where}: '{key}' must be a non-empty list of turns (JSON text in a CSV cell), got {got}")
    messages = []
    for j, t in enumerate(turns, start=1):  # 1-based, as records are
        if not isinstance(t, dict):
            raise UserError(f"{where}: {key} turn {j} is not an object")
        sharegpt = t.get("role") is None and "from" in t
        if sharegpt:
            role, content, name = SHARE_GPT_ROLES.get(str(t.get("from")).lower()), t.get("value"), t.get("from")
        else:
            role, content, name = t.get("role"), t.get("content"), t.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            known = ", ".join(SHARE_GPT_ROLES) if sharegpt else "system, user, assistant, tool"
            raise UserError(f"{where}: {key} turn {j} has an unknown {'from' if sharegpt else 'role'} {name!r} "
                            f"(known: {known})")
        # function calling and reasoning: the template renders these (the loader fills absent keys with None)
        extras = {} if sharegpt else {k: t[k] for k in TURN_EXTRAS if _given(t.get(k))}
        if content is None and extras.get("tool_calls"):
            content = ""
        message = {"role": role, "content": _content(content, where, f"{key} turn {j} content"), **extras}
        weight = t.get("weight")  # OpenAI's fine-tuning format: 0 on an assistant turn = learn nothing from it
        if weight is not None:
            if weight not in (0, 1):  # True and 1.0 are 1
                raise UserError(f"{where}: {key} turn {j} has weight {weight!r}; a turn's weight is 0 (no loss) or 1")
            if weight == 0:
                message[NO_LOSS] = True
        messages.append(message)
    return messages


def _true_or_false(label: Any) -> bool:
    """A KTO label: true or false (a CSV cell reads "True")."""
    return isinstance(label, bool) or (isinstance(label, str) and label.strip().lower() in ("true", "false"))


def _given(value: Any) -> bool:
    """A turn's extra that says something: `"tool_calls": []` or `"reasoning_content": ""` (written on every turn
    by many exports) is as if absent."""
    return value is not None and not (isinstance(value, (str, list, dict)) and len(value) == 0)


def _content(value: Any, where: str, what: str) -> str:
    """A turn's text: a string, or a list of content parts (`{"type": "text", "text": …}`) joined by newlines."""
    if not isinstance(value, list):
        return _str(value, where, what)
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "input_text", "output_text"):  # (the last two: OpenAI's Responses API)
            raise UserError(f"{where}: {what} has a {kind or type(part).__name__!r} part; only text parts "
                            "can be trained (this tool fine-tunes text models)")
        texts.append(_str(part.get("text"), where, f"{what} text part"))
    return "\n".join(texts)


def tools_of(rec: dict, where: str) -> list | None:
    """A record's function definitions (`tools`: a list, or that list as a JSON string), for the template."""
    tools = rec.get("tools")
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        tools = _from_json(tools, where, "tools is")
    if not isinstance(tools, list):
        raise UserError(f"{where}: tools must be a list of function definitions, got {type(tools).__name__}")
    return tools


def _from_json(text: str, where: str, what: str) -> Any:
    """A value a column holds as JSON text (CSV cells, `tools` strings)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        repr_ = re.match(r"\s*[\[{]\s*[\[{]?\s*'", text)  # [{'role': …}]: Python's repr, as pandas' to_csv writes lists
        hint = ("; it is Python's repr of a list (DataFrame.to_csv and Dataset.to_csv write lists so): save the data as "
                "JSONL or Parquet instead (to_json(orient='records', lines=True), to_parquet)") if repr_ else ""
        raise UserError(f"{where}: {what} not valid JSON ({e.msg}){hint}") from None


def check_template(template: str, what: str) -> None:
    """A chat template that does not compile is its own error (it was reported as record 1's)."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{what}: not a valid Jinja template (line {e.lineno}: {e.message})") from None


def _render_error(where: str, e: Exception) -> UserError:
    return UserError(f"{where}: the chat template failed to render the conversation: {type(e).__name__}: {e}")


def _str(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- encoding

def ordered_map(fn: Callable, items: list, workers: int) -> Iterator:
    """fn(item) for each item, in order; over `workers` forked processes when there are more than one (they
    inherit fn and what it reads, so nothing is pickled but the items and results). An exception in a worker
    is raised here, at its item: the first one in order, as without workers. A worker that dies (killed, out
    of memory) is an error, not a wait for its lost item."""
    workers = min(workers, len(items))
    if workers <= 1:
        yield from map(fn, items)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with _tokenizers_serial():
        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), initializer=_set_worker_job,
                                   initargs=(fn, os.getpid()))
        done = False
        try:
            # the workers are forked as the items are handed out: a signal then waits until that is done (it would
            # stop the handing out half-way), and, in each worker, until it has its own handlers (not the CLI's)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                results = pool.map(_run_worker_job, items)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            yield from results
            done = True
        except BrokenProcessPool:
            raise UserError(f"a tokenizing worker process died (killed, or out of memory?); run again with fewer "
                            f"(--num-proc {max(1, workers // 2)})") from None
        finally:
            # whole, or the pool's thread waits forever (and the interpreter's exit with it): a second Ctrl-C (or
            # `timeout` passing one on) cut the clean-up half-way; the signals wait for its end
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                if not done:  # an error, a signal or a generator closed early: the rest is not wanted
                    for process in list((pool._processes or {}).values()):
                        process.terminate()
                manager = getattr(pool, "_executor_manager_thread", None)  # (shutdown forgets it)
                pool.shutdown(wait=done, cancel_futures=not done)
                if manager is not None:  # left running to the interpreter's exit, the pool's thread races Python's
                    manager.join(timeout=5)  # clean-up of it (3.11: "Exception ignored … Bad file descriptor")
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_worker_job: Callable | None = None  # set in each worker process only, by the pool's initializer


def _set_worker_job(fn: Callable, parent: int) -> None:
    global _worker_job
    _worker_job = fn
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops them,
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # with SIGTERM, which ends them quietly (not the CLI's handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # (blocked while it was forked)
    with contextlib.suppress(OSError, AttributeError):  # and so does the parent's end, however it comes (kill -9)
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before that was set
        os._exit(1)


def _run_worker_job(item):
    return _worker_job(item)


@contextlib.contextmanager
def _tokenizers_serial() -> Iterator[None]:
    """Forked while the tokenizers library's threads may be running, a child prints a warning and turns them
    off; said before the fork, the children run one thread each (a core each) and say nothing."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


# Tokens past --max-length after which a conversation's later answers are not rendered: their first tokens lie
# beyond the cut (more than merges across one boundary could move).
CUT_MARGIN = 32


class Encoder:
    """Turns records into Examples with one tokenizer, template and length limit."""

    def __init__(self, tokenizer, max_length: int, chat_template: str | None = None,
                 train_on_prompt: bool = False) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.has_template = bool(chat_template or getattr(tokenizer, "chat_template", None))
        own = getattr(tokenizer, "chat_template", None)
        # one template, or None: the tokenizer holds named ones ({"default": …, "tool_use": …}), picked per record
        self.template = chat_template or (own if isinstance(own, str) else None) or (None if own else builtin_template(tokenizer))
        self.train_on_prompt = train_on_prompt
        self.plain_pairs = not self.has_template  # string pairs as prompt + completion + EOS (see one_format)
        if max_length < 2:
            raise UserError(f"max length must be >= 2 (a token is learned from the ones before it), got {max_length}")
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise UserError("the tokenizer has no EOS token; set one in its tokenizer_config.json")

    def one_format(self, *datasets: list[dict] | None) -> None:
        """Without a chat template, string pairs (prompt/completion, alpaca) are learned as prompt + completion +
        EOS and records with turns (a system prompt, a history, messages) in the built-in template: one record
        with turns, train or eval, puts every record in the template, so that a run learns one format (the one it
        keeps for generate and merge), not two."""
        if self.plain_pairs:
            self.plain_pairs = all(_plain_pair(rec) for records in datasets if records for rec in records)

    def encode_all(self, records: list[dict], name: str = "data", advance=None,
                   workers: int = 1) -> tuple[list[Example], EncodeStats]:
        """Encode every record; all records must share one shape. `advance()` is called after each record.
        `workers` processes share a large dataset (rendering chat templates is Python: one core each); the
        examples, their order and any error are the same as with one."""
        stats = EncodeStats(records=len(records))
        if not records:
            raise UserError(f"{name}: no records")
        if {"chosen", "rejected"} <= records[0].keys():  # TRL's DPO layouts (with or without a prompt)
            raise UserError(f"{name} record 1: chosen and rejected answers are preference data (DPO): fine-tuning "
                            "learns every answer it is given, the rejected ones too; to learn the chosen ones, "
                            "give them as completion (prompt + completion, or messages) and drop the rejected")
        first = record_shape(records[0])
        if first is None:
            raise UserError(f"{name} record 1: unknown shape (keys: {_keys(records[0])}); "
                            f"expected one of: {', '.join(ACCEPTED_SHAPES)}{_shape_hint(records[0])}")
        kto = next((i for i, r in enumerate(records, 1) if _true_or_false(r.get("label"))), None)  # TRL's KTO
        if first == "prompt_completion" and kto:
            raise UserError(f"{name} record {kto}: a prompt, a completion and a true/false label is unpaired preference "
                            "data (KTO): its label=false completions are answers not to give, and fine-tuning on "
                            "them teaches them; keep the label=true records and drop the label column")
        stats.shape = first
        examples: list[Example] = []
        size = BLOCK if workers <= 1 else min(BLOCK, max(64, -(-len(records) // (8 * workers))))  # even shares
        blocks = [(start, min(start + size, len(records))) for start in range(0, len(records), size)]
        encode_block = functools.partial(self._encode_block, records, name, first)
        for (start, end), (part, part_stats) in zip(blocks, ordered_map(encode_block, blocks, workers)):
            examples += part
            stats.add(part_stats)
            for _ in range(end - start) if advance else ():
                advance()
        stats.examples = len(examples)
        stats.tokens = sum(len(e.input_ids) for e in examples)
        stats.loss_tokens = sum(e.n_loss for e in examples)
        if not examples:
            cut = stats.dropped_no_loss - stats.no_answer  # (the sequences of records without an answer are dropped too)
            cut_why = f"{cut} sequences dropped: empty, or every answer token cut by --max-length {self.max_length}"
            if not stats.no_answer:
                raise UserError(f"{name}: no record has a token to learn from ({cut_why})")
            raise UserError(f"{name}: no record has a token to learn from: {stats.no_answer:,} of {stats.records:,} "
                            "records have no assistant turn to learn (none, or only turns of weight 0; the loss is on "
                            "the answers: give each its answer, or --train-on-prompt to learn every token)"
                            + (f", and {cut_why}" if cut > 0 else ""))
        return examples, stats

    def _encode_block(self, records: list[dict], name: str, first: str, span: tuple[int, int]
                      ) -> tuple[list[Example], EncodeStats]:
        """Records start..end-1 as examples, and what was counted on the way."""
        stats, block, examples = EncodeStats(), [], []
        for i in range(*span):
            where = f"{name} record {i + 1}" + (records.place(i) if isinstance(records, Records) else "")
            shape = record_shape(records[i])
            if shape != first:
                raise UserError(f"{where}: shape {shape or 'unknown'} (keys: {_keys(records[i])}) differs from the "
                                f"first record's ({first}); one file holds one shape: {', '.join(ACCEPTED_SHAPES)}")
            block += self.encode(records[i], shape, where, stats)
        for ex in self._tokenized(block, stats):
            if ex.n_loss == 0:
                stats.dropped_no_loss += 1
                continue
            examples.append(ex)
        return examples, stats

    def _tokenized(self, items: list[Example | Rendered], stats: EncodeStats) -> list[Example]:
        """The block's rendered conversations tokenized in one batch (the tokenizer spreads a batch over the
        cores; one call per record was half the encoding time) and labelled from their spans."""
        rendered = [x for x in items if isinstance(x, Rendered)]
        if getattr(self.tok, "is_fast", False) and rendered:
            enc = self.tok([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
            tokens = iter(zip(enc["input_ids"], enc["offset_mapping"]))
        else:
            tokens = iter(self._tokenize_with_offsets(r.text, r.spans) for r in rendered)
        out = []
        for x in items:
            if isinstance(x, Rendered):
                ids, offsets = next(tokens)
                ids = np.asarray(ids, dtype=np.int32)
                labels = ids.copy() if self.train_on_prompt else np.where(_in_spans(offsets, x.spans), ids, IGNORE)
                x = self._truncate(Example(ids, labels), stats)
            out.append(x)
        return out

    def encode(self, rec: dict, shape: str, where: str, stats: EncodeStats) -> list[Example | Rendered]:
        if shape == "text":
            return self._text(_str(rec["text"], where, "text"), stats)
        messages, first_loss, plain_pair = to_chat(rec, shape, where)
        answers = [m for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_loss and not m.get(NO_LOSS)]
        stats.no_answer += not answers and not self.train_on_prompt
        stats.empty_answers += any(not m.get("tool_calls") and not str(m.get("content") or "").strip() for m in answers)
        if plain_pair and self.plain_pairs:
            return [self._plain_pair(messages[0]["content"], messages[1]["content"], stats)]
        if self.template != getattr(self.tok, "chat_template", None):
            stats.template = self.template
        return [self._chat(messages, where, stats, tools_of(rec, where), first_loss)]

    def _text(self, text: str, stats: EncodeStats) -> list[Example]:
        if not text.strip():  # (wikitext's blank rows): BOS → EOS would teach that a document is empty
            stats.dropped_no_loss += 1
            return []
        ids = list(self.tok(text, add_special_tokens=True)["input_ids"])
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        if len(ids) <= self.max_length:
            return [Example(ids, list(ids))]
        # each chunk after the first starts with the last token of the one before, as context: every token but
        # the first is predicted once (cut end to end, a chunk's first token was never, and an EOS left alone in
        # the last chunk had nothing to be predicted from: the chunk was dropped)
        stats.chunked += 1
        step = self.max_length - 1
        return [Example(ids[i : i + self.max_length], ids[i : i + self.max_length]) for i in range(0, len(ids) - 1, step)]

    def _plain_pair(self, prompt: str, completion: str, stats: EncodeStats) -> Example:
        p = list(self.tok(prompt, add_special_tokens=True)["input_ids"])
        c = list(self.tok(completion, add_special_tokens=False)["input_ids"]) + [self.eos_id]
        labels = (list(p) if self.train_on_prompt else [IGNORE] * len(p)) + c
        return self._truncate(Example(p + c, labels), stats)

    def template_for(self, tools: list | None) -> str:
        """The record's template: one for all, or, from a tokenizer with named templates, the one
        transformers picks ("tool_use" for a record with tools, when there is one, else "default")."""
        return self.template or self.tok.get_chat_template(tools=tools)

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str, tools: list | None = None) -> str:
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template_for(tools), tokenize=False,
                                                add_generation_prompt=add_generation_prompt, tools=tools)
        except Exception as e:  # a template's own raise_exception(), or a broken template
            raise _render_error(where, e) from None

    def _chat(self, messages: list[dict], where: str, stats: EncodeStats, tools: list | None = None,
              first_loss: int = 0) -> Example | Rendered:
        """Render a conversation; the loss goes on its assistant turns from turn `first_loss` on, except
        those of weight 0."""
        silent = {i for i, m in enumerate(messages) if m.get(NO_LOSS)}
        messages = [{k: v for k, v in m.items() if k != NO_LOSS} for m in messages]
        template = self.template_for(tools)
        unread = sorted({k for m in messages for k in m if k in MUST_BE_READ and k not in template}
                        | ({"tools"} if tools and "tools" not in template else set()))
        if unread:  # the template would drop them silently: the model would learn empty tool-call turns
            raise UserError(f"{where}: the record has {', '.join(unread)} but the chat template never reads "
                            f"{'them' if len(unread) > 1 else 'it'}; pass --chat-template FILE with a template that does")
        if GENERATION_TAG.search(template):
            if silent and not self.train_on_prompt:
                raise UserError(f"{where}: turns of weight 0 need their own loss mask, and a {{% generation %}} "
                                "template marks every assistant turn; use --chat-template FILE without it")
            return self._tagged_chat(messages, where, stats, tools, first_loss)
        spans: list[tuple[int, int]] = []  # character spans of assistant turns (end-of-turn included)
        previous = ""
        count_at = self.max_length  # characters of `previous` at which its tokens are counted next (doubling)
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < first_loss or i in silent:
                continue
            if len(previous) >= count_at:  # each answer renders the conversation so far: quadratic in turns
                if len(self.tok(previous, add_special_tokens=False)["input_ids"]) >= self.max_length + CUT_MARGIN:
                    break  # the later answers start past --max-length, where the conversation is cut anyway
                count_at = 2 * len(previous)
            if i == 0:  # templates cannot render the empty prefix, so its header cannot be told apart
                raise UserError(f"{where}: the conversation starts with an assistant turn; add the user (or "
                                "system) turn it answers")
            prompt = self.render(messages[:i], add_generation_prompt=True, where=where, tools=tools)
            full = self.render(messages[: i + 1], add_generation_prompt=False, where=where, tools=tools)
            if spans and (cut := self._closing(previous, prompt)):  # the EOS closed only the conversation so far
                previous = previous[:-cut]
                spans[-1] = (spans[-1][0], min(spans[-1][1], len(previous)))
            if not prompt.startswith(previous):
                raise UserError(f"{where}: {REWRITES}")
            if not full.startswith(prompt):
                earlier = self.render(messages[:i], add_generation_prompt=False, where=where, tools=tools)
                if not full.startswith(earlier):  # adding the answer changed the turns before it
                    raise UserError(f"{where}: {REWRITES}")
                # the turns before are kept, the prompt for the answer is not: DeepSeek-R1's opens <think>
                tail = prompt[len(os.path.commonprefix([prompt, full])):]
                raise UserError(f"{where}: the chat template's generation prompt ends with {tail[-40:]!r}, which the "
                                "rendered answer does not start with, so the answer's tokens cannot be told apart; use "
                                "--chat-template FILE with a template whose answers follow its generation prompt")
            spans.append((len(prompt), len(full)))
            previous = full
        text = self.render(messages, add_generation_prompt=False, where=where, tools=tools)
        if spans and (cut := self._closing(previous, text)):  # a user turn follows the last assistant one
            previous = previous[:-cut]
            spans[-1] = (spans[-1][0], min(spans[-1][1], len(previous)))
        if not text.startswith(previous):
            raise UserError(f"{where}: {REWRITES}")
        return Rendered(text, spans)

    def _closing(self, previous: str, longer: str) -> int:
        """How many characters at the end of `previous` (a conversation rendered up to an assistant turn) only
        close the conversation: templates such as Phi-3's put the EOS after the last turn alone
        (`{% else %}{{ eos_token }}`), so it is not there once the conversation goes on. 0 if none."""
        eos = getattr(self.tok, "eos_token", None)
        if not eos or longer.startswith(previous):
            return 0
        body = previous.rstrip()
        if not body.endswith(eos) or not longer.startswith(body[: -len(eos)]):
            return 0
        return len(previous) - len(body) + len(eos)

    def _tagged_chat(self, messages: list[dict], where: str, stats: EncodeStats, tools: list | None,
                     first_loss: int) -> Example:
        """The template marks what the assistant says itself (`{% generation %}`, as in TRL's training
        templates): the mask is read from it, so such a template may also rewrite earlier turns."""
        def tokens(turns: list[dict], **kw) -> dict:
            try:
                return self.tok.apply_chat_template(turns, chat_template=self.template_for(tools), tools=tools, tokenize=True,
                                                    return_dict=True, **kw)
            except Exception as e:
                raise _render_error(where, e) from None
        enc = tokens(messages, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        labels = list(ids) if self.train_on_prompt else [t if m else IGNORE for t, m in zip(ids, enc["assistant_masks"])]
        if first_loss and not self.train_on_prompt:  # a conversational prompt: its own assistant turns get no loss
            prompt = list(tokens(messages[:first_loss], add_generation_prompt=True)["input_ids"])
            if ids[: len(prompt)] != prompt:
                raise UserError(f"{where}: the chat template renders the prompt differently once the completion "
                                "follows, so the completion cannot be told apart; use --chat-template FILE")
            labels[: len(prompt)] = [IGNORE] * len(prompt)
        return self._truncate(Example(ids, labels), stats)

    def _tokenize_with_offsets(self, text: str, spans: list[tuple[int, int]]
                               ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character offsets."""
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        # Slow tokenizers have no offsets: tokenize piece by piece at the span boundaries.
        cuts = sorted({0, len(text), *(x for span in spans for x in span)})
        ids, offsets = [], []
        for a, b in zip(cuts, cuts[1:]):
            piece = list(self.tok(text[a:b], add_special_tokens=False)["input_ids"])
            ids += piece
            offsets += [(a, b)] * len(piece)
        return ids, offsets

    def _truncate(self, ex: Example, stats: EncodeStats) -> Example:
        if len(ex.input_ids) > self.max_length:
            stats.truncated += 1
            # copies: a view would keep the whole untruncated record in memory
            return Example(ex.input_ids[: self.max_length].copy(), ex.labels[: self.max_length].copy())
        return ex


def _in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token carries the loss: it overlaps an assistant span (a token straddling the boundary
    predicts assistant text too); an empty-width token counts where it stands. One pass over tokens and spans
    (both in text order; a token that starts before the last one restarts the spans)."""
    hits, j, last = [], 0, -1
    for s, e in offsets:
        if s < last:
            j = 0
        last = s
        while j < len(spans) and spans[j][1] <= s:  # spans that end before this token cannot reach later ones
            j += 1
        hits.append(j < len(spans) and (spans[j][0] < e if e > s else spans[j][0] <= s))
    return hits


def fingerprint(examples: list[Example]) -> str:
    """A digest of the token ids, labels and positions: --resume checks the data is still the run's."""
    from hashlib import sha256

    h = sha256()
    for e in examples:  # as 64-bit little-endian integers: the digests of runs saved when they were lists
        for seq in (e.input_ids, e.labels, () if e.position_ids is None else e.position_ids):
            h.update(np.asarray(seq, dtype="<i8").tobytes() + b"|")
    return h.hexdigest()[:16]


def _shape_hint(rec: Any) -> str:
    """What a record of an unknown shape may have gone through: a CSV header with spaces after its commas, or a
    file separated by tabs or semicolons read as comma-separated (one column named 'prompt\tcompletion')."""
    keys = [str(k) for k in rec] if isinstance(rec, dict) else []
    if any(k != k.strip() for k in keys):
        return " (a column name has spaces around it, as after the commas of 'prompt, completion': remove them)"
    if len(keys) == 1 and ("\t" in keys[0] or ";" in keys[0]):
        return " (one column named by the whole header: is the file separated by tabs or semicolons? a .csv is read " \
               "as comma-separated)"
    return ""


def _keys(rec: Any) -> str:
    if not isinstance(rec, dict):
        return type(rec).__name__
    keys = ", ".join(sorted(str(k) for k, v in rec.items() if v is not None)) or "none"
    nulls = sorted(str(k) for k, v in rec.items() if v is None)
    return keys + (f"; null: {', '.join(nulls)}" if nulls and record_shape(rec) is None else "")


# ---------------------------------------------------------------- packing and batching

def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Pack records into sequences of at most `max_length` tokens (first fit, longest first).

    Positions restart at 0 for each record, and the first label of each record is dropped: it would be
    predicted from the previous record's last token.
    """
    longest_first = sorted(examples, key=lambda e: -len(e.input_ids))
    bins = [[longest_first[i] for i in b] for b in first_fit([len(e.input_ids) for e in longest_first], max_length)]
    packed = []
    for b in bins:
        labels = np.concatenate([ex.labels for ex in b])
        starts = np.cumsum([0] + [len(ex.input_ids) for ex in b[:-1]])
        labels[starts] = IGNORE
        packed.append(Example(np.concatenate([ex.input_ids for ex in b]), labels,
                              np.concatenate([np.arange(len(ex.input_ids)) for ex in b]),
                              np.concatenate([np.full(len(ex.input_ids), j) for j, ex in enumerate(b)])))
    return packed


def first_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of `sizes` in bins of `capacity`, each into the first bin with room for it (a new one if none).

    What a scan over the bins gives, in O(n log n) rather than O(n × bins) (100k records: minutes): a max
    tree over the bins' free room leads to the first bin with enough by going left wherever it can.
    """
    width = 1
    while width < len(sizes):
        width *= 2
    tree = [-1] * (2 * width)  # tree[1] the largest room of all; tree[width + b] bin b's room, -1 until opened
    bins: list[list[int]] = []
    for i, n in enumerate(sizes):
        if tree[1] >= n:
            k = 1
            while k < width:
                k = 2 * k if tree[2 * k] >= n else 2 * k + 1
        else:
            k = width + len(bins)
            bins.append([])
            tree[k] = capacity
        bins[k - width].append(i)
        tree[k] -= n
        while k > 1:
            k //= 2
            tree[k] = max(tree[2 * k], tree[2 * k + 1])
    return bins


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (IGNORE on padding).

    Packed examples get position_ids and a 4-D block-diagonal causal mask (batch, 1, T, T), True = attend:
    position ids alone would still let records attend to each other.
    """
    import torch

    b, width = len(examples), max(len(e.input_ids) for e in examples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.from_numpy(e.input_ids)
        labels[i, :n] = torch.from_numpy(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if all(e.segments is None for e in examples):
        return batch
    seg = torch.full((b, width), -1, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        seg[i, :n] = 0 if e.segments is None else torch.from_numpy(e.segments)
        pos[i, :n] = torch.arange(n) if e.position_ids is None else torch.from_numpy(e.position_ids)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)  # (b, T, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    block = same & causal | torch.eye(width, dtype=torch.bool)  # padding rows see themselves: no NaN rows
    batch.update(attention_mask=block[:, None], position_ids=pos)
    return batch
