"""PEFT's on-disk adapter format, without torch: the config, the file names, the safetensors header.

`inspect` uses only this module, so it answers without importing torch.
"""

from __future__ import annotations

import json
import re
import shlex
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.errors import UserError, few, training_now

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"  # PEFT's target_modules shorthand, resolved on the model
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# Metadata key (safetensors header) recording that the base was a dequantized GGUF file.
GGUF_BASE_KEY = "lora_cli.base_gguf"

# PEFT LoraConfig keys that only describe, or only matter while initialising / training.
_BENIGN_KEYS = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias",
    "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights", "runtime_config", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config", "qalora_group_size",
    "ensure_weight_tying", "monteclora_config", "use_dora", "layers_to_transform", "layers_pattern", "exclude_modules",
    "modules_to_save",
}
# init_lora_weights values that change the *base* weights: such adapters need the modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class AdapterConfig:
    """The LoRA hyper-parameters an adapter needs; reads and writes PEFT's `adapter_config.json`."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str
    lora_dropout: float = 0.0
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    layers_to_transform: list[int] | None = None  # PEFT's layer selection, for a target_modules list
    layers_pattern: list[str] | None = None
    exclude_modules: list[str] | str | None = None  # suffixes, or a full-match regex
    modules_to_save: list[str] | None = None  # layers saved whole (trained in full), by name
    ensure_weight_tying: bool = False  # PEFT: a saved layer tied to another is saved (and replaced) in both places
    unsupported: list[str] = field(default_factory=list)  # what lora does not implement (read with lenient=True)
    revision: str | None = None  # the base's Hub revision (branch, tag or commit) the adapter was trained on

    def saves(self, module_path: str, within: bool = False) -> bool:
        """Whether the adapter carries this module whole: PEFT's modules_to_save rule, a plain suffix of the path
        (`norm` catches `input_layernorm`). `within`: or one of the modules holding it (`mlp` saves the block)."""
        parts = module_path.split(".")
        paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if within else [module_path]
        return any(p.endswith(m) for m in self.modules_to_save or () for p in paths)

    def targets(self, module_path: str) -> bool:
        """Whether PEFT wraps this module (its check_target_module_exists, for `target_modules` as written;
        the all-linear shorthand is expanded by the caller)."""
        ex = self.exclude_modules
        if self.saves(module_path, within=True):  # a layer saved whole (or in a block saved whole) is never wrapped
            return False
        if ex and (re.fullmatch(ex, module_path) if isinstance(ex, str) else any(suffix_matches(module_path, e) for e in ex)):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_path) is not None
        if module_path in self.target_modules:
            return True
        return any(suffix_matches(module_path, t) for t in self.target_modules) and self.in_layers(module_path)

    def in_layers(self, module_path: str) -> bool:
        """layers_to_transform: the module's first numbered segment (after `layers_pattern`) is listed."""
        if not self.layers_to_transform:
            return True
        patterns = self.layers_pattern or [r"[^.]*"]
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", module_path)
            if m:
                return int(m[1]) in self.layers_to_transform
        return False

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """r and alpha of one module, honouring rank_pattern / alpha_pattern (PEFT's first-match rule)."""
        return (
            _pattern_value(self.rank_pattern, module_path, self.r),
            _pattern_value(self.alpha_pattern, module_path, self.lora_alpha),
        )

    def to_peft_dict(self) -> dict[str, Any]:
        """The dict PEFT's LoraConfig reads (sorted target list)."""
        targets = sorted(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        alpha = int(self.lora_alpha) if float(self.lora_alpha).is_integer() else self.lora_alpha
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": "none",
            "inference_mode": True,
            "init_lora_weights": True,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "modules_to_save": self.modules_to_save,
            "use_dora": self.use_dora,
            **{k: v for k in ("layers_to_transform", "layers_pattern", "exclude_modules")
               if (v := getattr(self, k)) is not None},
            **({"ensure_weight_tying": True} if self.ensure_weight_tying else {}),
            **({"revision": self.revision} if self.revision else {}),
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json", lenient: bool = False
                       ) -> AdapterConfig:
        """Validate a PEFT config: features we do not implement are refused by name, all at once (`lenient`:
        listed in `unsupported` instead, for a description of the adapter)."""
        problems = []
        peft_type = d.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise UserError(f"{source}: not a LoRA adapter (peft_type {peft_type!r}); only LoRA is supported")
        for key, value in d.items():
            if key in _BENIGN_KEYS or value in (None, False, {}, [], "", 0):
                continue
            shown = json.dumps(value)
            problems.append(f"{key}={shown if len(shown) <= 60 else shown[:59] + '…'}")
        if d.get("bias", "none") not in ("none", None):
            problems.append(f"bias={d['bias']!r} (bias training)")
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            problems.append(f"init_lora_weights={init!r} (it changes the base weights)")
        missing = [k for k in ("r", "lora_alpha", "target_modules") if d.get(k) in (None, "", [])]
        if problems and not lenient:
            raise UserError(f"{source} uses features lora does not implement: {', '.join(problems)}")
        if missing:
            raise UserError(f"{source} lacks {', '.join(missing)}; is this a LoRA adapter?")
        try:
            cfg = cls(
                r=_whole(d["r"], "r"),
                lora_alpha=float(d["lora_alpha"]),
                target_modules=d["target_modules"] if isinstance(d["target_modules"], str)
                else [str(t) for t in d["target_modules"]],
                lora_dropout=float(d.get("lora_dropout") or 0.0),
                use_rslora=bool(d.get("use_rslora", False)),
                fan_in_fan_out=bool(d.get("fan_in_fan_out", False)),
                base_model_name_or_path=d.get("base_model_name_or_path"),
                rank_pattern={str(k): _whole(v, f"rank_pattern[{k!r}]")
                              for k, v in _patterns(d.get("rank_pattern"), "rank_pattern").items()},
                alpha_pattern={str(k): float(v) for k, v in _patterns(d.get("alpha_pattern"), "alpha_pattern").items()},
                use_dora=bool(d.get("use_dora", False)),
                layers_to_transform=_int_list(d.get("layers_to_transform")),
                layers_pattern=[d["layers_pattern"]] if isinstance(d.get("layers_pattern"), str)
                else _names(d.get("layers_pattern"), "layers_pattern"),
                exclude_modules=d.get("exclude_modules") if isinstance(d.get("exclude_modules"), str)
                else _names(d.get("exclude_modules"), "exclude_modules"),
                modules_to_save=_names(d.get("modules_to_save"), "modules_to_save"),
                ensure_weight_tying=bool(d.get("ensure_weight_tying", False)),
                unsupported=problems,
                revision=str(d["revision"]) if d.get("revision") else None,
            )
            for what, pattern in ([("target_modules", cfg.target_modules)] if isinstance(cfg.target_modules, str)
                                  else []) + [("a rank_pattern or alpha_pattern key", k)
                                              for k in (*cfg.rank_pattern, *cfg.alpha_pattern)]:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{what} {pattern!r} is not a regular expression: {e}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: malformed value ({e})") from None
        if cfg.r < 1 or any(v < 1 for v in cfg.rank_pattern.values()):
            raise UserError(f"{source}: rank must be >= 1")
        return cfg


def _patterns(value: Any, what: str) -> dict:
    """rank_pattern / alpha_pattern: an object of module patterns to values."""
    if value in (None, {}, []):
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object of module patterns to values, got {type(value).__name__}")
    return value


def _names(value: Any, what: str) -> list[str] | None:
    """A list of module names (modules_to_save, exclude_modules, layers_pattern), or None."""
    if value in (None, [], ""):
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of module names, got {json.dumps(value)[:60]}")
    return value


def _whole(value: Any, what: str) -> int:
    """A rank as a JSON number: 4 or 4.0; 4.5 (int() made it 4: its matrices are not rank 4.5) is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def suffix_matches(name: str, key: str) -> bool:
    """PEFT's list rule: `key` is the whole module path or a suffix of it on a dotted boundary."""
    return name == key or name.endswith("." + key)


def _int_list(value) -> list[int] | None:
    if value is None or value == []:
        return None
    return [int(value)] if isinstance(value, (int, float, str)) else [int(v) for v in value]


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, then its metadata keys put in order (it writes them in a random one): the same
    tensors and metadata make the same bytes, so identical runs give identical files."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        ordered = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(ordered) <= n:  # the same keys and values: the same length, padded as safetensors pads
            f.seek(8)
            f.write(ordered.ljust(n))


def is_gguf_file(path: Path) -> bool:
    """Whether `path` is a file that starts as GGUF does."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type → bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_type(path: Path) -> str | None:
    """A GGUF file's general.type ("model", "adapter"), read from its header alone (gguf's reader maps every
    tensor first: seconds for a model); None if it does not say or cannot be read."""
    def skip(f, kind: int) -> None:
        if kind == _GGUF_STRING:
            f.seek(struct.unpack("<Q", f.read(8))[0], 1)
        elif kind == _GGUF_ARRAY:
            item, count = struct.unpack("<IQ", f.read(12))
            if item in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[item] * count, 1)
            else:
                for _ in range(count):
                    skip(f, item)
        else:
            f.seek(_GGUF_SIZES[kind], 1)

    try:
        with open(path, "rb") as f:
            magic, version, _, kv_count = struct.unpack("<4sIQQ", f.read(24))
            if magic != b"GGUF" or version < 2:
                return None
            for _ in range(kv_count):
                key = f.read(struct.unpack("<Q", f.read(8))[0])
                kind = struct.unpack("<I", f.read(4))[0]
                if key == b"general.type" and kind == _GGUF_STRING:
                    return f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8", "replace")
                skip(f, kind)
    except (OSError, struct.error, KeyError):
        return None
    return None


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """(config, weights) of an adapter directory, or a UserError saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"adapter {str(path)!r} does not exist")
    if not path.is_dir():
        if is_gguf_file(path):
            raise UserError(f"adapter {str(path)!r} is a GGUF file, which llama.cpp loads (lora inspect describes it); "
                            "lora takes the run or PEFT adapter directory it was exported from")
        if path.suffix.lower() == ".gguf":
            raise UserError(f"adapter {str(path)!r} is not a GGUF file" + (": it is empty" if not path.stat().st_size
                            else " (it does not start with GGUF): a damaged or unfinished download?"))
        raise UserError(f"adapter {str(path)!r} is not a directory (expected a run or adapter directory)")
    config, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    saved = sorted(path.glob(f"checkpoints/step-*/{CONFIG_NAME}"))
    if (path / "train_config.yaml").is_file() and training_now(path):  # (a --resume too: its end is not yet)
        raise UserError(f"{str(path)!r} is a run still training (a lora train holds it): wait for it to finish"
                        + (f", or use one of its checkpoints (the newest now: {saved[-1].parent})" if saved else ""))
    if not config.is_file():
        if saved:  # a run stopped before its end
            raise UserError(f"{str(path)!r} is a run that has not finished (no {CONFIG_NAME} yet): resume it with "
                            f"lora train --output {shlex.quote(str(path))} --resume, or use its newest checkpoint, "
                            f"{saved[-1].parent}")
        if (path / "train_config.yaml").is_file():
            raise UserError(f"{str(path)!r} is a run that stopped before its first checkpoint (no {CONFIG_NAME}): "
                            f"start it again with lora train --config {shlex.quote(str(path / 'train_config.yaml'))} "
                            "--force")
        named = sorted(d.name for d in path.iterdir() if (d / CONFIG_NAME).is_file())
        if named:  # PEFT's save_pretrained of several adapters: each but "default" in a folder of its name
            raise UserError(f"{str(path)!r} is not an adapter itself: it holds the adapters {few(named)} (PEFT saves "
                            f"each in a folder of its name); pass one of them, e.g. {path / named[0]}")
        raise UserError(f"{str(path)!r} is not an adapter: it has no {CONFIG_NAME}")
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            convert = (f"import torch, safetensors.torch as s; s.save_file(torch.load("
                       f"{str(path / 'adapter_model.bin')!r}, weights_only=True), {str(weights)!r})")
            raise UserError(
                f"{str(path)!r} holds only adapter_model.bin (pickle: lora reads adapters as safetensors only, "
                f"--allow-pickle is for base models); if you trust its source, convert it once: python -c "
                f"{shlex.quote(convert)}"
            )
        raise UserError(f"{str(path)!r} is not a complete adapter: it has no {WEIGHTS_NAME}")
    return config, weights


def embedding_lora(keys) -> str | None:
    """'LoRA on embedding layers (…)' when tensor names hold PEFT's LoRA on an embedding (lora implements LoRA on
    linear layers only), else None."""
    found = sorted({k.removeprefix(KEY_PREFIX).split(".lora_embedding_")[0] for k in keys if ".lora_embedding_" in k})
    return f"LoRA on embedding layers ({few(found)})" if found else None


def older_layout_hint(paths) -> str:
    """A hint for an adapter of a multimodal model saved under transformers 4, whose module names it changed."""
    return ("; or it was saved under transformers 4, which named this model's modules otherwise (language_model.model.…"
            " is now model.language_model.…): lora reads the current names only" if any(
                p.startswith("language_model.model.") for p in paths) else "")


def read_adapter_config(path: str | Path, lenient: bool = False) -> AdapterConfig:
    """Parse and validate the adapter_config.json of an adapter directory (`lenient`: see from_peft_dict)."""
    config_path, _ = adapter_files(path)
    try:
        d = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    return AdapterConfig.from_peft_dict(d, source=str(config_path), lenient=lenient)


def check_ranks(config: AdapterConfig, shapes: dict[str, list[int]], weights: Path) -> None:
    """Each module's A (r, in) and B (out, r) against the r its config gives: a config edited or taken from
    another adapter would scale every update by the wrong alpha / r."""
    paths = sorted({key.rsplit(".lora_", 1)[0] for key in shapes if ".lora_" in key})
    ignored = [] if config.target_modules == ALL_LINEAR else [p for p in paths if not config.targets(p)]
    if ignored:  # PEFT loads without them: a resize, combine or GGUF export with them would be another adapter
        raise UserError(f"{weights} holds LoRA weights for {few(ignored)}, which its target_modules does not name "
                        f"(PEFT ignores them); add {'them' if len(ignored) > 1 else 'it'} to target_modules in "
                        f"{CONFIG_NAME}, or remove the tensors")
    problems, no_magnitude = [], []
    for key, shape in shapes.items():
        if key.endswith(".lora_magnitude_vector") and not config.use_dora:
            problems.append(f"{key.removesuffix('.lora_magnitude_vector')} has a DoRA magnitude, its config does "
                            "not say use_dora")
        if key.endswith(".lora_B.weight") and key.replace(".lora_B.", ".lora_A.") not in shapes:
            problems.append(f"{key[: -len('.lora_B.weight')]} has lora_B but no lora_A")
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        r, _ = config.rank_and_alpha(path)
        b = shapes.get(f"{path}.lora_B.weight")
        if b is None:
            problems.append(f"{path} has lora_A but no lora_B")
        elif len(shape) != 2 or len(b) != 2 or shape[0] != b[1]:
            problems.append(f"{path}: lora_A {shape} and lora_B {b} do not make a product B A")
        elif shape[0] != r:
            problems.append(f"{path} has rank {shape[0]}, its config says r={r}")
        elif config.use_dora and (m := shapes.get(f"{path}.lora_magnitude_vector")) != [b[0]]:
            if m is None:
                no_magnitude.append(path)
            else:
                problems.append(f"{path} has a DoRA magnitude of shape {m}, not one per output ([{b[0]}])")
    if no_magnitude:
        problems.insert(0, f"no DoRA magnitude (lora_magnitude_vector) for {few(no_magnitude)}, though its config "
                           "says use_dora")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; … {len(problems) - 4} more" if len(problems) > 4 else "")
        raise UserError(f"{weights} does not match its adapter_config.json: {shown}")


# A float is NaN or ±inf when its exponent bits are all ones: per dtype, (the element as an unsigned integer,
# those bits). Checked on the raw bytes with numpy, without torch (inspect answers fast).
_EXPONENT_BITS = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
                  "BF16": ("<u2", 0x7F80)}
_CHUNK_BYTES = 1 << 24


def _tensor_bytes(path: str | Path) -> bytes:
    """A safetensors file's data section (what its header's data_offsets index)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        return f.read()


def nonfinite_tensors(path: str | Path, header: dict[str, dict]) -> list[str]:
    """Names of the safetensors file's float tensors that hold a NaN or an inf (read in chunks: an adapter of
    GBs needs a few MB)."""
    import numpy as np

    broken = []
    buffer = bytearray(_CHUNK_BYTES)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # (reads forward)
            kind = _EXPONENT_BITS.get(info["dtype"])
            start, end = info["data_offsets"]
            if kind is None or end <= start:
                continue
            dtype, bits = np.dtype(kind[0]), kind[1]
            f.seek(8 + n + start)
            for first in range(start, end, _CHUNK_BYTES):
                got = f.readinto(memoryview(buffer)[: min(_CHUNK_BYTES, end - first)])
                x = np.frombuffer(buffer, dtype, got // dtype.itemsize)
                if ((x & bits) == bits).any():
                    broken.append(name)
                    break
    return sorted(broken)


def tied_copies(path: str | Path, header: dict[str, dict], config: AdapterConfig) -> set[str]:
    """The tensors PEFT's `ensure_weight_tying` saved a second time: a layer tied to a saved one (modules_to_save),
    under its own name, holding the same bytes."""
    if not config.ensure_weight_tying:
        return set()
    data = _tensor_bytes(path)

    def raw(name: str) -> bytes:
        start, end = header[name]["data_offsets"]
        return data[start:end]

    saved = [k for k in header if config.saves(k.removeprefix(KEY_PREFIX).rpartition(".")[0], within=True)]
    return {k for k in header if k not in saved and ".lora_" not in k
            and any(header[s]["shape"] == header[k]["shape"] and raw(s) == raw(k) for s in saved)}


def broken_adapter_error(weights: str | Path, broken: list[str]) -> UserError:
    return UserError(f"{weights}: {broken[0]}{f' and {len(broken) - 1} more hold' if len(broken) > 1 else ' holds'} "
                     "NaN or inf; the adapter is broken")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """({tensor name: {dtype, shape, data_offsets}}, metadata) from a safetensors file's header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000 or n > path.stat().st_size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    end = max((info["data_offsets"][1] for info in header.values() if isinstance(info, dict)), default=0)
    if 8 + n + end > path.stat().st_size:
        raise UserError(f"{path}: the file is truncated ({path.stat().st_size:,} bytes; its header says "
                        f"{8 + n + end:,}): it was cut short while written or copied")
    return header, meta
