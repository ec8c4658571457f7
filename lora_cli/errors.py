"""The user-error type and the atomic-write helpers every command uses."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix. The CLI prints it as one `error: …` line and exits 1 (or `exit_code`)."""

    def __init__(self, message: str, exit_code: int = 1, shared: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.shared = shared  # every process of a distributed run raises it at once: only the main one says it

    def __reduce__(self):  # raised in a worker process, it arrives whole
        return type(self), (str(self), self.exit_code, self.shared)


def read_text(path: str | os.PathLike, what: str | None = None, data: bytes | None = None) -> str:
    """A text file the user gave, as UTF-8 (a leading BOM dropped); anything else is one clear error.
    `what` names it in messages (default: the path); `data`, its bytes once decompressed."""
    p = Path(path)
    what = what or str(p)
    if p.is_dir():
        raise UserError(f"{what} is a folder, not a file")
    if not p.is_file():
        raise UserError(f"{what} does not exist")
    data = p.read_bytes() if data is None else data
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise UserError(f"{what} is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}, perhaps Latin-1 or "
                        "Windows-1252); save it as UTF-8") from None


def read_json_object(path: str | os.PathLike, what: str | None = None) -> dict:
    """A JSON file that must hold an object (a config, an index), or one error naming it and what is wrong."""
    import json

    text = read_text(path, what)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what or path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(d, dict):
        raise UserError(f"{what or path}: expected a JSON object, got {type(d).__name__}")
    return d


def lines(text: str) -> list[str]:
    """The lines of a text: split at line feeds (LF, CRLF, CR) only. str.splitlines() also splits at U+2028,
    U+2029, U+0085 and other characters that JSON strings and prose hold as they are."""
    return re.split(r"\r\n|\r|\n", text)


def few(names: list[str], most: int = 3) -> str:
    """The first `most` names of a list for a message, and how many more there are."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check(problems: list[str], what: str) -> None:
    """Raise one UserError listing every problem, or return if there are none."""
    if problems:
        raise UserError(f"{what}: " + "; ".join(problems))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.

    The file appears complete or not at all: a crash or an exception leaves the old file (if any) intact.
    """
    path = Path(path)
    with creating(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and safetensors, which recreates the file) make it private: give the mode open() would
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success rename it onto `path` (replacing an old one)."""
    path = Path(path)
    with creating(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(path.parent, path.name)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the folder gets the mode mkdir() would give
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(mode)  # safetensors writes its files private
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            _rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        _rmtree(tmp)


def _owner() -> str:
    """This process, as temp names carry it: host and pid."""
    import socket

    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_owner()}."


def sweep_stale_temps(folder: Path, name: str = "*") -> None:
    """Remove the temp files and folders that a killed process of this host left in `folder` while writing
    `name` (all names by default): a kill -9 or a power cut skips every cleanup, and a merge's are GBs."""
    host = _owner().rsplit("-", 1)[0]
    for p in folder.glob(f".{glob.escape(name) if name != '*' else '*'}.*.tmp"):
        rest = p.name[1:-len(".tmp")]  # NAME.HOST-PID.RANDOM; NAME may hold dots, HOST has none
        owner = rest.rsplit(".", 2)[-2] if rest.count(".") >= 2 else ""
        h, _, pid = owner.rpartition("-")
        if h == host and pid.isdigit() and not _alive(int(pid)):
            if p.is_dir():
                _rmtree(p)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# Every weights file lora writes says so (safetensors metadata, a GGUF key): --force replaces only what carries it
# (a downloaded model or another tool's adapter holds the same file names).
MARK = "lora_cli.version"


def mark() -> dict[str, str]:
    from lora_cli import __version__

    return {MARK: __version__}


# What lora's outputs hold (a run, an adapter, a merged model): --force replaces a folder of only these.
OWN_NAMES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "*.jinja", "train_config.yaml",
             "metrics.jsonl", "train_summary.json", "loss.png", "checkpoints", "config.json",
             "generation_config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer*",
             "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", ".lock", ".*.tmp", ".*.old")


def check_output(path: str | os.PathLike, force: bool, flag: str = "--output", file: tuple[bytes, str] | None = None,
                 reads: tuple = (), ours=None):
    """Raise unless we may write `path`: it is absent, or --force was given and it is something we wrote. A run
    folder's lock is returned held: the caller keeps it until the folder is replaced (no run starts there).

    --force never deletes what lora did not make: not a folder holding other files or weights without lora's
    mark (a downloaded model), not a plain file where a folder goes, not the current folder or one that holds
    it, not what this command reads (`reads`: the adapter, the base). `file`: the output is one file, whose kind
    ((its first bytes, a name for it)) an existing file must be, and which `ours(path)` must say lora wrote."""
    import fnmatch

    path = Path(path)
    if not path.exists():
        return
    if path.is_dir() and file:  # (--force would not help)
        raise UserError(f"{flag} {path} is a folder; name the file to write")
    if not force:
        raise UserError(f"{flag} {path} exists; pass --force to overwrite it")
    out = path.resolve()
    for r in reads:
        if r and Path(r).expanduser().exists() and out in (q := Path(r).expanduser().resolve(), *q.parents):
            raise UserError(f"{flag} {path} is {r} or holds it, which this command reads; choose another {flag}")
    if not path.is_dir():
        if not file:
            raise UserError(f"{flag} {path} is a file, and a folder goes there; --force will not replace it")
        with open(path, "rb") as f:
            if f.read(len(file[0])) != file[0]:
                raise UserError(f"{flag} {path} is not {file[1]}; --force replaces only lora's own output: "
                                "choose another file name")
        if ours is not None and not ours(path):
            raise UserError(f"{flag} {path} is {file[1]} lora did not write; --force replaces only lora's own "
                            "output: choose another file name")
        return
    here = Path.cwd().resolve()
    if out in (here, *here.parents):
        raise UserError(f"{flag} {path} is the current folder or holds it; --force will not replace it")
    held = _hold_run_lock(path)
    if held is False:
        raise UserError(f"{flag} {path} is a run still training (a lora train holds it); --force will not replace "
                        f"it: choose another {flag}")
    foreign = [p.name for p in path.iterdir() if not any(fnmatch.fnmatch(p.name, n) for n in OWN_NAMES)]
    if not foreign:
        foreign = _unmarked_weights(path)
    if foreign:
        raise UserError(f"{flag} {path} is a folder lora did not write (it holds {foreign[0]}); --force replaces "
                        "only lora's own output (a run, an adapter, a merged model): choose a new or empty folder")
    return held


def _hold_run_lock(folder: Path):
    """A run folder's lock, taken (the open file: held while the caller keeps it, so that no `lora train` starts
    in the folder this command is replacing), False where a `lora train` holds it, None for another folder."""
    return _flocked(folder / ".lock", "a+") if (folder / "train_config.yaml").is_file() else None


def training_now(run_dir: Path) -> bool:
    """Whether a `lora train` holds the run directory's lock at this moment."""
    try:
        fh = _flocked(run_dir / ".lock", "rb")
    except OSError:  # no lock file: never a run, or one that has not started
        return False
    if fh:
        fh.close()
    return fh is False


def _flocked(lock: Path, mode: str):
    """`lock` opened in `mode` and locked, without waiting (exclusively where it may be created, "a+"): the open
    file, or False where another process holds it."""
    import fcntl

    fh = open(lock, mode)  # noqa: SIM115 - returned open: the lock lasts while it is
    try:
        fcntl.flock(fh.fileno(), (fcntl.LOCK_EX if "+" in mode else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return False
    return fh


def _unmarked_weights(folder: Path) -> list[str]:
    """What in a folder of lora's file names says lora did not write it: weights without lora's mark, or, where
    there are no weights, any visible file (a model's config and tokenizer alone). A run is known by its
    train_config.yaml; an empty folder or one of leftovers (.lock, temporary files) is nobody's."""
    from lora_cli.lora.peft_format import read_safetensors_header

    visible = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not visible or (folder / "train_config.yaml").is_file():
        return []
    weights = [p for p in visible if p.suffix == ".safetensors"]
    unmarked = []
    for w in weights:
        try:
            if MARK not in read_safetensors_header(w)[1]:
                unmarked.append(w.name)
        except UserError:  # unreadable: not known to be ours
            unmarked.append(w.name)
    return unmarked if weights else [visible[0].name]


def cast_finite(t, dtype, what: str):
    """`t` (a torch tensor) in `dtype`, or a clear error where its values do not fit there (float16 ends at
    65504: larger values become inf, and a file of them is broken)."""
    out = t.to(dtype)
    if out.is_floating_point() and not out.isfinite().all() and t.isfinite().all():
        name = str(dtype).replace("torch.", "")
        raise UserError(f"{what} holds values up to {t.abs().max().item():.3g}, beyond {name}'s range: nothing was "
                        "written; use --dtype bfloat16 or float32")
    return out


@contextlib.contextmanager
def creating(path: Path) -> Iterator[None]:
    """Name the user's path, not our temporary one, when the file system refuses to create it."""
    try:
        yield
    except OSError as e:
        blocking = next((a for a in path.parents if a.exists() and not a.is_dir()), None)
        reason = f"{blocking} is a file, not a folder" if blocking else e.strerror or e
        raise UserError(f"cannot write {path}: {reason}") from None


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
