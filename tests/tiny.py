"""Tiny models and a tiny tokenizer, built offline from configs, for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789 !?,.:;'\"()[]{}<>-_+=*/\\|@#$%^&~`",
    "user assistant system hello world what is the capital of France Paris Berlin Rome Madrid",
    "Question: Answer: The answer is yes no maybe. color colour red green blue purple",
] * 20


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=256, initializer_range=0.2)


def tiny_config(arch: str, vocab: int = 128) -> tf.PretrainedConfig:
    """A 2-layer config of `arch` with hidden size 32 (64 where the architecture needs it)."""
    c = _common(vocab)
    if arch == "llama":
        return tf.LlamaConfig(**c, num_key_value_heads=2)
    if arch == "llama-tied":
        return tf.LlamaConfig(**c, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(**c, num_key_value_heads=2)
    if arch == "qwen3":
        return tf.Qwen3Config(**c, num_key_value_heads=2, head_dim=8)
    if arch == "mistral":
        return tf.MistralConfig(**c, num_key_value_heads=2)
    if arch == "gemma":
        return tf.GemmaConfig(**c, num_key_value_heads=2, head_dim=8)
    if arch == "phi3":
        return tf.Phi3Config(**c, num_key_value_heads=4, pad_token_id=0)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    if arch == "openai-gpt":  # GPT-1: Conv1D layers, but not model_type gpt2
        return tf.OpenAIGPTConfig(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**c)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            ffn_dim=64, max_position_embeddings=256, word_embed_proj_dim=32)
    if arch == "falcon":
        return tf.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               new_decoder_architecture=False, multi_query=True)
    if arch == "gemma2":  # soft-capped logits: the loss takes the model's own head
        return tf.Gemma2Config(**c, num_key_value_heads=2, head_dim=8)
    if arch == "phi":
        return tf.PhiConfig(**c)
    if arch == "bloom":
        return tf.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4)
    if arch == "mpt":
        return tf.MptConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_seq_len=256)
    if arch == "gpt_bigcode":  # multi-query attention in one c_attn Linear
        return tf.GPTBigCodeConfig(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    if arch == "codegen":
        return tf.CodeGenConfig(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256,
                                n_ctx=256)
    if arch == "qwen2_moe":  # MoE: fused experts, a linear shared expert
        return tf.Qwen2MoeConfig(**c, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, shared_expert_intermediate_size=16)
    if arch == "phimoe":  # its router is an nn.Linear whose forward returns (scores, logits)
        return tf.PhimoeConfig(**c, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    if arch == "deepseek_v3":  # MoE with latent attention; layer 0 a dense MLP
        return tf.DeepseekV3Config(**c, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                   qk_nope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=16, first_k_dense_replace=1, n_group=1, topk_group=1)
    if arch == "zamba2":  # two hybrid layers reusing one attention block: one weight, used twice
        return tf.Zamba2Config(**{**c, "hidden_size": 64}, num_key_value_heads=2, mamba_d_state=8, mamba_headdim=16,
                               n_mamba_heads=8, layers_block_type=["hybrid", "hybrid"], num_mem_blocks=1)
    if arch == "gemma3-mm":  # multimodal: a vision tower beside the language model, saved under other names
        text = tf.Gemma3TextConfig(**{**c, "hidden_size": 64}, num_key_value_heads=2, head_dim=16, sliding_window=8)
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14)
        return tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                               image_token_index=3, boi_token_index=1, eoi_token_index=2)
    if arch == "bart":  # BartForCausalLM: a decoder with cross-attention layers that run only beside an encoder
        return tf.BartConfig(vocab_size=vocab, d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4,
                             encoder_attention_heads=4, decoder_ffn_dim=64, encoder_ffn_dim=64,
                             max_position_embeddings=256, is_decoder=True, is_encoder_decoder=False)
    if arch == "jetmoe":  # mixture of attention experts: a top-k router Linear inside the attention module
        return tf.JetMoeConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                               kv_channels=16, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=256)
    if arch == "lfm2":  # hybrid: short-convolution layers beside attention, which carry a state along the sequence
        return tf.Lfm2Config(**{**c, "initializer_range": 0.02}, num_key_value_heads=2,  # (its own default)
                             layer_types=["conv", "full_attention"])
    if arch == "rwkv":  # recurrent, and nothing in its config says so
        return tf.RwkvConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                             intermediate_size=64, context_length=256)
    if arch == "mamba":  # no attention; its slow path reads dt_proj.weight directly
        return tf.MambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=8)
    raise ValueError(arch)


def tiny_model(arch: str, vocab: int = 128, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny causal LM in fp32 and eval mode."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, vocab), dtype=torch.float32)
    return model.eval()


def tiny_tokenizer(chat_template: str | None = CHATML) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few lines, with ChatML specials (pad = eos)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=320, min_frequency=1, special_tokens=SPECIALS)
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                     bos_token="<|im_start|>", pad_token="<|im_end|>", unk_token=None)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def save_tiny(path: str | Path, arch: str = "llama", chat_template: str | None = CHATML, seed: int = 0) -> Path:
    """Save a tiny model + tokenizer in transformers layout (safetensors) and return the directory."""
    path = Path(path)
    tok = tiny_tokenizer(chat_template)
    model = tiny_model(arch, vocab=len(tok), seed=seed)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
