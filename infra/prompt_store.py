"""Prompt embeddings for prompt sets of any size: kept in host memory, and on disk for costly encoders.

vader.encode_prompts teaches the idea (each prompt encoded once, before training); this is its
bookkeeping at scale. The training prompts' embeddings (P, L, D) wait in host memory and each
micro-batch moves only its B rows to the GPU (infra/setup.batch_drawer), so the GPU's peak does
not grow with P: for Wan, 512 x 4096 bf16 is 4 MiB a prompt, 16 GiB for 4,000 prompts. For a text
encoder of a billion parameters or more (Wan's UMT5-XXL), each prompt's embedding is also kept on
disk, keyed by everything that changes it (the model and its revision, the encoder's class and
config, the tokenizer's length, the dtype, the prompt's text), so a second run of the same
prompts reads them instead of encoding again.
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from infra.files import atomic_path

COSTLY = 1e9  # parameters: a text encoder this large is worth a disk cache (UMT5-XXL: 5.7 B; CLIP-H: 0.34 B)


def default_cache():
    """~/.cache/vader-minimal/embeddings, or under $XDG_CACHE_HOME."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vader-minimal" / "embeddings"


def encoder_key(model):
    """A hash of everything about the model that changes a prompt's embedding."""
    encoder = model.text_encoder
    config = encoder.config.to_dict() if hasattr(encoder.config, "to_dict") else dict(encoder.config)
    facts = dict(model=model.base_id, revision=getattr(encoder.config, "_commit_hash", None), family=type(model).__name__,
                 encoder=type(encoder).__name__, config=config, tokenizer=type(model.tokenizer).__name__,
                 length=model.text_length, dtype=str(next(encoder.parameters()).dtype))
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def costly(model):
    return sum(p.numel() for p in model.text_encoder.parameters()) >= COSTLY


def prompt_embeddings(model, prompts, cache=None, batch=32):
    """(P, L, D) embeddings of `prompts` in host memory (pinned when a GPU will read them), encoded
    by vader.encode_prompts in batches with a progress bar. `cache`: a folder of embeddings to read
    and add to (None: the default folder for a costly encoder, none for a cheap one; "" : none)."""
    from vader import encode_prompts

    cache = (default_cache() if costly(model) else "") if cache is None else cache
    folder = Path(cache) / encoder_key(model) if cache else None
    names = [hashlib.sha256(p.encode()).hexdigest() + ".safetensors" for p in prompts]
    cond, todo = None, []  # cond: (P, L, D), filled row by row, so no second copy of it is ever made
    for i, name in enumerate(names):
        if folder and (folder / name).is_file():
            row = load_file(folder / name)["embedding"]  # (L, D)
            cond = torch.empty(len(prompts), *row.shape, dtype=row.dtype) if cond is None else cond
            cond[i] = row
        else:
            todo.append(i)
    for start in tqdm(range(0, len(todo), batch), desc="encoding prompts", unit="batch", leave=False,
                      disable=len(todo) <= batch):
        chunk = todo[start:start + batch]
        emb = encode_prompts(model, [prompts[i] for i in chunk], batch).cpu()  # (b, L, D)
        cond = torch.empty(len(prompts), *emb.shape[1:], dtype=emb.dtype) if cond is None else cond
        cond[chunk] = emb
        for i, e in zip(chunk, emb) if folder else ():
            with atomic_path(folder / names[i]) as tmp:  # a crash never leaves half an embedding
                save_file({"embedding": e.clone()}, tmp)
    cond = torch.empty(0) if cond is None else cond
    return cond.pin_memory() if torch.cuda.is_available() and str(model.device).startswith("cuda") else cond
