"""A LoRA file checked before it is used: the one-line refusals around lora.load_lora.

lora.py loads what fits and raises a plain ValueError for what does not; the scripts call
`load_lora_file`, which checks the file itself first (metadata, pairs, finite values), warns when
it was trained on another base model, and turns a misfit into a `UserError` with its fix.

Every script that loads a LoRA passes the base (models.base_id of the model it loads into), so a
file of another base is never taken in silently. Where it only makes videos or measures them
(sample.py, toy/evaluate.py) the shapes fitting is enough to go on, with a warning on stderr: a
LoRA tried on a sibling base is a fair experiment. A checkpoint is stricter (infra/runlog.py):
its config.json must name the base its LoRA does, for a resumed run would write its LoRA on as
that base's, and the record of where it came from would be lost.
"""
import math
import os
import sys
from pathlib import Path

import torch

from infra.cli import UserError
from infra.files import read_safetensors


def read_lora_file(path):
    """(tensors, metadata) of a LoRA file; `UserError` if it is missing, damaged or not a LoRA file:
    rank a whole number >= 1, alpha finite and positive, every tensor a finite float matrix, and
    each A (r, in) with its B (out, r)."""
    tensors, meta = read_safetensors(path, "LoRA file", "pass the lora.safetensors of a training run")
    if "rank" not in meta or "alpha" not in meta:
        raise UserError(f"{path} has no LoRA rank/alpha metadata; was it written by save_lora?")
    try:
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
    except ValueError:
        rank, alpha = 0, 0.0
    if rank < 1 or not (math.isfinite(alpha) and alpha > 0):
        raise UserError(f"{path} has the LoRA metadata rank={meta['rank']!r}, alpha={meta['alpha']!r}; a rank is a "
                        "whole number >= 1 and alpha a positive number: the file is damaged, use another copy")
    for k, v in tensors.items():
        is_a = ".lora_A." in k
        pair = k.replace(".lora_A.", ".lora_B.") if is_a else k.replace(".lora_B.", ".lora_A.")
        a, b = (v, tensors.get(pair)) if is_a else (tensors.get(pair), v)
        if pair == k or a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)}, which is not half of a rank-{rank} LoRA pair "
                            "(A (r, in), B (out, r)); pass the lora.safetensors of a training run")
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise UserError(f"{path}: {k} holds {'inf or NaN' if v.is_floating_point() else v.dtype} values, so it "
                            "would make every video black; use an earlier checkpoint's lora.safetensors")
    return tensors, meta


def same_base(model, base):
    """Whether the model name `model` (a run's --model: a registry name, a folder or a hub id) is the
    base a LoRA file names (`base`, models.base_id of the model it was trained on), without loading it.
    A folder given by a relative path that is not there from here is taken to be the one recorded, and
    a registry model kept in this repository (toy) is the same model in another checkout of it."""
    from models import MODELS, base_id

    spec = MODELS.get(model) or next((s for s in MODELS.values() if s.source == model), None)
    if spec is not None:
        moved = os.path.isdir(spec.source) and Path(base).is_absolute() and \
            Path(base).parts[-2:] == Path(spec.source).parts[-2:]
        return base_id(spec) == base or moved
    if os.path.isdir(model):
        return str(Path(model).resolve()) == base
    recorded = Path(base)
    return model == base or (recorded.is_absolute() and not Path(model).is_absolute()
                             and recorded.parts[-len(Path(model).parts):] == Path(model).parts)


def load_lora_file(model, path, base=None):
    """lora.load_lora behind the checks: a damaged file or one that does not fit `model` is a UserError;
    with `base` (models.base_id of the model), a file trained on another base gets a warning."""
    from lora import load_lora

    _, meta = read_lora_file(path)
    other = meta.get("base_model", "")
    if base and other and other != base:
        print(f"warning: {path} was trained on {other}, and is loaded into {base}: the shapes fit, but a LoRA "
              "is a correction to the weights it was trained on, so on another base expect another result",
              file=sys.stderr)
    try:
        load_lora(model, path)
    except ValueError as e:
        raise UserError(f"{e}; load it into the model it was trained on") from None
