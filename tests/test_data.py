"""Records → ids + labels, checked token by token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_tokenizer

from lora_cli.data import IGNORE, Encoder, collate, pack, record_shape
from lora_cli.errors import UserError


def labelled_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE])


def masked_text(tok, ex):
    return tok.decode([i for i, t in zip(ex.input_ids, ex.labels) if t == IGNORE])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def encode(enc, recs):
    return enc.encode_all(recs)


def test_chatml_assistant_turns_and_end_of_turn_are_labelled(tok):
    enc = Encoder(tok, 512)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "Paris is red"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "Berlin is blue"}]
    (ex,), stats = enc.encode_all([{"messages": msgs}])
    assert labelled_text(tok, ex) == "Paris is red<|im_end|>\nBerlin is blue<|im_end|>\n"
    assert "hello" in masked_text(tok, ex) and "Be brief." in masked_text(tok, ex)
    # every label equals its input id (the model shifts internally)
    assert all(lab in (IGNORE, i) for i, lab in zip(ex.input_ids, ex.labels))
    # the end-of-turn token is pad too: it still carries the loss
    assert tok.pad_token_id == tok.eos_token_id and tok.eos_token_id in ex.labels
    assert ex.input_ids.tolist() == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]


def test_a_turn_of_weight_0_carries_no_loss(tok, tmp_path):
    """OpenAI's fine-tuning format: `"weight": 0` on an assistant turn keeps it as context only, in either
    turn style, read from a file (where the loader gives unweighted turns weight None)."""
    import json

    from lora_cli.data import load_records

    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Paris is red", "weight": 0},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Berlin is blue", "weight": 1}]
    sharegpt = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "Paris is red", "weight": 0},
                {"from": "human", "value": "and?"}, {"from": "gpt", "value": "Berlin is blue"}]
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Rome is green"}]}) + "\n")
    records, _ = load_records(str(tmp_path / "d.jsonl"))
    (ex, plain), _ = Encoder(tok, 512).encode_all(records)
    assert labelled_text(tok, ex) == "Berlin is blue<|im_end|>\n"
    assert "Paris is red" in masked_text(tok, ex) and "weight" not in tok.decode(ex.input_ids)
    assert labelled_text(tok, plain) == "Rome is green<|im_end|>\n"
    (ex,), _ = Encoder(tok, 512).encode_all([{"conversations": sharegpt}])
    assert labelled_text(tok, ex) == "Berlin is blue<|im_end|>\n"
    none = [dict(m, weight=0) if m["role"] == "assistant" else m for m in msgs]  # nothing left to learn
    with pytest.raises(UserError, match="no record has a token to learn from"):
        Encoder(tok, 512).encode_all([{"messages": none}])
    with pytest.raises(UserError, match="record 1: messages turn 2 has weight 0.5; a turn's weight is 0"):
        Encoder(tok, 512).encode_all([{"messages": [msgs[0], dict(msgs[1], weight=0.5)]}])


def test_prompt_completion_uses_the_template(tok):
    (ex,), _ = Encoder(tok, 512).encode_all([{"prompt": "hello", "completion": "world", "id": 7}])
    assert labelled_text(tok, ex) == "world<|im_end|>\n"
    assert masked_text(tok, ex) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_completion_without_template_is_plain_concatenation():
    tok = tiny_tokenizer(chat_template=None)
    (ex,), _ = Encoder(tok, 512).encode_all([{"prompt": "Question: hello", "completion": " world"}])
    assert labelled_text(tok, ex) == " world<|im_end|>"
    assert tok.decode(ex.input_ids) == "Question: hello world<|im_end|>"


def test_messages_without_template_use_the_builtin_one():
    tok = tiny_tokenizer(chat_template=None)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    (ex,), _ = Encoder(tok, 512).encode_all([{"messages": msgs}])
    assert tok.decode(ex.input_ids) == "User: hello<|im_end|>\nAssistant: world<|im_end|>\n"
    assert labelled_text(tok, ex) == " world<|im_end|>\n"


def test_the_builtin_template_starts_with_bos_where_the_tokenizer_adds_one():
    """A Llama-style base (BOS before every text) got BOS on text and prompt/completion records but not on chat
    records rendered with the built-in template; the template (saved with the run) now starts with it."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer(chat_template=None)
    bos = tok.bos_token
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    enc = Encoder(tok, 512)
    (chat,), stats = enc.encode_all([{"messages": msgs}])
    (text,), _ = enc.encode_all([{"text": "hello world"}])
    assert chat.input_ids[0] == text.input_ids[0] == tok.bos_token_id and chat.labels[0] == -100
    assert chat.input_ids.tolist().count(tok.bos_token_id) == 1 and stats.template.startswith("{{ bos_token }}")
    assert labelled_text(tok, chat) == " world<|im_end|>\n"


def test_token_straddling_the_prompt_boundary_is_labelled(tok):
    # a generation prompt ending in a space: the token " w…" starts in the prompt but predicts the answer
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    (ex,), _ = Encoder(tok, 512, chat_template=template).encode_all([{"messages": msgs}])
    assert labelled_text(tok, ex).endswith("world<|im_end|>") and "hello" not in labelled_text(tok, ex)


def test_train_on_prompt_labels_everything(tok):
    (ex,), _ = Encoder(tok, 512, train_on_prompt=True).encode_all([{"prompt": "hi", "completion": "yes"}])
    assert ex.labels.tolist() == ex.input_ids.tolist()


def test_text_gets_eos_and_long_text_is_chunked(tok):
    enc = Encoder(tok, 8)
    text = "the quick brown fox jumps over the lazy dog " * 3
    exs, stats = enc.encode_all([{"text": text}])
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    # each chunk after the first starts with the last token of the one before (its context, not learned)
    assert exs[0].input_ids.tolist() + [t for e in exs[1:] for t in e.input_ids[1:].tolist()] == ids
    assert all(a.input_ids[-1] == b.input_ids[0] for a, b in zip(exs, exs[1:]))
    assert all(len(e.input_ids) <= 8 for e in exs) and stats.chunked == 1
    assert all(e.labels.tolist() == e.input_ids.tolist() for e in exs)
    assert sum(e.n_loss for e in exs) == len(ids) - 1  # every token but the first is predicted once
    # an EOS that would have been left alone in a last chunk (nothing to predict it from) is learned too
    for n in range(1, 30):
        ids = tok(" ".join(["dog"] * n))["input_ids"] + [tok.eos_token_id]
        exs, stats = enc.encode_all([{"text": " ".join(["dog"] * n)}])
        assert sum(e.n_loss for e in exs) == len(ids) - 1 and stats.dropped_no_loss == 0, n


def test_alpaca_and_sharegpt(tok):
    (a,), s = Encoder(tok, 512).encode_all([{"instruction": "Name a color", "input": "red or blue", "output": "red"}])
    assert s.shape == "alpaca" and labelled_text(tok, a) == "red<|im_end|>\n"
    assert "Name a color\n\nred or blue" in masked_text(tok, a)
    conv = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello"}]}
    (b,), s = Encoder(tok, 512).encode_all([conv])
    assert s.shape == "sharegpt" and labelled_text(tok, b) == "hello<|im_end|>\n"


def test_alpaca_history_is_the_earlier_turns(tok):
    """LLaMA-Factory's alpaca `history`: earlier [user, assistant] pairs, rendered (and learned) as the turns of
    a conversation are."""
    rec = {"instruction": "and now?", "input": "", "output": "blue", "history": [["first?", "red"], ["then?", "green"]]}
    (a,), _ = Encoder(tok, 512).encode_all([rec])
    turns = [{"role": "user", "content": "first?"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "then?"}, {"role": "assistant", "content": "green"},
             {"role": "user", "content": "and now?"}, {"role": "assistant", "content": "blue"}]
    (b,), _ = Encoder(tok, 512).encode_all([{"messages": turns}])
    assert (a.input_ids.tolist(), a.labels.tolist()) == (b.input_ids.tolist(), b.labels.tolist())
    assert labelled_text(tok, a) == "red<|im_end|>\ngreen<|im_end|>\nblue<|im_end|>\n"
    with pytest.raises(UserError, match="record 1: history must be a list of \\[user, assistant\\] pairs"):
        Encoder(tok, 512).encode_all([{**rec, "history": ["first?", "red"]}])


def test_empty_texts_are_dropped_whatever_the_tokenizer(tok):
    """wikitext has blank rows: with a tokenizer that puts BOS first they became BOS → EOS, one loss token
    teaching that a document is empty; without BOS they were dropped. Dropped and counted either way."""
    from tokenizers.processors import TemplateProcessing

    bos = tiny_tokenizer(chat_template=None)
    bos._tokenizer.post_processor = TemplateProcessing(single=f"{bos.bos_token} $A",
                                                       special_tokens=[(bos.bos_token, bos.bos_token_id)])
    for t in (tok, bos):
        exs, stats = Encoder(t, 512).encode_all([{"text": "hello world"}, {"text": ""}, {"text": "  \n "}])
        assert len(exs) == 1 and stats.dropped_no_loss == 2


def test_truncation_drops_records_without_loss_and_counts_them(tok):
    long_prompt = "word " * 200
    recs = [{"prompt": long_prompt, "completion": "yes"}, {"prompt": "hi", "completion": "yes"}]
    exs, stats = Encoder(tok, 32).encode_all(recs)
    assert len(exs) == 1 and stats.dropped_no_loss == 1 and stats.truncated == 1
    with pytest.raises(UserError, match="no record has a token to learn"):
        Encoder(tok, 32).encode_all(recs[:1])


def test_records_without_an_answer_are_named_as_such(tok):
    """Chat records with only a user turn: the error blamed emptiness or --max-length, not the missing answer."""
    asked = [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(4)]
    with pytest.raises(UserError, match=r"no record has a token to learn from: 4 of 4 records have no assistant "
                                        r"turn to learn \(none, or only turns of weight 0; .*--train-on-prompt to "
                                        r"learn every token\)$"):
        Encoder(tok, 512).encode_all(asked)
    cut = [{"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "yo"}]}] * 3
    with pytest.raises(UserError, match=r": 2 of 5 records have no assistant turn to learn .*\), and 3 sequences "
                                        r"dropped: empty, or every answer token cut by --max-length 16$"):
        Encoder(tok, 16).encode_all(asked[:2] + cut)  # both reasons named, not only the missing answers
    answered = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    exs, stats = Encoder(tok, 512).encode_all(asked + answered)
    assert len(exs) == 1 and stats.dropped_no_loss == 4 and stats.no_answer == 4
    exs, stats = Encoder(tok, 512, train_on_prompt=True).encode_all(asked)  # every token learned
    assert len(exs) == 4 and stats.no_answer == 0


def test_examples_hold_8_bytes_a_token(tok):
    """Token ids and labels are int32 arrays of their own: a truncated or chunked record keeps no view of the
    longer sequence it was cut from (the whole record would stay in memory)."""
    recs = [{"messages": [{"role": "user", "content": "word " * 3}, {"role": "assistant", "content": "yes " * 80}]},
            {"prompt": "hi", "completion": "yes " * 80}]
    chats, stats = Encoder(tok, 32).encode_all(recs[:1])
    pairs, _ = Encoder(tok, 32).encode_all(recs[1:])
    texts, _ = Encoder(tok, 32).encode_all([{"text": "word " * 80}])
    exs = chats + pairs + texts + pack(texts, 64)
    assert stats.truncated == 1 and len(texts) > 2
    for e in exs:
        arrays = [a for a in (e.input_ids, e.labels, e.position_ids, e.segments) if a is not None]
        assert all(a.dtype == np.int32 and a.base is None for a in arrays)
        assert sum(a.nbytes for a in arrays) == 4 * len(arrays) * len(e.input_ids)


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    rewriting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(UserError, match="record 1.*rewrites earlier turns"):
        Encoder(tok, 512, chat_template=rewriting).encode_all([{"messages": msgs}])


def test_a_generation_prompt_the_answer_does_not_follow_is_named(tok):
    """DeepSeek-R1's template opens <think> in the generation prompt, and its rendered answers drop the
    thinking: refused (rightly), but as a template that 'rewrites earlier turns', on a one-turn record."""
    r1 = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(UserError, match=r"record 1: the chat template's generation prompt ends with "
                                        r"'<think>\\n', which the rendered answer does not start with"):
        Encoder(tok, 512, chat_template=r1).encode_all([{"messages": msgs}])


PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


@pytest.mark.parametrize("last", ["assistant", "user"])
def test_an_eos_that_closes_only_the_whole_conversation_is_not_a_rewrite(tok, last):
    """Phi-3's template puts the EOS after the last turn only: every multi-turn record was refused as
    'rewrites earlier turns'. The EOS is learned where the conversation ends on the assistant's turn."""
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Paris is red"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Berlin is blue"}]
    msgs += [{"role": "user", "content": "what"}] if last == "user" else []
    (ex,), _ = Encoder(tok, 512, chat_template=PHI3).encode_all([{"messages": msgs}])
    assert ex.input_ids.tolist() == tok(tok.apply_chat_template(msgs, chat_template=PHI3, tokenize=False),
                               add_special_tokens=False)["input_ids"]
    want = "Paris is red<|end|>\nBerlin is blue<|end|>\n" + ("<|im_end|>" if last == "assistant" else "")
    assert labelled_text(tok, ex) == want
    assert masked_text(tok, ex).startswith("<|user|>\nhello<|end|>\n<|assistant|>\n")


def test_template_that_raises_names_the_record(tok):
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                 "{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    recs = [{"messages": ok}, {"messages": [{"role": "system", "content": "s"}, *ok]}]
    with pytest.raises(UserError, match="training data record 2: the chat template failed .*System role not supported"):
        Encoder(tok, 512, chat_template=no_system).encode_all(recs, "training data")


def test_a_records_system_field_is_its_first_turn(tok):
    """LLaMA-Factory's alpaca and ShareGPT records carry the system prompt as a field."""
    enc = Encoder(tok, 512)
    rec = {"instruction": "Name a color", "input": "", "output": "red", "system": "Be brief."}
    (a,), _ = enc.encode_all([rec])
    assert labelled_text(tok, a) == "red<|im_end|>\n"
    assert tok.decode(a.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color")
    conv = {"system": "Be brief.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    (b,), _ = enc.encode_all([conv])
    assert labelled_text(tok, b) == "hello<|im_end|>\n" and "Be brief." in masked_text(tok, b)
    # conversational prompt/completion: the completion alone still carries the loss
    pc = {"system": "Be brief.", "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                           {"role": "user", "content": "and?"}],
          "completion": [{"role": "assistant", "content": "hello"}]}
    (c,), _ = enc.encode_all([pc])
    assert labelled_text(tok, c) == "hello<|im_end|>\n"
    with pytest.raises(UserError, match="record 1: the record has a system field and another system turn"):
        enc.encode_all([{"system": "A", "messages": [{"role": "system", "content": "B"}, {"role": "user", "content": "x"},
                                                     {"role": "assistant", "content": "y"}]}])
    with pytest.raises(UserError, match="unknown from 'robot' \\(known: human, user, gpt"):
        enc.encode_all([{"conversations": [{"from": "robot", "value": "x"}]}])


def test_mixed_and_unknown_shapes_name_the_record(tok):
    with pytest.raises(UserError, match=r"record 2: shape prompt_completion .* differs"):
        Encoder(tok, 64).encode_all([{"text": "a"}, {"prompt": "b", "completion": "c"}])
    with pytest.raises(UserError, match=r"record 1: unknown shape \(keys: foo\).*messages"):
        Encoder(tok, 64).encode_all([{"foo": 1}])
    with pytest.raises(UserError, match="unknown role"):
        Encoder(tok, 64).encode_all([{"messages": [{"role": "robot", "content": "x"}]}])


def test_record_shape_detection():
    assert record_shape({"text": "x", "id": 1}) == "text"
    assert record_shape({"messages": []}) == "messages"
    assert record_shape({"prompt": "", "completion": ""}) == "prompt_completion"
    assert record_shape({"instruction": "", "input": "", "output": ""}) == "alpaca"
    assert record_shape({"conversations": []}) == "sharegpt"
    assert record_shape({"question": ""}) is None


def test_collate_pads_with_ignore_and_keeps_eos_labels(tok):
    (a, b), _ = Encoder(tok, 512).encode_all([{"prompt": "hi", "completion": "yes"},
                                              {"prompt": "a much longer prompt here", "completion": "no"}])
    batch = collate([a, b], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape
    n = len(a.input_ids)
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["labels"][0, :n] == torch.tensor(a.labels)).all()


@pytest.mark.slow
def test_smollm2_template_masks(smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6, of course."}]
    (ex,), _ = Encoder(tok, 512).encode_all([{"messages": msgs}])
    assert labelled_text(tok, ex) == "4<|im_end|>\n6, of course.<|im_end|>\n"
    masked = masked_text(tok, ex)
    assert "You are a helpful AI assistant named SmolLM" in masked and "And 3+3?" in masked
    assert ex.input_ids.tolist() == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]


TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}call {{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_RECORD = {
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "user", "content": "color of Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "weather", "content": "purple"},
        {"role": "assistant", "content": "Paris is purple"},
    ],
}


def test_function_calling_records_learn_the_calls_and_answers_not_the_results(tok):
    (ex,), _ = Encoder(tok, 512, chat_template=TOOL_TEMPLATE).encode_all([TOOL_RECORD])
    assert tok.decode(ex.input_ids).startswith("<tools>weather;</tools>\n")  # the definitions reach the template
    assert labelled_text(tok, ex) == 'call weather{"city": "Paris"}<|im_end|>\nParis is purple<|im_end|>\n'
    assert "purple<|im_end|>" in masked_text(tok, ex)  # the tool's result is context, not a target


def test_function_calling_records_read_from_a_jsonl_file(tok, tmp_path):
    """Through the file loader: absent keys come back as None, and `tools` may be a JSON string."""
    import json

    from lora_cli.data import load_records

    rec = dict(TOOL_RECORD, tools=json.dumps(TOOL_RECORD["tools"]))
    path = tmp_path / "calls.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({"messages": TOOL_RECORD["messages"][:1] + [
        {"role": "assistant", "content": "no tools here"}], "tools": ""}) + "\n")
    records, _ = load_records(str(path), "train")
    (ex, plain), _ = Encoder(tok, 512, chat_template=TOOL_TEMPLATE).encode_all(records)
    assert labelled_text(tok, ex) == 'call weather{"city": "Paris"}<|im_end|>\nParis is purple<|im_end|>\n'
    assert labelled_text(tok, plain) == "no tools here<|im_end|>\n"


def test_a_template_that_marks_the_assistant_gives_the_mask_even_when_it_rewrites_earlier_turns(tok):
    """Qwen3-style: only the last assistant turn gets a think block, so prefixes are not token prefixes.
    Untagged that is refused; with `{% generation %}` tags (TRL's training templates) the template's own
    marks are the mask."""
    body = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] == 'assistant' %}{GEN}{% if loop.last %}<think></think>{% endif %}"
            "{{ m['content'] }}<|im_end|>{END}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Paris is red"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Berlin is blue"}]
    with pytest.raises(UserError, match="record 1: the chat template rewrites earlier turns"):
        Encoder(tok, 512, chat_template=body.replace("{GEN}", "").replace("{END}", "")).encode_all([{"messages": msgs}])
    tagged = body.replace("{GEN}", "{% generation %}").replace("{END}", "{% endgeneration %}")
    (ex,), _ = Encoder(tok, 512, chat_template=tagged).encode_all([{"messages": msgs}])
    assert labelled_text(tok, ex) == "Paris is red<|im_end|><think></think>Berlin is blue<|im_end|>"
    assert "hello" in masked_text(tok, ex) and "and?" in masked_text(tok, ex)
    (full,), _ = Encoder(tok, 512, chat_template=tagged, train_on_prompt=True).encode_all([{"messages": msgs}])
    assert full.labels.tolist() == full.input_ids.tolist()


def test_reasoning_content_reaches_the_template_and_is_learned(tok):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.get('reasoning_content') %}"
                "<think>{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "hello"},
            {"role": "assistant", "content": "Paris", "reasoning_content": "the capital of France"}]
    (ex,), _ = Encoder(tok, 512, chat_template=template).encode_all([{"messages": msgs}])
    assert labelled_text(tok, ex) == "<think>the capital of France</think>Paris<|im_end|>\n"


def test_tool_calls_a_template_would_drop_are_refused(tok):
    """ChatML without tool support would render the call turn empty: the model would learn empty turns."""
    with pytest.raises(UserError, match="record 1: the record has tool_calls, tools but the chat template never"):
        Encoder(tok, 512).encode_all([TOOL_RECORD])


CONVERSATIONAL_PC = {  # TRL's conversational prompt-completion: the prompt may hold earlier assistant turns
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "Paris is red"}, {"role": "user", "content": "and?"}],
    "completion": [{"role": "assistant", "content": "Berlin is blue"}]}


def test_conversational_prompt_completion_learns_the_completion_only(tok):
    (ex,), stats = Encoder(tok, 512).encode_all([CONVERSATIONAL_PC])
    assert stats.shape == "prompt_completion"
    msgs = CONVERSATIONAL_PC["prompt"] + CONVERSATIONAL_PC["completion"]
    assert ex.input_ids.tolist() == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert labelled_text(tok, ex) == "Berlin is blue<|im_end|>\n"  # not the prompt's own assistant turn
    (as_messages,), _ = Encoder(tok, 512).encode_all([{"messages": msgs}])
    assert labelled_text(tok, as_messages) == "Paris is red<|im_end|>\nBerlin is blue<|im_end|>\n"
    (full,), _ = Encoder(tok, 512, train_on_prompt=True).encode_all([CONVERSATIONAL_PC])
    assert full.labels.tolist() == full.input_ids.tolist()
    with pytest.raises(UserError, match="record 1: prompt and completion must both be strings or both lists"):
        Encoder(tok, 512).encode_all([{"prompt": "hello", "completion": CONVERSATIONAL_PC["completion"]}])


def test_conversational_prompt_completion_with_a_tagged_template(tok):
    tagged = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>"
              "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (ex,), _ = Encoder(tok, 512, chat_template=tagged).encode_all([CONVERSATIONAL_PC])
    assert labelled_text(tok, ex) == "Berlin is blue<|im_end|>"


def test_conversational_prompt_completion_from_a_parquet_file(tok, tmp_path):
    import datasets

    from lora_cli.data import load_records

    datasets.Dataset.from_list([CONVERSATIONAL_PC, CONVERSATIONAL_PC]).to_parquet(tmp_path / "train.parquet")
    records, _ = load_records(str(tmp_path), "train")
    exs, _ = Encoder(tok, 512).encode_all(records)
    assert [labelled_text(tok, e) for e in exs] == ["Berlin is blue<|im_end|>\n"] * 2


def test_content_parts_are_joined_text(tok):
    """OpenAI-style content: a list of parts; text parts read as one string, anything else refused."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Paris is red"}]}]
    plain = [{"role": "user", "content": "hello\nthere"}, {"role": "assistant", "content": "Paris is red"}]
    (a, b), _ = Encoder(tok, 512).encode_all([{"messages": parts}, {"messages": plain}])
    assert (a.input_ids.tolist(), a.labels.tolist()) == (b.input_ids.tolist(), b.labels.tolist())
    image = [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "what?"}]},
             plain[1]]
    with pytest.raises(UserError, match="record 2: messages turn 1 content has a 'image' part; only text"):
        Encoder(tok, 512).encode_all([{"messages": plain}, {"messages": image}])


def test_either_turn_style_in_either_list(tok):
    """`messages` written ShareGPT-style (from/value), `conversations` written role/content: both read."""
    sharegpt_turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    role_turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    exs, _ = Encoder(tok, 512).encode_all([{"messages": sharegpt_turns}, {"messages": role_turns}])
    (c, d), _ = Encoder(tok, 512).encode_all([{"conversations": role_turns}, {"conversations": sharegpt_turns}])
    assert exs[0].input_ids.tolist() == exs[1].input_ids.tolist() == c.input_ids.tolist() == d.input_ids.tolist()
    assert labelled_text(tok, c) == "hello<|im_end|>\n"


def test_progress_advances_once_per_record_and_shows_only_for_large_datasets(tok):
    import io

    from rich.console import Console

    from lora_cli.display import RecordProgress

    recs = [{"prompt": f"q{i}", "completion": "a"} for i in range(5)]
    seen = []
    exs, _ = Encoder(tok, 64).encode_all(recs, advance=lambda: seen.append(1))
    assert len(seen) == 5 and len(exs) == 5
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with RecordProgress(console, "tokenizing", 5) as advance:  # below the threshold: no bar at all
        assert advance is None
    with RecordProgress(console, "tokenizing", 5, min_total=1) as advance:
        Encoder(tok, 64).encode_all(recs, advance=advance)
    assert "5/5" in out.getvalue()
    # in a log (no terminal) a bar prints nothing until the end: plain lines every `every_s` seconds instead
    log = io.StringIO()
    with RecordProgress(Console(file=log, width=100), "tokenizing", 5, min_total=1, every_s=0) as advance:
        Encoder(tok, 64).encode_all(recs, advance=advance)
    lines = log.getvalue().splitlines()
    assert [x.split("  ")[0] for x in lines] == [f"tokenizing {i}/5 ({20 * i}%)" for i in range(1, 5)]
    assert all("elapsed 0:00:00  ETA 0:00:00" in x for x in lines)
    quiet = io.StringIO()
    with RecordProgress(Console(file=quiet, width=100), "tokenizing", 5, min_total=1) as advance:  # < 30 s: silent
        Encoder(tok, 64).encode_all(recs, advance=advance)
    assert quiet.getvalue() == ""


def test_a_tokenizer_with_named_templates_picks_per_record_as_transformers_does():
    """Older tool-calling tokenizers hold {"default": …, "tool_use": …}: records with tools get "tool_use"."""
    from tiny import CHATML, tiny_tokenizer

    from lora_cli.generation import chat_template_for, prompt_ids

    named = tiny_tokenizer()
    named.chat_template = {"default": CHATML, "tool_use": "TOOLS{% for t in tools %}{{ t.name }};{% endfor %}" + CHATML}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (plain, tooled), _ = Encoder(named, 128).encode_all([{"messages": msgs}, {"messages": msgs, "tools": [{"name": "f"}]}])
    assert named.decode(tooled.input_ids) == "TOOLSf;" + named.decode(plain.input_ids)
    assert labelled_text(named, plain) == labelled_text(named, tooled) == "yo<|im_end|>\n"
    assert named.decode(prompt_ids(named, "hi", chat_template_for(named, []))[0]).startswith("<|im_start|>user\nhi")


def test_hub_datasets_read_the_named_splits(monkeypatch):
    """`--data ID` reads `--data-split`, `--eval-data ID` reads `--eval-data-split` (default test, as TRL's
    dataset_test_split): the eval set is never the training split of the same Hub dataset."""
    import datasets

    from lora_cli.config import TrainConfig
    from lora_cli.training import encode_datasets

    asked = []

    class Split:
        def __init__(self, split):
            self.split = split

        def to_list(self):
            return [{"text": f"{self.split} record {i}"} for i in range(3)]

    def load_dataset(name, config=None, split=None):
        asked.append((name, config, split) if config else (name, split))
        return Split(split)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = TrainConfig(model="m", data="org/chats", eval_data="org/chats")
    cfg.validate()
    train, valid, _, _ = encode_datasets(cfg, tiny_tokenizer())
    assert asked == [("org/chats", "train"), ("org/chats", "test")]
    assert (len(train), len(valid)) == (3, 3)
    asked.clear()
    cfg = TrainConfig(model="m", data="org/chats", data_split="train[:80%]", eval_data="org/other", eval_data_split="validation")
    cfg.validate()
    encode_datasets(cfg, tiny_tokenizer())
    assert asked == [("org/chats", "train[:80%]"), ("org/other", "validation")]
    asked.clear()  # a configuration (load_dataset's name); the eval split of --data itself
    cfg = TrainConfig(model="m", data="openai/gsm8k", data_config="main", eval_data_split="test")
    cfg.validate()
    encode_datasets(cfg, tiny_tokenizer())
    assert asked == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]


def test_in_spans_equals_the_overlap_test_of_every_span():
    """The one-pass label sweep against the plain rule: a token overlapping any span (an empty-width token:
    inside one), on random tokenizations, out-of-order offsets included."""
    import random

    from lora_cli.data import _in_spans

    def plain(offsets, spans):
        return [any((s < b and e > a) if e > s else a <= s < b for a, b in spans) for s, e in offsets]

    rng = random.Random(0)
    for _ in range(2000):
        cuts = sorted(rng.sample(range(60), rng.randint(2, 12)))
        spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if rng.random() < 0.8]
        offsets, pos = [], 0
        while pos < 60:
            width = rng.choice([0, 1, 1, 2, 3, 5])
            offsets.append((pos, min(pos + width, 60)))
            pos += max(width, rng.random() < 0.5)
        if rng.random() < 0.1:  # special tokens some tokenizers place at (0, 0)
            offsets.insert(rng.randrange(len(offsets) + 1), (0, 0))
        assert _in_spans(offsets, spans) == plain(offsets, spans), (offsets, spans)


def test_tokenizing_in_worker_processes_gives_the_same_examples_and_errors(tok):
    """--num-proc shares the records among forked processes: the same examples in the same order, the same
    counts, and the first bad record in file order is the one named (with its file line)."""
    import random

    from lora_cli.data import BLOCK, Records

    rng = random.Random(0)
    recs = []
    for i in range(3 * BLOCK + 17):  # blocks of each worker, the last one short
        turns = [{"role": "user", "content": "q " * rng.randint(1, 30)},
                 {"role": "assistant", "content": "" if i % 97 == 0 else "a " * rng.randint(1, 60)}]
        recs.append({"messages": turns})
    recs[5]["messages"][0]["content"] = "long " * 200  # truncated: its answer cut away, dropped
    enc = Encoder(tok, 96)
    seen = []
    one, one_stats = enc.encode_all(recs)
    four, four_stats = enc.encode_all(recs, advance=lambda: seen.append(1), workers=4)
    assert [(e.input_ids.tolist(), e.labels.tolist()) for e in one] == [(e.input_ids.tolist(), e.labels.tolist())
                                                                          for e in four]
    assert one_stats == four_stats and one_stats.truncated > 0 and one_stats.dropped_no_loss > 0
    assert one_stats.empty_answers > 0 and len(seen) == len(recs)
    records = Records.numbered(recs, "chats.jsonl line")
    records[2 * BLOCK + 3] = {"prompt": "x", "completion": 7}  # in the third block: a later worker's
    records[3 * BLOCK + 1] = {"prompt": "y", "completion": 8}
    for workers in (1, 3):
        with pytest.raises(UserError, match=rf"data record {2 * BLOCK + 4}: shape prompt_completion"):
            enc.encode_all(records, workers=workers)
    text = Records.numbered([{"text": "t " * 300}] * (2 * BLOCK), "a.jsonl line")  # chunked
    text[BLOCK + 1] = {"text": 5}
    with pytest.raises(UserError, match=rf"data record {BLOCK + 2}: text must be a string"):
        enc.encode_all(text, workers=2)


def test_tokenize_workers_follow_the_cores_the_run_leaves_each_process(monkeypatch):
    import os

    from lora_cli.data import PARALLEL_MIN_RECORDS
    from lora_cli.training import tokenize_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert tokenize_workers(None, PARALLEL_MIN_RECORDS) == 8  # at most 8
    assert tokenize_workers(None, PARALLEL_MIN_RECORDS, processes=4) == 4  # 4 GPUs' processes share 16 cores
    assert tokenize_workers(None, PARALLEL_MIN_RECORDS, processes=32) == 1
    assert tokenize_workers(None, PARALLEL_MIN_RECORDS - 1) == 1  # small data: not worth starting them
    assert tokenize_workers(3, 10) == 3  # --num-proc as asked
    assert tokenize_workers(64, 10) == 16 and tokenize_workers(64, 10, processes=4) == 4  # up to the cores


def test_num_proc_above_the_cores_says_what_it_uses(cli, tiny_llama, chat_data, tmp_path):
    """64 processes on a 2-core machine ran and were not told: each only slows the others."""
    import os

    cores = len(os.sched_getaffinity(0))
    code, _, err = cli("train", "-m", tiny_llama, "--data", chat_data, "--max-steps", "1", "--num-proc", "64", "-o",
                       tmp_path / "run")
    assert code == 0, err
    assert f"note: --num-proc 64 → {cores}, the CPU cores this run has" in err


def test_a_long_conversation_cut_by_max_length_is_not_rendered_turn_by_turn_past_the_cut(tok, monkeypatch):
    """Every answer rendered the whole conversation before it (the prefix check that makes masks safe): quadratic
    in turns, and paid for turns that --max-length cuts away anyway (1,024 turns: 1.6 s a conversation). The
    example is the one the whole conversation gives, cut."""
    turns = [{"role": r, "content": f"{r} turn {i}: " + "word " * (i % 7)}
             for i in range(400) for r in ("user", "assistant")]
    (whole,), _ = Encoder(tok, 100_000).encode_all([{"messages": turns}])
    renders = []
    real = Encoder.render
    monkeypatch.setattr(Encoder, "render", lambda self, *a, **k: renders.append(1) or real(self, *a, **k))
    (cut,), stats = Encoder(tok, 256).encode_all([{"messages": turns}])
    assert stats.truncated == 1 and len(cut.input_ids) == 256
    assert np.array_equal(cut.input_ids, whole.input_ids[:256]) and np.array_equal(cut.labels, whole.labels[:256])
    assert len(renders) < 60  # 801 before: two per answer, and the whole
