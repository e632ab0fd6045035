"""Every flag checked against its meaning before any work starts, in one table.

A typo should cost a second, not a download and a model load: `check_flags` runs before anything
is loaded or written, and each refusal is one `UserError` line naming the flag, what it must be,
and what it got. The same table checks a resumed checkpoint's config.json, so a damaged or
hand-edited one is skipped like any other damaged checkpoint. A flag that takes one of a few words
is checked against CHOICES the same way (`check_choices`, which train.py runs on the flags typed
before it reads a model's configs). `check_device` and `check_output_dir` say the same for the
device and the folders a script will write, `check_output_dir` also for a path the operating
system would refuse (too long, or on one of the kernel's virtual file systems).
"""
import difflib
import math
import os
import re
from pathlib import Path

from infra.cli import UserError
from infra.files import check_name, filesystem_problem, probe

SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1: every generator here (torch, NumPy) takes them
MAX_SIDE = 8192  # pixels; beyond any video model's training resolution
MAX_FRAMES = 1024
MAX_SAMPLER_STEPS = 1000  # the noise schedules have 1000 training timesteps; more steps repeat them


def whole(x):
    return isinstance(x, int) and not isinstance(x, bool)


def number(x):
    """A finite int or float (not a bool, not nan or inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# (field, what it must be, the test). The text is formatted with the settings, so a bound that is
# another flag names that flag's value. A field the settings lack or leave at None is not checked.
RULES = [
    ("max_steps", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("batch_size", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("grad_accum", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("max_bad_steps", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("height", f"a whole number from 1 to {MAX_SIDE}", lambda x, c: whole(x) and 1 <= x <= MAX_SIDE),
    ("width", f"a whole number from 1 to {MAX_SIDE}", lambda x, c: whole(x) and 1 <= x <= MAX_SIDE),
    ("frames", f"a whole number from 1 to {MAX_FRAMES}", lambda x, c: whole(x) and 1 <= x <= MAX_FRAMES),
    ("num_steps", f"a whole number from 1 to {MAX_SAMPLER_STEPS}",
     lambda x, c: whole(x) and 1 <= x <= MAX_SAMPLER_STEPS),
    # K = 0 would leave no step with a gradient: nothing to train.
    ("grad_steps", "a whole number from 1 to --num-steps ({num_steps})",
     lambda x, c: whole(x) and 1 <= x <= c.num_steps),
    ("decode_frames", "a whole number from 1 to --frames ({frames})", lambda x, c: x is None or whole(x) and 1 <= x <= c.frames),
    ("guidance", "a finite number >= 0", lambda x, c: number(x) and x >= 0),
    ("lr", "a finite number above 0 and at most 1", lambda x, c: number(x) and 0 < x <= 1),
    ("weight_decay", "a finite number >= 0", lambda x, c: number(x) and x >= 0),
    ("grad_clip", "a finite number above 0", lambda x, c: number(x) and x > 0),
    ("lora_rank", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("lora_alpha", "a finite number above 0", lambda x, c: number(x) and x > 0),
    ("lora_dropout", "a number from 0 up to (not including) 1", lambda x, c: number(x) and 0 <= x < 1),
    ("num_videos", "a whole number >= 1 (the before/after videos)", lambda x, c: whole(x) and x >= 1),
    ("num_prompts", "a whole number >= 0 (0: every prompt)", lambda x, c: whole(x) and x >= 0),
    ("eval_every", "a whole number >= 0 (0: never)", lambda x, c: whole(x) and x >= 0),
    ("eval_videos", "a whole number >= 1 when --eval-every is set",
     lambda x, c: whole(x) and (x >= 1 or not getattr(c, "eval_every", 0))),
    ("save_every", "a whole number >= 0 (0: only at the end)", lambda x, c: whole(x) and x >= 0),
    ("keep_checkpoints", "a whole number >= 0 (0: keep all)", lambda x, c: whole(x) and x >= 0),
    ("seed", f"a whole number from 0 to {SEED_LIMIT - 1}", lambda x, c: whole(x) and 0 <= x < SEED_LIMIT),
    ("seeds", f"whole numbers from 0 to {SEED_LIMIT - 1}",
     lambda x, c: all(whole(s) and 0 <= s < SEED_LIMIT for s in x)),  # bench.py efficiency: one run a seed
    # The toy world's scripts (toy/evaluate.py, toy/pretrain.py, toy/train_judge.py).
    ("repeats", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("steps", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("vae_steps", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("unet_steps", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("batch", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("vae_lr", "a finite number above 0 and at most 1", lambda x, c: number(x) and 0 < x <= 1),
    ("pool", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("samples", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("report_clips", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
    ("report_samples", "a whole number >= 1", lambda x, c: whole(x) and x >= 1),
]

DTYPES = ("auto", "float32", "bfloat16", "float16")  # vader.resolve_dtype's names
# (field, the words it takes, a value that means "none" and is not listed). A word is matched exactly:
# a misspelt one is refused with the choices (and the nearest), before a model or a reward is looked at.
CHOICES = [
    ("dtype", DTYPES, None),
    ("report_to", ("wandb", "tensorboard"), ""),
]


def or_list(words):
    """'a', 'a or b', 'a, b or c'."""
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def check_choices(settings):
    """Raise a UserError for the first flag of `settings` (a Config, a Namespace or a SimpleNamespace of
    the flags typed) that takes one of CHOICES' words and got another."""
    for name, words, none in CHOICES:
        value = getattr(settings, name, None)
        if value is None or value == none or value in words:
            continue
        near = difflib.get_close_matches(str(value).lower(), words, n=1, cutoff=0.6) if isinstance(value, str) else []
        raise UserError(f"--{name.replace('_', '-')} takes {or_list(words)}, got {value!r}"
                        + (f"; did you mean {near[0]}?" if near else ""))


def check_flags(settings):
    """Raise a UserError for the first flag of `settings` (a Config or an argparse Namespace) that
    breaks its rule, or takes a word of CHOICES and got another."""
    check_choices(settings)
    for name, must_be, ok in RULES:
        value = getattr(settings, name, None)
        if value is not None and not ok(value, settings):
            raise UserError(f"--{name.replace('_', '-')} must be {must_be.format(**vars(settings))}, got {value!r}")


def check_device(device):
    """'auto', 'cpu', 'mps', 'cuda' or 'cuda:N' for a GPU that exists; refused before any model is loaded."""
    import torch

    if device in ("auto", "cpu"):
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps: this machine has no Apple GPU that PyTorch can use; pass --device cpu")
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise UserError(f"--device takes auto, cpu, cuda, cuda:N or mps, got {device!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"--device {device}: PyTorch sees no GPU here (a CPU-only build, or no driver); "
                        "pass --device cpu")
    if match[1] is not None and int(match[1]) >= count:
        raise UserError(f"--device {device}: this machine has {count} GPU{'s' * (count > 1)} "
                        f"(cuda:0 to cuda:{count - 1}); pass one of them")


# Room left in a path for what a script writes inside the folder (checkpoints/step-N.tmp/.lora.tmp-...).
ROOM_INSIDE = 128


def check_output_dir(path, flag="--output-dir", room=ROOM_INSIDE):
    """A folder that exists, or can be made, and can be written: refused before any work when its name
    is one the operating system refuses (a part over NAME_MAX bytes; the whole, with `room` for the
    files written inside it, over PATH_MAX), when a part of the path is a file, when the nearest
    existing folder is on one of the kernel's virtual file systems (/proc, /sys), or read-only or not
    ours to write."""
    path = Path(path)
    check_name(path, flag, room=room)
    existing = path
    while probe(existing, flag, follow=False) is None:  # a dangling link stops the walk too
        existing = existing.parent
    if not existing.is_dir():
        what = "a broken link" if existing.is_symlink() and not existing.exists() else "a file"
        raise UserError(f"{flag} {path}: {existing} is {what}, not a folder; choose another {flag}")
    virtual = filesystem_problem(existing)
    if virtual:
        raise UserError(f"{flag} {path}: {existing} {virtual}; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY  # POSIX only
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise UserError(f"{flag} {path}: {existing} {why}; choose another {flag}")


def check_video_shape(model, frames, height, width):
    """UserError unless the model can make a video of this size: height and width multiples of its
    latent grid, and 1 + rk frames when its VAE packs r frames a latent frame after the first."""
    m, r = model.size_multiple, model.temporal_factor
    if height % m or width % m:
        raise UserError(f"--height and --width must be multiples of {m} for this model (its latent grid), "
                        f"got {height}x{width}")
    if (frames - 1) % r:
        k = (frames - 1) // r * r + 1
        raise UserError(f"--frames must be 1 + {r}k for this model (its VAE packs {r} frames a latent frame after "
                        f"the first), got {frames}; try {k} or {k + r}")
