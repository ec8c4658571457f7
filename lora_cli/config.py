"""TrainConfig: the one place for `lora train` defaults. YAML keys are its field names, flags the same
names with dashes; precedence flag > `--config` YAML > default; unknown keys are errors.

No torch here: `lora train --help` and `--dry-run` build this without loading anything heavy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from lora_cli.errors import UserError, check

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
SCHEDULERS = ("cosine", "linear", "constant")
# Values that may name a local file or folder (else a Hub id).
LOCAL_PATH_FIELDS = ("model", "data", "eval_data", "chat_template")
# Only these may be given again with --resume (they change how long/what is logged or how fast the data is
# tokenized, not what is learned).
RESUMABLE_OVERRIDES = ("max_steps", "epochs", "save_every", "eval_every", "log_every", "num_proc")


def _opt(default: Any, help: str, group: str = "Training") -> Any:
    return field(default=default, metadata={"help": help, "group": group})


INT_MAX = 2**31 - 1


@dataclass
class TrainConfig:
    """Everything `lora train` needs; saved as train_config.yaml in the run directory."""

    model: str | None = _opt(None, "Hub id, local transformers directory, or .gguf file.", "Model and data")
    revision: str | None = _opt(None, "Version of a Hub --model: a branch, tag or commit [default: the default "
                                "branch]; written to the adapter, which merge and PEFT load the base at.", "Model and data")
    data: str | None = _opt(None, "Training data: .jsonl/.json/.csv/.parquet/.txt, a directory, or a Hub dataset id.", "Model and data")
    data_split: str = _opt("train", "Split to read from a Hub dataset (or a folder laid out as one).", "Model and data")
    data_config: str | None = _opt(None, "Configuration (subset) of a Hub dataset, or of a folder whose README lists several: load_dataset's name (openai/gsm8k: main).", "Model and data")
    eval_data: str | None = _opt(None, "Evaluation data (same formats as --data).", "Model and data")
    eval_data_config: str | None = _opt(None, "Configuration (subset) of a Hub --eval-data (or a folder whose README lists several).", "Model and data")
    eval_data_split: str | None = _opt(None, "Split to evaluate on, of --eval-data, else of --data (a Hub dataset or a folder) [default: a folder's valid/validation/val/dev/eval/test split; a Hub --eval-data's test split].", "Model and data")
    eval_split: float = _opt(0.0, "Fraction of --data held out for evaluation when there is no eval data.", "Model and data")
    output: str | None = _opt(None, "Run directory [default: runs/<model>-<yyyymmdd-hhmmss>].", "Model and data")
    chat_template: str | None = _opt(None, "Jinja chat template file to use instead of the tokenizer's.", "Model and data")
    max_length: int = _opt(1024, "Maximum tokens per sequence (longer text is chunked, chats truncated).", "Model and data")
    packing: bool = _opt(False, "Pack several records into each sequence (no attention across records).", "Model and data")
    group_by_length: bool = _opt(True, "Batch records of similar length together (less padding; order stays random).", "Model and data")
    train_on_prompt: bool = _opt(False, "Put the loss on every token, prompts included.", "Model and data")
    rank: int = _opt(16, "LoRA rank r.", "LoRA")
    alpha: float | None = _opt(None, "LoRA alpha [default: 2 × rank]; scaling = alpha / rank.", "LoRA")
    dropout: float = _opt(0.05, "Dropout on the LoRA branch input (the base model's own dropout, if its config has any, stays as it is, as with Trainer + PEFT).", "LoRA")
    targets: str = _opt("attention", "attention | all-linear | comma list of module names | re:PATTERN.", "LoRA")
    rslora: bool = _opt(False, "rsLoRA scaling: alpha / √rank.", "LoRA")
    dora: bool = _opt(False, "DoRA: also learn a per-row magnitude. Loads in PEFT; vLLM and llama.cpp cannot serve "
                      "it (merge it instead).", "LoRA")
    epochs: int = _opt(1, "Passes over the training data.")
    max_steps: int | None = _opt(None, "Optimizer steps; wins over --epochs and cycles through the data.")
    lr: float = _opt(2e-4, "Peak learning rate (AdamW).")
    warmup: float = _opt(0.03, "Warmup: < 1 is a fraction of the steps (rounded up), >= 1 a step count.")
    scheduler: str = _opt("cosine", "cosine | linear | constant.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).")
    batch_size: int = _opt(4, "Sequences per device per micro-batch.")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.")
    seed: int = _opt(0, "Random seed: same seed, data and machine give the same adapter.")
    dtype: str = _opt("auto", "auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16/fp16 on GPU).", "Hardware")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward: less memory, more time.", "Hardware")
    compile: bool = _opt(False, "torch.compile each decoder layer: on a GPU ~2x faster steps after ~15 s of "
                         "compiling (long runs); slower on a CPU (docs/benchmarks.md).", "Hardware")
    num_proc: int | None = _opt(None, "Processes that tokenize the data (rendering chat templates is Python: a core "
                                "each; at most one per CPU core) [default: one per core, up to 8, for 1,024 records or more].", "Hardware")
    load_in_4bit: bool = _opt(False, "QLoRA: load the base in 4-bit NF4 (bitsandbytes, CUDA only); LoRA stays 16/32-bit.", "Hardware")
    eval_every: int = _opt(0, "Steps between evaluations (0 = at the end only).", "Logging and checkpoints")
    log_every: int = _opt(1, "Steps between metrics.jsonl rows; a row averages the steps since the last one (lr: the last step's).",
                          "Logging and checkpoints")
    save_every: int = _opt(0, "Steps between checkpoints (0 = every 10% of the run).", "Logging and checkpoints")
    save_total_limit: int = _opt(3, "Checkpoints kept: the newest N plus the best by eval loss.", "Logging and checkpoints")
    trust_remote_code: bool = _opt(False, "Allow the model repository's own Python code to run.", "Safety")
    allow_pickle: bool = _opt(False, "Allow loading pickled weights (*.bin, *.pt): only from sources you trust.", "Safety")

    # ---- derived values ----
    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    # ---- building ----
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_sources(cls, flags: dict[str, Any], yaml_path: str | None = None) -> tuple[TrainConfig, dict[str, Any]]:
        """flag > YAML > default. `flags` holds only the flags the user actually gave.

        Returns the config and the values the user set (by flag or YAML), which --resume checks."""
        values: dict[str, Any] = {}
        if yaml_path:
            values.update(read_yaml_config(yaml_path))
        if flags.get("epochs") is not None and flags.get("max_steps") is None:
            values.pop("max_steps", None)  # --epochs given counts the run in epochs (a YAML's max_steps would win)
        values.update({k: v for k, v in flags.items() if v is not None})
        cfg = cls.from_dict(values, source=f"--config {yaml_path}" if yaml_path else "config")
        return cfg, {k: getattr(cfg, k) for k in values}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a plain dict (YAML), coercing types; unknown keys and bad types are errors."""
        known = set(cls.field_names())
        unknown = [k for k in values if k not in known]
        problems = [f"unknown key {k!r}" + _did_you_mean(k, known) for k in unknown]
        hints = get_type_hints(cls)
        clean = {}
        for k, v in values.items():
            if k == "targets" and isinstance(v, list) and all(isinstance(t, str) for t in v):
                v = ",".join(v)  # YAML's natural spelling of a module list
            if k in known:
                try:
                    clean[k] = _coerce(v, hints[k])
                except (TypeError, ValueError, OverflowError):
                    problems.append(f"{k}: expected {_type_name(hints[k])}, got {v!r}")
        check(problems, source)
        return cls(**clean)

    def resolved(self, now: float | None = None) -> TrainConfig:
        """Normalise aliases and fill the default output. alpha stays None when not given: it follows the rank
        (2 × rank), also when the saved train_config.yaml is run again with another --rank."""
        c = dataclasses.replace(self)
        c.dtype = DTYPE_ALIASES.get(c.dtype, c.dtype)
        if isinstance(c.targets, str) and not c.targets.startswith("re:"):  # "q_proj, v_proj" is q_proj,v_proj
            c.targets = ",".join(t.strip() for t in c.targets.split(",") if t.strip()) or c.targets
        for k in LOCAL_PATH_FIELDS:  # the run directory names local files absolutely: it is read from anywhere
            v = getattr(c, k)
            if v and Path(v).expanduser().exists():
                setattr(c, k, os.path.abspath(Path(v).expanduser()))
        if c.output is None and c.model:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
            c.output = f"runs/{model_short_name(c.model)}-{stamp}"
        if c.output:  # absolute too: a rerun of train_config.yaml from elsewhere writes where this run did
            c.output = os.path.abspath(Path(c.output).expanduser())
        return c

    def validate(self) -> None:
        """Check every value; raise one UserError that lists all problems."""
        p = []
        if not self.model:
            p.append("--model is required")
        if not self.data:
            p.append("--data is required")
        if self.rank < 1:
            p.append(f"--rank must be >= 1 (got {self.rank})")
        if self.alpha is not None and not (self.alpha > 0 and math.isfinite(self.alpha)):
            p.append(f"--alpha must be a finite number > 0 (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            p.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            p.append(f"--lr must be a finite number > 0 (got {self.lr})")
        if not (self.warmup >= 0 and math.isfinite(self.warmup)):
            p.append(f"--warmup must be a finite number >= 0 (got {self.warmup})")
        if self.scheduler not in SCHEDULERS:
            p.append(f"--scheduler must be one of {', '.join(SCHEDULERS)} (got {self.scheduler!r})")
        if DTYPE_ALIASES.get(self.dtype, self.dtype) not in DTYPES:
            p.append(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        for name in ("batch_size", "grad_accum", "max_length", "epochs", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("rank", "batch_size", "grad_accum", "max_length", "epochs", "max_steps", "save_total_limit"):
            if (getattr(self, name) or 0) > INT_MAX:  # (torch sizes are 64-bit: beyond, an internal error)
                p.append(f"--{name.replace('_', '-')} is too large (got {getattr(self, name)})")
        if self.max_length == 1:
            p.append("--max-length must be >= 2 (a token is learned from the ones before it)")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"--max-steps must be >= 1 (got {self.max_steps})")
        for name in ("eval_every", "save_every", "weight_decay", "max_grad_norm"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):  # NaN too
                kind = "a finite number" if isinstance(getattr(self, name), float) else "an integer"
                p.append(f"--{name.replace('_', '-')} must be {kind} >= 0 (got {getattr(self, name)})")
        if self.num_proc is not None and self.num_proc < 1:
            p.append(f"--num-proc must be >= 1 (got {self.num_proc})")
        elif (self.num_proc or 1) > 1 and sys.platform != "linux":
            p.append(f"--num-proc {self.num_proc}: tokenizing in several processes forks them, which lora does on "
                     "Linux only; leave it out")
        if self.save_total_limit < 1:
            p.append(f"--save-total-limit must be >= 1 (got {self.save_total_limit})")
        if not 0 <= self.seed < 2**32:
            p.append(f"--seed must be in [0, 2**32) (got {self.seed})")
        # a split is picked from a Hub dataset or a folder laid out as one, never from a file
        if self.data and self.data_split != "train" and Path(self.data).expanduser().is_file():
            p.append(f"--data-split {self.data_split!r} picks a split of a Hub dataset (or a folder laid out as "
                     f"one), but {self.data!r} is a file")
        for flag, value, where in (("--data-config", self.data_config, self.data),
                                   ("--eval-data-config", self.eval_data_config, self.eval_data)):
            if value is not None and not (where and not Path(where).expanduser().is_file()):
                p.append(f"{flag} {value!r} picks a configuration of a Hub dataset (or a folder laid out as one), but "
                         + (f"{where!r} is a file" if where else f"no {flag.removesuffix('-config')} is given"))
        source = self.eval_data or self.data
        if self.eval_data_split is not None and source and Path(source).expanduser().is_file():
            p.append(f"--eval-data-split {self.eval_data_split!r} picks a split of a Hub dataset or a folder, but "
                     f"{'--eval-data' if self.eval_data else '--data'} {source!r} is a file")
        if not self.targets.strip():
            p.append("--targets is empty; use attention, all-linear, a comma list of module names or re:PATTERN")
        if not 0 <= self.eval_split < 1:
            p.append(f"--eval-split must be a fraction in [0, 1) (got {self.eval_split})")
        elif self.eval_split and (self.eval_data or self.eval_data_split):
            given = "--eval-data is" if self.eval_data else f"--eval-data-split {self.eval_data_split!r} names"
            p.append(f"--eval-split {self.eval_split} holds out part of --data, but {given} the eval data; "
                     "give one of them")
        if self.targets.startswith("re:"):
            try:
                re.compile(self.targets[3:])
            except re.error as e:
                p.append(f"--targets: invalid regular expression ({e})")
        from lora_cli.data import names_missing_file

        for name in ("data", "eval_data"):  # (a dry run says so too, before a run loads the model)
            value, flag = getattr(self, name), f"--{name.replace('_', '-')}"
            if value in ("-", "/dev/stdin"):
                p.append(f"{flag} {value}: records are not read from standard input; save them to a file and give "
                         "its path")
            elif name == "eval_data" and value and _fraction(value) and not Path(value).expanduser().exists():
                p.append(f"--eval-data {value!r} names eval data (a file, a folder, a Hub dataset); to hold out a "
                         f"fraction of --data, use --eval-split {value}")
            elif value and names_missing_file(value):
                p.append(f"{flag} {value!r} does not exist")
        if self.chat_template and not Path(self.chat_template).is_file():
            p.append(f"--chat-template {self.chat_template!r} is not a file")
        check(p, "invalid configuration")

    def to_yaml(self) -> str:
        import yaml

        text = yaml.safe_dump(dataclasses.asdict(self), sort_keys=False, allow_unicode=True)
        if self.alpha is None and isinstance(self.rank, int):  # say what the default comes to
            text = text.replace("\nalpha: null\n", f"\nalpha: null  # 2 × rank = {2 * self.rank}\n", 1)
        return text


def model_short_name(model: str) -> str:
    """`HuggingFaceTB/SmolLM2-135M-Instruct` → `SmolLM2-135M-Instruct`; `x/y.Q4_1.gguf` → `y.Q4_1`."""
    name = Path(model.rstrip("/")).name
    return re.sub(r"\.gguf$", "", name) or "model"


def _fraction(value: str) -> bool:
    """Whether an option's text is a number in (0, 1): --eval-data 0.1 meant --eval-split 0.1."""
    try:
        return 0 < float(value) < 1
    except ValueError:
        return False


def _unique_key_loader():
    """yaml.safe_load's loader, except that a key given twice is an error (YAML keeps the last one silently).
    Built on first use: yaml is imported only by the commands that read or write YAML (`lora --help` stays fast)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def read_yaml_config(path: str, what: str | None = None) -> dict[str, Any]:
    """A `--config` YAML file (or, named by `what`, another config file) as a dict, or a clear error."""
    p = Path(path)
    what = what or f"--config {path!r}"
    if not p.is_file():
        raise UserError(f"{what}: {'a folder, not a YAML file' if p.is_dir() else 'no such file'}")
    import yaml

    try:
        data = yaml.load(p.read_text(encoding="utf-8-sig"), Loader=_unique_key_loader())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what}: expected a mapping of option: value, got {type(data).__name__}")
    spelled = {}
    for k in data:  # batch-size, as the flag spells it, is batch_size: both in one file is one key twice
        spelled.setdefault(str(k).replace("-", "_"), []).append(str(k))
    if twice := next((ks for ks in spelled.values() if len(ks) > 1), None):
        raise UserError(f"{what}: {' and '.join(twice)} are one option given twice; keep one")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    TrainConfig.from_dict(data, source=what)  # report unknown keys / types now
    source = data.get("eval_data") or data.get("data")
    if (data.get("eval_data_split") == "test" and {"data_split", "eval_split"} <= data.keys()
            and isinstance(source, str) and Path(source).expanduser().is_file()):
        data["eval_data_split"] = None  # the default until 2026-11, in the train_config.yaml of an earlier run
    return data


_BOOL_WORDS = {w: True for w in ("true", "yes", "on", "1")} | {w: False for w in ("false", "no", "off", "0")}


def _coerce(value: Any, hint: Any) -> Any:
    """YAML value → the field's type (int/float/str/bool, optionally None)."""
    args = getattr(hint, "__args__", None)
    if args and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    elif value is None:
        raise TypeError
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]  # "true" in quotes, as the flag would take it
        if type(value) is int and value in (0, 1):  # (as the flag takes 1 and 0)
            return bool(value)
        raise TypeError
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise TypeError
        return str(value)
    return value


def _type_name(hint: Any) -> str:
    args = getattr(hint, "__args__", None)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return hint.__name__


def _did_you_mean(key: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def run_files(adapter_dir: str | Path, name: str) -> list[Path]:
    """Where an adapter's run keeps file `name`: beside it, and for a checkpoint (RUN/checkpoints/step-N) in RUN."""
    d = Path(adapter_dir)
    return [d / name] + ([d.parent.parent / name] if d.parent.name == "checkpoints" else [])


def run_settings(adapter_dir: str | Path) -> dict:
    """The train_config.yaml of a run directory, or of the run holding a checkpoint (run/checkpoints/step-N);
    {} if there is none."""
    import yaml

    for cfg_file in run_files(adapter_dir, "train_config.yaml"):
        if cfg_file.is_file():
            try:
                return yaml.safe_load(cfg_file.read_text()) or {}
            except yaml.YAMLError:
                return {}
    return {}


def run_chat_template(adapter_dir: str | Path) -> str | None:
    """The chat template a run or adapter trained with, when it is not its base tokenizer's own: its
    chat_template.jinja (of the run, for a checkpoint), else (older runs) the --chat-template file it names."""
    from lora_cli.data import CHAT_TEMPLATE_FILE

    for kept in run_files(adapter_dir, CHAT_TEMPLATE_FILE):
        if kept.is_file():
            return kept.read_text(encoding="utf-8-sig")
    path = run_settings(adapter_dir).get("chat_template")
    if path and Path(path).is_file():
        return Path(path).read_text(encoding="utf-8-sig")
    return shipped_chat_template(Path(adapter_dir))


def shipped_chat_template(adapter_dir: Path) -> str | None:
    """The template of a tokenizer saved beside an adapter the way transformers before 4.43 saved it (in
    tokenizer_config.json, or chat_template.json): Hub adapters trained on a template of their own ship it so."""
    from lora_cli.errors import read_json_object

    for name in ("tokenizer_config.json", "chat_template.json"):
        if not (adapter_dir / name).is_file():
            continue
        template = read_json_object(adapter_dir / name).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if isinstance(template, str) and template.strip():
            return template
    return None
