"""lora: fine-tune Hugging Face causal language models with LoRA."""

__version__ = "0.1.0"
