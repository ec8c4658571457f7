"""`lora generate`: try a model, with or without adapters (switched in place on one base load)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

# characters JSON leaves raw that end a line for str.splitlines (and U+2028/9 for JavaScript before ES2019)
LINE_BREAKS_ESCAPED = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


def generate_command(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, local directory, or .gguf file."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Version of a Hub --model: a branch, tag or "
                                           "commit [default: the default branch]."),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help="Adapter directory; repeat to "
                                                "compare several on one base load."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt."),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", help="A file of prompts, one per line."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message (chat models)."),
    no_chat: bool = typer.Option(False, "--no-chat", help="Send the prompt as raw text, without the chat template."),
    compare: bool = typer.Option(False, "--compare", help="Also answer with the base model, side by side."),
    json_lines: bool = typer.Option(False, "--json", help="Write each answer to stdout as a JSON line "
                                    '({"model", "prompt", "answer"}) instead of streaming the text.'),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Maximum tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold (with --temperature > 0)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample from the k likeliest tokens (with --temperature "
                                        "> 0); 0 = all [default: the model's generation config, else 50, as in "
                                        "transformers]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed: each answer draws from it afresh (with "
                                       "--temperature > 0) [default: 0]."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model's own Python code "
                                           "(models that need it): only from sources you trust."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow the model's pickled weights (*.bin, "
                                      "*.pt): only from sources you trust. (Adapters are read as safetensors only.)"),
) -> None:
    """Generate an answer (streamed), with the chat template when the model has one."""
    import math

    from lora_cli.commands.common import dtype_name
    from lora_cli.errors import UserError, lines, read_text

    adapters = adapter or []
    for flag, text in (("--prompt", prompt), ("--system", system)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError:  # (argv bytes that are not UTF-8 arrive as lone surrogates)
            raise UserError(f"{flag} is not UTF-8 text (bytes in another encoding?); give it as UTF-8") from None
    prompts = [prompt] if prompt else []
    if prompt_file:
        from_file = [line for line in lines(read_text(prompt_file, f"--prompt-file {prompt_file!r}"))
                     if line.strip()]
        if not from_file:
            raise UserError(f"--prompt-file {prompt_file!r} holds no prompts (one per line)")
        prompts += from_file
    if prompt is not None and not prompt.strip():
        raise UserError("--prompt is empty")
    if not prompts:
        raise UserError("give --prompt TEXT or --prompt-file FILE")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if not (temperature >= 0 and math.isfinite(temperature)) or not 0 < top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
    if top_k is not None and top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = all tokens), got {top_k}")
    given = [f for f, on in (("--top-p", top_p < 1), ("--top-k", top_k is not None), ("--seed", seed is not None))
             if on]
    if given and temperature == 0:
        raise UserError(f"{', '.join(given[:-1])}{' and ' if len(given) > 1 else ''}{given[-1]} "
                        f"{'are' if len(given) > 1 else 'is'} for sampling, and --temperature 0 decodes greedily: "
                        "give --temperature > 0 too")
    if compare and not adapters:
        raise UserError("--compare answers with the base model beside each --adapter: give one (without an adapter "
                        "the base model answers alone anyway)")
    if system is not None and no_chat:
        raise UserError("--system is a chat turn and --no-chat sends raw text: drop one of them")
    from lora_cli.lora.peft_format import adapter_files

    for a in adapters:
        adapter_files(a)  # a missing adapter fails before the model loads
    twice = next((a for i, a in enumerate(adapters) if Path(a).resolve() in {Path(b).resolve() for b in adapters[:i]}),
                 None)
    if twice:
        raise UserError(f"--adapter {twice} is given twice")
    dtype = dtype_name(dtype, ("auto", "float32", "bfloat16", "float16"))
    seed = 0 if seed is None else seed
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32) (got {seed})")
    _run(model, adapters, prompts, system, no_chat, compare, max_new_tokens, temperature, top_p, top_k, seed, dtype,
         trust_remote_code, allow_pickle, json_lines, revision)


def _run(model_ref, adapters, prompts, system, no_chat, compare, max_new_tokens, temperature, top_p, top_k, seed, dtype,
         trust_remote_code, allow_pickle, json_lines=False, revision=None) -> None:
    import json
    import sys
    import time

    import torch
    from rich.table import Table
    from rich.text import Text

    from lora_cli.display import stderr_console
    from lora_cli.generation import (
        answer_streamer,
        chat_template_for,
        fit_new_tokens,
        generate,
        prompt_ids,
        stop_ids,
    )
    from lora_cli.lora.adapter import check_adapter_fits, load_adapter, read_adapter
    from lora_cli.lora.inject import unload_lora
    from lora_cli.models import (
        check_token_ids,
        load_model,
        load_tokenizer,
        other_architecture,
        resolve_model,
        same_commit,
        torch_dtype,
    )

    console = stderr_console()
    source = resolve_model(model_ref, allow_pickle, revision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(source, trust_remote_code, status=console.print)
    model = load_model(source, torch_dtype(dtype, device), trust_remote_code, allow_pickle,
                       status=console.print).to(device).eval()
    read = {a: read_adapter(a) for a in adapters}
    for a, (config, tensors) in read.items():  # each one fits, before any answer is generated
        check_adapter_fits(model, config, tensors, a)
        warning = other_architecture(config.base_model_name_or_path, model.config.model_type, "--model", "loads")
        if warning:
            console.print(warning)
        if config.revision and config.base_model_name_or_path == source.ref and config.revision != source.revision \
                and not same_commit(source.ref, config.revision, source.revision):
            console.print(f"note: {a} was trained on revision {config.revision!r} of {source.ref}, loaded here at "
                          + (repr(source.revision) if source.revision else "its default branch")
                          + f" (--revision {config.revision} loads that one)")
    variants = ([None] if compare or not adapters else []) + adapters
    template = {a: None if no_chat else chat_template_for(tok, [a]) for a in adapters}  # each as its run trained
    kinds = set(template.values())
    if len(kinds) > 1:
        console.print("note: the adapters were trained with different chat templates; each is prompted with its "
                      "own" + (", the base with the tokenizer's" if None in variants else ""))
    template[None] = None if no_chat else kinds.pop() if len(kinds) == 1 else chat_template_for(tok, [])
    encodings = {t: [prompt_ids(tok, p, t, system) for p in prompts] for t in {template[v] for v in variants}}
    stops = {t: stop_ids(model, tok, t) for t in encodings}  # EOS and each template's end of turn
    check_token_ids(model, tok, max(int(ids.max()) if ids.numel() else -1 for e in encodings.values() for ids in e))
    answers: dict[str, list[str]] = {}
    base_label = "base"
    while base_label in adapters:  # (an adapter folder named base)
        base_label = f"({base_label})"
    for variant in variants:
        t0 = time.perf_counter()
        unload_lora(model)
        if variant:
            load_adapter(model, variant, read=read[variant])
            model.to(device)
        label = variant or base_label
        switch = f" (loaded in {time.perf_counter() - t0:.2f} s)" if variant else ""
        answers[label] = []
        for p, ids in zip(prompts, encodings[template[variant]]):
            console.print(Text.assemble((label, "bold cyan"), f"{switch} ▸ {p}"))
            streamer = None if json_lines else answer_streamer(tok)
            ids = ids.to(device)
            n_new = fit_new_tokens(model, ids, max_new_tokens, console.print)
            answers[label].append(generate(model, tok, ids, n_new, temperature, top_p, streamer, seed, top_k,
                                           stops[template[variant]]))
            if json_lines:  # one line per answer: scripts can tell answers apart (streamed text runs together)
                row = json.dumps({"model": label, "prompt": p, "answer": answers[label][-1]}, ensure_ascii=False)
                print(row.translate(LINE_BREAKS_ESCAPED))  # (str.splitlines would split at them)
            sys.stdout.flush()
    if len(variants) > 1:
        table = Table(title="answers", show_lines=True)
        table.add_column("prompt")
        for label in answers:
            table.add_column(label)
        for i, p in enumerate(prompts):
            table.add_row(p, *(answers[label][i].strip() for label in answers))
        console.print(table, width=None if console.is_terminal else 160)  # (answers wrap in a log too)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
