"""Generating text with a base model, optionally with one or more adapters switched in place."""

from __future__ import annotations

import torch

from lora_cli.errors import UserError


def chat_template_for(tokenizer, adapter_dirs: list[str]) -> str | None:
    """The template to prompt with: the one a run trained with (its chat_template.jinja: --chat-template, or
    our built-in one for a tokenizer without any), else the tokenizer's. None means raw text."""
    from lora_cli.config import run_chat_template

    for a in adapter_dirs:
        t = run_chat_template(a)
        if t:
            return t
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.get_chat_template()  # the "default" one of a tokenizer with named templates
    return None


def prompt_ids(tokenizer, prompt: str, template: str | None, system: str | None = None) -> torch.Tensor:
    if template is None:
        if system is not None:
            raise UserError("--system needs a chat template, and this model has none (prompts go as raw text)")
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # a template's own raise_exception(): Gemma's refuses a system turn
        hint = "; try without --system" if system else "; --no-chat sends the prompt as raw text"
        raise UserError(f"the chat template cannot render this prompt: {type(e).__name__}: {e}{hint}") from None
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def stop_ids(model, tokenizer, template: str | None = None) -> list[int]:
    """EOS of the tokenizer and of the generation config, and the chat template's end-of-turn token: training
    puts the loss on it (Llama 3's <|eot_id|>), while a config may list only <|end_of_text|> as EOS."""
    ids = set(turn_end_ids(tokenizer, template))
    for x in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(x, int):
            ids.add(x)
        elif isinstance(x, list):
            ids.update(i for i in x if isinstance(i, int))
    return sorted(ids)


def turn_end_ids(tokenizer, template: str | None) -> list[int]:
    """The special token that closes an assistant turn in `template` ([] when the text after one starts with
    plain text, or the template cannot render a short chat)."""
    if template is None:
        return []
    marker = "\u2063lora-turn-end\u2063"  # (text no template adds)
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                             chat_template=template, tokenize=False)
    except Exception:  # noqa: BLE001 - a template's own raise_exception(); then EOS alone stops
        return []
    after = text.split(marker, 1)[1] if marker in text else ""
    first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
    added = getattr(tokenizer, "added_tokens_decoder", {})  # (Llama 3's <|eot_id|> is special only there)
    special = first and (first[0] in tokenizer.all_special_ids or getattr(added.get(first[0]), "special", False))
    return first if special else []


def fit_new_tokens(model, ids: torch.Tensor, max_new_tokens: int, say) -> int:
    """--max-new-tokens, lowered (with a note) so prompt + answer stay within the model's context: past it a
    model with learned positions (GPT-2, OPT) has no position to give the next token."""
    from lora_cli.models import context_length

    ctx = context_length(model.config)
    if ctx is None or ids.shape[1] + max_new_tokens <= ctx:
        return max_new_tokens
    if ids.shape[1] >= ctx:
        raise UserError(f"the prompt is {ids.shape[1]} tokens and fills the model's context of {ctx}; shorten it")
    say(f"note: --max-new-tokens {max_new_tokens} → {ctx - ids.shape[1]}: the prompt's {ids.shape[1]} tokens "
        f"and the answer fill the model's context of {ctx}")
    return ctx - ids.shape[1]


def generate(model, tokenizer, ids: torch.Tensor, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, streamer=None, seed: int = 0, top_k: int | None = None,
             stop: list[int] | None = None) -> str:
    """Greedy unless temperature > 0 (then sampled from `seed`, so every model and prompt draws from the
    same stream); stops at `stop` (stop_ids: EOS and the chat template's end of turn). Returns the new text."""
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop if stop is not None else stop_ids(model, tokenizer),
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p,
                      **({"top_k": top_k} if top_k is not None else {}))  # else the generation config's (50)
        torch.manual_seed(seed)  # transformers samples from the global generator
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).rstrip(CUT_CHARACTER)


CUT_CHARACTER = "\ufffd"  # what decoding makes of a character whose last bytes' tokens the length limit cut off


def answer_streamer(tokenizer):
    """Prints the answer as it is generated, as generate() returns it: without a character cut off at its end."""
    from transformers import TextStreamer

    class AnswerStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            super().on_finalized_text(text.rstrip(CUT_CHARACTER) if stream_end else text, stream_end)

    return AnswerStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def answer_batch(model, tokenizer, prompts: list[str], template: str | None, max_new_tokens: int = 48,
                 batch_size: int = 8) -> list[str]:
    """Greedy answers to many prompts, batched with left padding."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers, stop = [], stop_ids(model, tokenizer, template)
    try:
        for i in range(0, len(prompts), batch_size):
            seqs = [prompt_ids(tokenizer, p, template)[0].tolist() for p in prompts[i : i + batch_size]]
            width = max(map(len, seqs))
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                     max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, eos_token_id=stop, pad_token_id=pad)
            answers += [tokenizer.decode(o[width:], skip_special_tokens=True).rstrip(CUT_CHARACTER).strip() for o in out]
    finally:
        tokenizer.padding_side = old_side
    return answers


def exact_match(model, tokenizer, records: list[dict], template: str | None) -> tuple[float, list[str]]:
    """Share of chat records whose last assistant turn the model reproduces exactly (greedy)."""
    prompts = [r["messages"][0]["content"] for r in records]
    refs = [r["messages"][-1]["content"].strip() for r in records]
    answers = answer_batch(model, tokenizer, prompts, template)
    return sum(a == r for a, r in zip(answers, refs)) / len(refs), answers
