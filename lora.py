"""LoRA, written by hand: low-rank adapters on the attention projections.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685), Eq. (3):
a frozen weight W0 (out, in) is adapted as

    h = W0 x + (alpha / r) · B A x        A: (r, in), B: (out, r), r << min(in, out)

A starts random and B starts at zero, so B A = 0 and the model is exactly unchanged until the
first update. Only A and B train, a few million parameters against the denoiser's billion or
more, which is what lets alignment fit one GPU.

Manual mixed precision. The frozen base may sit in bf16 or fp16 (half the memory, and it never
receives updates, so rounding cannot accumulate in it). The LoRA weights, their gradients and
the optimizer state stay float32. bf16 keeps 8 significant bits (7 stored, one implicit), so
neighbouring bf16 numbers near 0.01 are 6.1e-5 apart: an AdamW step of lr 2e-4 would land as
1.83e-4, and on a weight of 0.0625 or more (neighbours 4.9e-4 apart) it would round away
entirely, step after step. So the adapter path computes in float32 and only its output is cast
back to the activations' dtype (tests/test_lora.py holds these numbers to torch).

Saved files use PEFT's key layout (`<prefix><module path>.lora_A.weight`, `...lora_B.weight`,
the prefix being the pipeline component: `unet.` for the UNets), so other tools can read them.
Rank and alpha travel in the safetensors metadata twice: as plain fields for `load_lora`, and as
the LoraConfig fields that diffusers' `load_lora_weights` reads, so diffusers applies the same
alpha / r scaling. The metadata also names the base model: a LoRA learns a correction to one set
of frozen weights, so on another base of the same shapes it loads but means something else.
"""
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from infra.files import atomic_path

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, spatial and temporal


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable float32 low-rank update (Eq. 3 of 2106.09685)."""

    def __init__(self, base: nn.Linear, rank=16, alpha=None, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.scaling = self.alpha / rank
        # Module names chosen so state-dict keys read `...to_q.lora_A.weight`, PEFT's layout.
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        # PEFT's initialisation: A ~ Kaiming-uniform (as nn.Linear), B = 0, so B A = 0 at start.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        if x.dtype == torch.float32 or self.training and isinstance(self.dropout, nn.Dropout):
            update = self.lora_B(self.lora_A(self.dropout(x.float()))) * self.scaling  # (..., out), fp32
        else:  # a bf16/fp16 base: the same numbers, without a float32 copy of x kept for backward
            update = LoRAUpdate.apply(x, self.lora_A.weight, self.lora_B.weight, self.scaling)
        return self.base(x) + update.to(x.dtype)

    def merged_weight(self):
        """W0 + (alpha / r) B A, in the base weight's dtype."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)


class LoRAUpdate(torch.autograd.Function):
    """(alpha / r) B A x computed in float32 for an x in bf16 or fp16, saving x itself for backward.

    Written plainly, `lora_A(x.float())` makes autograd keep the float32 copy of x until backward,
    twice x's own size, and one for every adapted projection that reads it: in self-attention
    to_q, to_k and to_v read the same x and would keep three copies. Here each adapter saves x as
    it is, in bf16, and the three save the same tensor, so one shared bf16 copy replaces three
    float32 ones. It is still memory the frozen layer alone would not keep: a linear whose weight
    needs no gradient saves only its weight (grad_x = grad_y W), not x (tests/test_lora.py holds
    this to autograd). Backward casts x again; the arithmetic is that of autograd on the plain form.
    """

    @staticmethod
    def forward(ctx, x, A, B, scaling):  # x (..., in) bf16, A (r, in), B (out, r) float32
        h = x.float() @ A.t()  # (..., r)
        ctx.save_for_backward(x, A, B, h)
        ctx.scaling = scaling
        return (h @ B.t()) * scaling  # (..., out), float32

    @staticmethod
    def backward(ctx, grad):  # grad (..., out), float32
        x, A, B, h = ctx.saved_tensors
        g = grad * ctx.scaling  # (..., out)
        grad_h = g @ B  # (..., r)
        grad_B = g.flatten(0, -2).t() @ h.flatten(0, -2)  # (out, r)
        grad_A = grad_h.flatten(0, -2).t() @ x.float().flatten(0, -2)  # (r, in)
        return (grad_h @ A).to(x.dtype), grad_A, grad_B, None


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model):
    """{module path: LoRALinear} for every adapter in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_lora(model, rank=16, alpha=None, targets=TARGETS, dropout=0.0):
    """Freeze `model` and wrap every nn.Linear whose qualified name ends with a target.

    Returns the new trainable parameters (A and B of every adapter), ready for the optimizer.
    The model's output is unchanged until they are trained, because every B starts at zero.
    """
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches the LoRA targets {list(targets)}")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def lora_state_dict(model, prefix="unet."):
    """PEFT-style state dict: {prefix}{path}.lora_A.weight (r, in) and .lora_B.weight (out, r)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{prefix}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{prefix}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


def save_lora(model, path, prefix="unet.", base="", tensors=None):
    """Write the adapters to a safetensors file (atomically); rank, alpha and the base model's name
    (`base`) go in its metadata. `tensors` stands in for `lora_state_dict(model, prefix)` when the
    caller has gathered the adapters from elsewhere."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    meta = {"rank": str(first.rank), "alpha": str(first.alpha), "format": "peft", "prefix": prefix, "base_model": base}
    # diffusers (loaders.lora_base.LORA_ADAPTER_METADATA_KEY) builds its peft.LoraConfig from these,
    # prefixed by the component they belong to; without them it would take alpha = r.
    config = {"r": first.rank, "lora_alpha": first.alpha, "target_modules": sorted(layers)}
    meta["lora_adapter_metadata"] = json.dumps({f"{prefix}{k}": v for k, v in config.items()})
    tensors = tensors if tensors is not None else lora_state_dict(model, prefix)
    data = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    with atomic_path(path) as tmp:  # a temporary file renamed over `path`: a crash leaves no half file
        Path(tmp).write_bytes(data)


def load_lora(model, path):
    """Load adapters saved by `save_lora` into `model`, injecting them first if it has none.

    Every key and shape must match: a file for another model or another set of targets is
    refused (ValueError, naming the first key that does not fit) rather than half loaded.
    """
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    prefix = meta.get("prefix", "unet.")
    if not lora_layers(model):
        paths = {k[len(prefix):].rsplit(".lora_", 1)[0] for k in tensors}
        inject_lora(model, int(meta["rank"]), float(meta["alpha"]), targets=tuple(paths))
    expected = lora_state_dict(model, prefix)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        first = f"the model has {missing[0]} but the file does not" if missing else f"the file has {extra[0]}, the model does not"
        raise ValueError(f"{path} does not fit this model ({len(missing)} adapters missing, {len(extra)} unexpected: {first})")
    for k in sorted(tensors):
        if expected[k].shape != tensors[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model needs {tuple(expected[k].shape)}")
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v)


def merge_lora(model):
    """Fold every adapter into its base weight (W0 <- W0 + (alpha / r) B A) and unwrap it.

    The result is a plain model with the original module structure, so `save_pretrained` writes
    a checkpoint any diffusers code can load, and inference pays nothing for the adapters.
    An explicit call, never a side effect of `.eval()` (a lesson from loralib).
    """
    for name, layer in lora_layers(model).items():
        with torch.no_grad():
            layer.base.weight.copy_(layer.merged_weight())
        _replace(model, name, layer.base)
    return model
