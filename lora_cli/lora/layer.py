"""The LoRA layer: one class wrapping a frozen base linear (`nn.Linear` or GPT-2's `Conv1D`).

    y = base(x) + scaling · B A dropout(x),   A: (r, in) kaiming-uniform(a=√5),  B: (out, r) zeros

so a freshly wrapped model computes exactly what the base did. `merge()` folds the delta into the base
weight in fp32 (idempotent; `unmerge()` undoes it) and `to_base()` returns the plain base module again.

DoRA (`use_dora`) adds a trainable magnitude m (out,): W' = m ⊙ (W + sBA) / ‖W + sBA‖_row, the norm
detached in forward (as in the paper and PEFT); m starts at ‖W‖_row, so the model is unchanged at init.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / √r with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def dropout_positions(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """The positions dropout zeroes, as flat (row-major) indices into a tensor of `shape`; each position is
    dropped independently with probability p, exactly.

    Drawing one random number per element (`F.dropout`) costs more than the LoRA matmuls on a CPU.
    Instead a Poisson(−n·ln(1 − p)) number of positions is drawn uniformly, with replacement: each
    position is hit a Poisson(−ln(1 − p)) number of times independently of the others, so it survives
    with probability exactly 1 − p. For p = 0.05 that is 0.05·n random numbers instead of n, and zeroing
    them (`index_fill_`) is 4× cheaper than a masking pass (`torch.where`) over the whole tensor.
    """
    n = math.prod(shape)
    hits = int(torch.poisson(torch.tensor(-n * math.log1p(-p), dtype=torch.float64)))
    return torch.randint(0, n, (hits,), device=device)


def zeroed_at(x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x with the flat positions `dropped` set to zero."""
    out = x.clone(memory_format=torch.contiguous_format)
    out.view(-1).index_fill_(0, dropped, 0.0)
    return out


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def conv1d_paths(model: nn.Module | None, fallback):
    """module path → whether its weight is stored (in, out), a Conv1D (GPT-2's attention and MLP, not its
    lm_head): decided per module from the model's modules (on the meta device), as PEFT decides it; without
    them (a remote-code model), `fallback(path)`. The LoRA factors are (r, in) and (out, r) either way."""
    if model is None:
        return fallback
    conv = {n for n, m in model.named_modules() if is_conv1d(m)}
    return lambda path: path in conv


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear` or a `Conv1D`."""
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return n_in, n_out
    return module.in_features, module.out_features


def is_linear_like(module: nn.Module) -> bool:
    """Modules we know how to wrap: `nn.Linear` (and subclasses, e.g. 4-bit linears) and `Conv1D`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class _MaskedDown(torch.autograd.Function):
    """dropout(x) Aᵀ, (…, in) → (…, r), dropout zeroing the flat positions `dropped`; hand-written backward.

    Autograd would keep the dropped-out input (a full-size copy of x per layer) alive for the gradient
    of A; this keeps x (alive anyway) and the dropped positions, and redoes the zeroing in backward.
    """

    @staticmethod
    def forward(ctx, x, dropped, a):
        ctx.save_for_backward(x, dropped, a)
        return F.linear(zeroed_at(x, dropped), a)

    @staticmethod
    def backward(ctx, grad):
        x, dropped, a = ctx.saved_tensors
        gx = ga = None
        if ctx.needs_input_grad[2]:
            xd = zeroed_at(x, dropped)
            ga = grad.reshape(-1, grad.shape[-1]).T.to(a.dtype) @ xd.reshape(-1, x.shape[-1]).to(a.dtype)
        if ctx.needs_input_grad[0]:
            gx = (grad @ a.to(grad.dtype)).to(x.dtype)  # a fresh contiguous tensor: zeroed in place
            gx.view(-1).index_fill_(0, dropped, 0.0)
        return gx, None, ga


def _down(x: torch.Tensor, a: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """x Aᵀ, the input first zeroed at the dropout `positions` (None: no dropout)."""
    return F.linear(x, a) if positions is None else _MaskedDown.apply(x, positions, a)


class LoraLinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update. Build it with `LoraLinear.from_base`."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"rank must be >= 1, got {r}")
        n_in, n_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = n_in, n_out  # as PEFT's layers have them
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.fan_in_fan_out = is_conv1d(base_layer)
        # LoRA weights live in fp32 whatever the base dtype: they are tiny and train better so.
        device = base_layer.weight.device
        self.lora_A = nn.Linear(n_in, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, n_out, bias=False, device=device, dtype=torch.float32)
        self.dropout = dropout
        # State shared by the LoRA layers of one parent module (set by inject_lora): layers that read the
        # same input tensor (q/k/v) share its dropout mask and one down-projection matmul.
        self.siblings: dict | None = None
        self.merged = False
        self.use_dora = use_dora
        self._plain_base = type(base_layer) is nn.Linear or is_conv1d(base_layer)
        self.reset_lora_parameters()
        if use_dora:
            # (out,): the row norms of W + sBA = ‖W‖ at init (B = 0)
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm().detach().clone())

    @classmethod
    def from_base(
        cls, base_layer: nn.Module, r: int, lora_alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        use_dora: bool = False,
    ) -> LoraLinear:
        """Wrap `base_layer` (frozen in place) with a zero-initialised LoRA update."""
        base_layer.requires_grad_(False)
        return cls(base_layer, r, lora_alpha, dropout, use_rslora, use_dora)

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform with a = √5 (|A| ≤ 1/√in), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (some model code reads `.weight` of its projections directly)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base bias (Mamba reads `dt_proj.bias` directly), as PEFT's wrappers expose it."""
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        dropped = self.dropout > 0 and self.training
        # Dropout's 1/(1-p) is folded into the scaling, applied on the small (…, r) tensor.
        scaling = self.scaling / (1.0 - self.dropout) if dropped else self.scaling
        xd = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        if torch.compiler.is_compiling():  # a mask the compiler traces and fuses; one per layer, as PEFT
            if dropped:
                xd = torch.where(torch.rand(x.shape, device=x.device) >= self.dropout, xd, 0.0)
            h = F.linear(xd, self.lora_A.weight)
        elif self.use_dora:
            positions = self._dropped_positions(x) if dropped else None
            h = _down(xd, self.lora_A.weight, positions)
            xd = xd if positions is None else zeroed_at(xd, positions)
        else:
            h = self._shared_down(x, xd, dropped)  # (…, r)
        b = self.lora_B.weight
        if not self.use_dora:
            if result.dtype == h.dtype and result.dim() >= 2:  # the residual add fused into the GEMM
                flat, h2 = result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1])
                # in place where the base's backward does not need its output (a plain linear): no copy
                add = flat.addmm_ if self._plain_base else functools.partial(torch.addmm, flat)
                return add(h2, b.T.to(h.dtype), alpha=scaling).view(result.shape)  # in-place ops skip autocast
            return result + (F.linear(h, b) * scaling).to(result.dtype)
        lora = F.linear(h * scaling, b)
        # DoRA: y = (m/‖W + sBA‖) ⊙ (W x + sBA x) + bias, the norm detached
        scale = self.lora_magnitude_vector / self._weight_norm().detach()  # (out,)
        if not dropped:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        else:  # the base term must see the same dropped-out input as the LoRA term
            base = F.linear(xd, self._weight_out_in().to(xd.dtype)) / (1.0 - self.dropout)
        return result + ((scale - 1) * base + scale * lora).to(result.dtype)

    def _input_state(self, x: torch.Tensor) -> dict | None:
        """The sibling group's state for input tensor `x` (held weakly). A new input starts a new state; the
        layers that read the previous one, in call order, become the plan for its first reader, unless it
        already has a longer one: a recompute under gradient checkpointing may stop after the first
        reader, and a stale, longer plan is harmless (see `_shared_down`)."""
        g = self.siblings
        if g is None:
            return None
        ref = g.get("x")
        if ref is None or ref() is not x:
            readers, plans = g.get("readers"), g.setdefault("plan", {})
            if readers and len(readers) >= len(plans.get(readers[0], ())):
                plans[readers[0]] = tuple(readers)
            g.update(x=weakref.ref(x), readers=[], pending={}, positions=None)
        return g

    def _dropped_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Where dropout zeroes input `x` (flat indices), shared by the siblings that read this very tensor.

        Drawn once per input and held (strongly) until the next input: the random draws then do not depend
        on which tensors autograd keeps alive, so a recompute under gradient checkpointing (which keeps
        them, where the checkpointed forward freed them) draws the same positions as the forward did."""
        g = self._input_state(x)
        if g is not None and g["positions"] is not None:
            return g["positions"]
        positions = dropout_positions(x.shape, self.dropout, x.device)
        if g is not None:
            g["positions"] = positions
        return positions

    def _shared_down(self, x: torch.Tensor, xd: torch.Tensor, dropped: bool) -> torch.Tensor:
        """A dropout(x) for this layer. The first reader of an input computes it for all the siblings that
        read the same tensor in the previous forward (q/k/v, gate/up) in one matmul, and they take their
        slices: x is read (and masked, and in backward its gradient formed) once instead of per layer."""
        positions = self._dropped_positions(x) if dropped else None
        g = self._input_state(x)
        if g is None:
            return _down(xd, self.lora_A.weight, positions)
        first = not g["readers"]
        g["readers"].append(self)
        h = g["pending"].pop(self, None)
        if h is not None:
            return h
        plan = g.get("plan", {}).get(self, ()) if first else ()
        if len(plan) < 2 or not all(self._fuses_with(other) for other in plan):
            return _down(xd, self.lora_A.weight, positions)
        hs = _down(xd, torch.cat([m.lora_A.weight for m in plan]), positions).split([m.r for m in plan], dim=-1)
        g["pending"] = dict(zip(plan[1:], hs[1:]))
        return hs[0]

    def _fuses_with(self, other: LoraLinear) -> bool:
        a, b = self.lora_A.weight, other.lora_A.weight
        return (not other.merged and not other.use_dora and other.dropout == self.dropout
                and other.training == self.training and a.dtype == b.dtype and a.device == b.device)

    def _weight_out_in(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def _weight_norm(self) -> torch.Tensor:
        """‖W + sBA‖ per output row, fp32 (out,)."""
        lora = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return torch.linalg.norm(self._weight_out_in().float() + lora, dim=1)

    def delta_weight(self) -> torch.Tensor:
        """W' − W in fp32, in the base weight's layout ((in, out) for Conv1D): scaling · B A, or for DoRA
        m ⊙ (W + sBA) / ‖W + sBA‖ − W."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
        if self.use_dora:
            w = self._weight_out_in().float()
            scale = self.lora_magnitude_vector.float() / self._weight_norm()
            delta = scale[:, None] * (w + delta) - w
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + scaling · B A, computed in fp32 and cast back. A second call does nothing."""
        if self.merged:
            return
        w = self.base_layer.weight
        if not w.is_floating_point() or w.element_size() < 2:
            raise ValueError("cannot merge into quantized (4-bit/8-bit) weights; `lora merge` merges into the "
                             "16-bit base checkpoint instead")
        merged = w.float() + self.delta_weight().to(w.device)
        if not torch.isfinite(merged).all():
            raise ValueError("merging would put non-finite values into the weight; the adapter is broken")
        if self.use_dora:  # remembered to undo the row scaling exactly
            self._merged_scale = self.lora_magnitude_vector.detach().float() / self._weight_norm()
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − scaling · B A (fp32; DoRA: W = W'‖W + sBA‖/m − sBA). A call on an unmerged layer does nothing."""
        if not self.merged:
            return
        w = self.base_layer.weight
        merged = w.float()
        lora = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        lora = lora.T if self.fan_in_fan_out else lora
        if self.use_dora:
            # W' = c ⊙ (W + L) row-wise, c = m / ‖W + L‖ saved by merge(): so W + L = W' / c
            rows = merged.T if self.fan_in_fan_out else merged
            c = self._merged_scale
            orig = rows / c[:, None]
            merged = (orig.T if self.fan_in_fan_out else orig) - lora
        else:
            merged = merged - lora
        w.copy_(merged.to(w.dtype))
        self.merged = False

    def to_base(self) -> nn.Module:
        """Merge and return the plain base module (no LoRA code left in it)."""
        self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}" + (", dora" if self.use_dora else "")
