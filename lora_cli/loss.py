"""The training loss: summed token cross-entropy over loss positions only.

The fast path runs the decoder body, keeps the hidden states of positions that carry a label, and
computes the LM head + cross-entropy there in chunks, with a custom backward that stores only the
gradient w.r.t. those hidden states: the (tokens × vocab) logits never exist in full. It applies when
the LM head is a plain frozen linear applied to the body's last hidden state with nothing between or after
(no head transform, soft-capping or scale), which a forward of a few tokens checks before training;
otherwise the model's own forward computes full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.data import IGNORE

# Rows of the LM head computed at once. On a CPU a (rows × vocab) fp32 buffer above glibc's 32 MB mmap
# limit is mapped fresh (and page-faulted in) for every chunk, which cost more than the head itself;
# under the limit the buffer is reused. On a GPU the caching allocator reuses any size: big chunks.
CHUNK_BYTES = {"cpu": 24 << 20, "cuda": 1 << 30}
MIN_CHUNK_ROWS = 32


def chunk_rows(vocab: int, device: torch.device) -> int:
    """LM-head rows per chunk: as many as fit CHUNK_BYTES of fp32 logits, at least MIN_CHUNK_ROWS."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // (4 * vocab))
# Config attributes of models that post-process logits after the head: those use the plain path.
_LOGIT_POSTPROCESS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ CE(h W^T + b, y) over rows, chunked; saves d loss / d h (rows × hidden), not the logits."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        for i in range(0, h.shape[0], chunk):
            y = targets[i : i + chunk]
            rows = torch.arange(len(y), device=y.device)
            # one fused kernel, one (c, vocab) buffer: log-probs, then (in place) probs
            logp = torch.log_softmax(F.linear(h[i : i + chunk], weight, bias).float(), dim=-1)
            total -= logp[rows, y].sum()
            if grad_h is not None:
                # d CE / d logits = softmax − onehot; then back through the (frozen) head.
                probs = logp.exp_()
                probs[rows, y] -= 1.0
                grad_h[i : i + chunk] = (probs.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None


def plain_head(model: nn.Module, frozen: bool = True) -> nn.Linear | None:
    """The model's output head if the fast path may use it (it must be frozen: its backward gives the head no
    gradient, unless `frozen` is False: asked before the weights are frozen), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or (frozen and head.weight.requires_grad):
        return None
    if any(getattr(model.config, a, None) not in (None, 1, 1.0) for a in _LOGIT_POSTPROCESS):
        return None
    if not hasattr(model, "base_model") or model.base_model is model:
        return None
    return head


def head_is_last(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether the model's logits are its plain output head applied to its body's last hidden state (what
    `model.base_model` returns: the fast path's input), with nothing between (BERT-style heads' dense +
    LayerNorm, ModernBERT's) or after (a soft-cap or scale under a name `plain_head` does not know): the body's
    output of a few tokens against what the head is given and gives in the model's own forward. The fast path
    computes exactly that, so anything else would train on another loss than the model's."""
    head = plain_head(model, frozen=False)
    if head is None:
        return False
    seen: list = []
    hook = head.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits
            body = model.base_model(input_ids=input_ids, use_cache=False)[0]
    finally:
        hook.remove()
        model.train(was_training)
    if len(seen) != 1:  # a head used twice (multi-token prediction), or not at all
        return False
    ((head_in, head_out),) = seen
    if head_in.shape != body.shape or head_out.shape != logits.shape or \
            not torch.equal(head_out.to(logits.dtype), logits):
        return False
    # two forwards: equal, but for kernels that do not repeat bit for bit (GPU); a transform is nowhere near
    off = (head_in.float() - body.float()).norm() / body.float().norm().clamp_min(1e-12)
    return float(off) < (1e-4 if body.dtype == torch.float32 else 1e-2)


def attention_mask_for(model: nn.Module, block: torch.Tensor) -> torch.Tensor | dict | None:
    """A boolean (B, 1, T, T) packing mask in the form the model's attention implementation takes.

    A model given a 4-D mask uses it as it is, so a sliding window is applied here: every layer slides
    (Mistral, Phi-3, …: `sliding_window` set and no `layer_types`), or only the "sliding_attention" layers
    (Gemma 2/3, GPT-OSS, …: one mask per layer type, which those models take as a dict)."""
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if "flash" in impl:  # flash attention finds packed records from the restarting position ids
        return None
    window = getattr(model.config, "sliding_window", None)
    layer_types = getattr(model.config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return _in_attention_form(model, impl, block)
    idx = torch.arange(block.shape[-1], device=block.device)
    near = idx[None, :] > idx[:, None] - window  # key > query − window: transformers' sliding_window_overlay
    windowed = _in_attention_form(model, impl, block & near)
    if layer_types is None:
        return windowed
    return {"full_attention": _in_attention_form(model, impl, block), "sliding_attention": windowed}


def _in_attention_form(model: nn.Module, impl: str, mask: torch.Tensor) -> torch.Tensor:
    if impl == "eager":  # additive: 0 where attended, the dtype's minimum elsewhere
        dtype = model.get_input_embeddings().weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


class CausalLMLoss(nn.Module):
    """Wraps a causal LM; forward returns (Σ token loss, number of loss tokens).

    Accelerate/DDP wrap this module, so gradient synchronisation sees the whole computation.
    """

    def __init__(self, model: nn.Module, fused: bool = True) -> None:
        super().__init__()
        self.model = model
        self.head = plain_head(model) if fused else None

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask_for(self.model, attention_mask)
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE
        n = keep.sum()
        if self.head is None:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False)
            logits = out.logits[:, :-1][keep].float()
            return F.cross_entropy(logits, targets[keep], reduction="sum"), n
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False).last_hidden_state
        h = hidden[:, :-1][keep]  # (n, hidden)
        rows = chunk_rows(self.head.weight.shape[0], h.device)
        return _LinearCrossEntropy.apply(h, self.head.weight, self.head.bias, targets[keep], rows), n
