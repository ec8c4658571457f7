"""The `lora` command line: registers the commands and turns user errors into one `error:` line.

Nothing heavy is imported here: `lora --help` must answer without importing torch.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys

import typer

from lora_cli.commands import algebra, export, generate, inspect, merge, train
from lora_cli.errors import UserError

app = typer.Typer(
    name="lora",
    help="Fine-tune Hugging Face causal language models with LoRA: train, merge, export, generate, inspect; "
         "combine, resize and extract adapters.",
    epilog="Errors are one line; --debug (with any command) or LORA_DEBUG=1 shows the traceback instead.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
for module in (train, merge, export, generate, inspect, algebra):
    module.register(app)


def _not_deepspeeds_cpu_notice(record: logging.LogRecord) -> bool:
    """Where DeepSpeed is installed, transformers' save_pretrained and Accelerate import it to check for its
    wrappers, and on a machine without a GPU it prints "Setting accelerator to CPU…" on stdout, where
    `lora generate` writes its text and `--dry-run` its YAML: nothing DeepSpeed does here needs a GPU."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


def main(argv: list[str] | None = None) -> None:
    """Entry point: `--debug` (anywhere) or LORA_DEBUG=1 shows tracebacks instead of one-line errors."""
    logging.getLogger("DeepSpeed").addFilter(_not_deepspeeds_cpu_notice)  # (added once: the same function)
    if sys.stdout.encoding and sys.stdout.encoding.lower().replace("-", "") != "utf8" \
            and hasattr(sys.stdout, "reconfigure"):  # (an ASCII terminal: é printed as \xe9, never a crash)
        sys.stdout.reconfigure(errors="backslashreplace")
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LORA_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    terminated: list[int] = []

    def on_sigterm(signum, frame):  # unwound as Ctrl-C is (temporary files removed), not killed where it stands
        terminated.append(signum)  # (and remembered, as Ctrl-C is: a library's clean-up may swallow the raise)
        on_sigterm.received = True
        raise KeyboardInterrupt

    def on_sigint(signum, frame):  # Python's own, remembered: raised inside a library's clean-up (a __del__ while
        on_sigint.received = True  # modules import), the KeyboardInterrupt is swallowed ("Exception ignored") and
        raise KeyboardInterrupt  # the run went on; training's loop reads the mark and stops at its first step

    on_sigint.received = on_sigterm.received = False
    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)  # (training's loop installs its own while it runs)
        previous_int = signal.signal(signal.SIGINT, on_sigint) \
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler else None  # (not where it is ignored)
    except ValueError:  # not the main thread
        previous = previous_int = None
    try:
        _run(args, debug, terminated)
    except SystemExit as e:
        if argv is None and e.code in (130, 128 + signal.SIGTERM) and _stuck_threads():
            # stopped, and a library's thread would keep the interpreter's exit waiting for it (a tokenizing
            _exit_now(e.code, clean_up=False)  # pool's, cut short): the user asked to stop, so stop
        if argv is None and one_of_several_processes():
            _exit_now(e.code)  # see one_of_several_processes
        raise
    except BaseException:  # --debug's traceback
        if argv is None and one_of_several_processes():
            import traceback

            traceback.print_exc()
            _exit_now(130 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def one_of_several_processes() -> bool:
    """Whether this process was launched as one of several (torchrun, `accelerate launch`). Such a process ends
    without the interpreter's clean-up: gloo's worker threads outlive `destroy_process_group` (only the group's
    destructor joins them) and release the last collective's tensors a moment after it completed, which takes
    the GIL; once the interpreter is finalizing, that ends the thread inside a C++ destructor: "terminate called
    without an active exception", SIGABRT, and torchrun failed a run that had finished and written everything
    (1 in 40 resumes on 2 CPU processes)."""
    size = os.environ.get("WORLD_SIZE", "1")
    return size.isdigit() and int(size) > 1


def _exit_now(code, clean_up: bool = True) -> None:
    """Exit with `code` as SystemExit would, with the output flushed (and the atexit functions run: logging's
    flush, temporary folders' removal), but without finalizing the interpreter."""
    import atexit
    import contextlib

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    if clean_up:
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # (a closed pipe)
            stream.flush()
    os._exit(code or 0)


def _stuck_threads(wait_s: float = 2.0) -> list:
    """The threads that the interpreter's exit would wait for and that do not end within `wait_s`."""
    import threading
    import time

    deadline = time.monotonic() + wait_s
    alive = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for t in alive:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    return [t for t in alive if t.is_alive()]


# options that name what a command reads or writes: given twice, click keeps the last one and drops the other
# without a word (`--data a.jsonl --data b.jsonl` trained on b only), so that is an error; a setting given twice
# (`--rank 8 … --rank 16`, a script's default overridden) keeps the last, as usual
ONCE = {"--data": "to train on several files, put them in one folder and give --data FOLDER: files named train* "
                  "(or in a train/ subfolder) form its train split, as datasets reads a folder",
        "--eval-data": "put the eval files in one folder and give --eval-data FOLDER",
        "--model": "", "--base": "", "--tuned": "", "--output": "", "--config": "", "--chat-template": "",
        "--prompt": "to ask several prompts, write them to a file, one per line, and give --prompt-file FILE",
        "--prompt-file": "put the prompts in one file"}


def check_given_once(command, args: list[str]) -> None:
    """UserError for an option of ONCE given more than once to the subcommand in `args` (its long or short form,
    `--opt value` or `--opt=value`). (`command` is typer's click Group: typer carries its own click.)"""
    sub = command.commands.get(next((a for a in args if not a.startswith("-")), ""))
    if sub is None:
        return
    args = args[: args.index("--")] if "--" in args else args
    for param in sub.params:
        names = param.opts + param.secondary_opts if param.param_type_name == "option" else []
        flag = next((n for n in names if n in ONCE), None)
        if flag is None or param.multiple:
            continue
        given = [a for a in args if a in names or a.startswith(tuple(f"{n}=" for n in names if n.startswith("--")))]
        if len(given) > 1:
            hint = ONCE[flag]
            raise UserError(f"{flag} is given {len(given)} times, and only one is used; give it once"
                            + (f"; {hint}" if hint else ""))


def _run(args: list[str], debug: bool, terminated: list[int]) -> None:
    try:
        if isinstance(app, typer.Typer):  # (tests put a function in its place)
            check_given_once(typer.main.get_command(app), args)  # (3 ms)
        app(args=args, prog_name="lora", standalone_mode=True)
    except UserError as e:
        if debug:
            raise
        if e.shared and os.environ.get("RANK", "0") != "0":
            raise SystemExit(e.exit_code) from None
        _fail(str(e), code=e.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        _fail(*stopped(terminated))
    except SystemExit as e:  # typer turns Ctrl-C into a silent exit 130
        if e.code == 130 and not debug:
            _fail(*stopped(terminated))
        raise
    except MemoryError:
        if debug:
            raise
        _fail("out of memory; try a smaller --batch-size or --max-length, or --gradient-checkpointing")
    except Exception as e:  # a bug, not a user mistake: still one line, with the way to see more
        if debug:
            raise
        if isinstance(e, OSError) and e.strerror:  # the file system said no: a missing or read-only folder,
            _fail(f"{e.strerror}: {e.filename}" if e.filename else e.strerror)  # a full disk, permissions
        rank = os.environ.get("RANK", "0")
        if "RANK" in os.environ and any(m in str(e) for m in ("Connection closed by peer", "Connection reset by peer")):
            _fail(f"process {rank} stopped: another process of this run ended first (its error says why)")
        if "out of memory" in str(e).lower():
            _fail("out of memory; try a smaller --batch-size or --max-length, or --gradient-checkpointing")
        if any(m in str(e) for m in ("o space left on device", "unexpected pos", "basic_ios::clear")) \
                or re.search(r"\d+ requested and \d+ written", str(e)):
            # the OS's, safetensors', torch.save's and numpy's (GGUF) words for a write that failed (a full disk)
            _fail("no space left on device: a file could not be written whole (nothing half-written was kept)")
        _fail(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")


def stopped(terminated: list[int]) -> tuple[str, int]:
    """The message and exit code of a run stopped by Ctrl-C or by SIGTERM (128 + N, as a shell reports it)."""
    if not terminated:
        return "interrupted", 130
    size = os.environ.get("WORLD_SIZE", "1")
    if size.isdigit() and int(size) > 1:  # torchrun's SIGTERM, after another process failed
        return (f"process {os.environ.get('RANK', '?')} terminated: the launcher ends every process of a run when one "
                "of them fails (its error says why) or when it is stopped", 128 + terminated[0])
    return "terminated", 128 + terminated[0]


def _fail(message: str, code: int = 1) -> None:
    message = " ".join(message.split("\n"))
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
