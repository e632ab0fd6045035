"""What train.py's `main` needs before its loop, kept out of the lesson: the config's layers and
resume, every setting checked, the prompts split, the rewards loaded, the model checked against the run,
and each process's share of a batch.

Each check runs before the work it guards (a typo costs a second, not a download), and each
refusal is one `UserError` line naming the flag and the fix.
"""
import argparse
import importlib.util
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

import torch

from infra.checks import check_choices, check_device, check_flags, check_output_dir, check_video_shape
from infra.cli import UserError
from infra.files import check_name, probe, read_json, read_prompts
from infra.folder import check_run_folder
from infra.frames import default_decode_frames
from infra.offload import reward_leaves_in_backward
from infra.runlog import find_resume_point
from infra.sharding import check_torch

GENERATION = ("height", "width", "frames", "num_steps", "guidance", "negative_prompt")  # defaults: the registry entry's
LOCKED = ("model", "height", "width", "frames", "lora_rank", "lora_alpha", "lora_dropout")  # fixed by a run
LOWER_MEMORY = ("--decode-frames 1, --grad-steps 1, a smaller --height/--width or --frames, "
                "--batch-size 1 with a larger --grad-accum")


#### The command line and the config's layers

# diffusers' training scripts' names for our settings (train_text_to_image_lora.py and the like):
# flag -> (field, {their word: ours} or None when the value is ours as it is). --seed, --output_dir and
# --report_to are ours already, under their underscore spelling.
DIFFUSERS_FLAGS = {
    "max_train_steps": ("max_steps", None),
    "learning_rate": ("lr", None),
    "gradient_accumulation_steps": ("grad_accum", None),
    "train_batch_size": ("batch_size", None),
    "resume_from_checkpoint": ("resume", None),  # their "latest" is our bare --resume
    "mixed_precision": ("dtype", {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}),
    "rank": ("lora_rank", None),
    "checkpointing_steps": ("save_every", None),
    "checkpoints_total_limit": ("keep_checkpoints", None),
    "max_grad_norm": ("grad_clip", None),
    "adam_weight_decay": ("weight_decay", None),
}
FROM_FILE_IGNORED = ("output_dir", "resume", "overwrite")  # a --config FILE's: only typed ones count


def parse_flags(config_class, argv, description):
    """{field: value} of the flags typed (only those), from an argparse built on the config's fields,
    with "config": FILE when --config is typed; `--help` prints each default. Each flag also takes its
    underscore spelling (--max_steps), and diffusers' names (DIFFUSERS_FLAGS) reach their fields here,
    so a typed one wins over every layer as ours does; two spellings of one setting that disagree are
    refused in one line."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                epilog="A model's registry entry may bring other defaults (its recipe, printed at "
                                       "start-up), and a reward may too (videoreward); --config FILE's fields "
                                       "(a run's config.json) sit above those; a flag you type always wins. Every "
                                       "flag also takes its underscore spelling (--max_steps, --no_low_memory), "
                                       "and diffusers' training scripts' names work too: " + ", ".join(
                                           f"--{k} (= --{v.replace('_', '-')})"
                                           for k, (v, _) in DIFFUSERS_FLAGS.items())
                                       + "; --mixed_precision no/fp16/bf16 is --dtype float32/float16/bfloat16, "
                                         "--resume_from_checkpoint latest is a bare --resume.")
    known = {f.name: f for f in fields(config_class)}
    for f in known.values():
        flag, default = "--" + f.name.replace("_", "-"), f.default
        shown = "the model's" if f.name in GENERATION else (None if default in ("", None) else repr(default))
        help = (f.metadata["help"] + (f" [default: {shown}]" if shown else "")).replace("%", "%%")
        if f.type is bool:  # --flag and --no-flag: a model's recipe may turn one on (Wan: --low-memory)
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        elif f.name == "resume":
            p.add_argument(flag, nargs="?", const="latest", metavar="PATH", help=help)
        else:
            p.add_argument(flag, type=f.type, metavar=f.type.__name__.upper(), help=help)
    p.add_argument("--config", metavar="FILE", help="A run's config.json (or any JSON object of these fields) as the "
                   "defaults under the flags typed; its output_dir, resume and overwrite are ignored (type them).")
    aliases = {f"--{f.name}": (f.name, None) for f in known.values() if "_" in f.name}
    aliases.update({f"--{k}": v for k, v in DIFFUSERS_FLAGS.items()})
    for alias, (name, words) in aliases.items():  # each to a dest of its own, so disagreeing ones are seen
        f, dest = known[name], f"{name}|{alias}"
        if f.type is bool:
            p.add_argument(alias, dest=dest, action="store_const", const=True, help=argparse.SUPPRESS)
            p.add_argument(f"--no_{alias[2:]}", dest=dest, action="store_const", const=False, help=argparse.SUPPRESS)
        elif name == "resume":
            p.add_argument(alias, dest=dest, nargs="?", const="latest", help=argparse.SUPPRESS)
        else:
            p.add_argument(alias, dest=dest, type=f.type, choices=words and list(words), help=argparse.SUPPRESS)
    typed, spelt = {}, {}  # field -> value, field -> the spellings typed and their values
    for dest, value in vars(p.parse_args(argv)).items():
        name, _, alias = dest.partition("|")
        words = aliases.get(alias, (None, None))[1]
        typed[name] = words[value] if words else value
        spelt.setdefault(name, []).append((alias or "--" + name.replace("_", "-"), value, typed[name]))
    for name, said in spelt.items():
        if len({repr(v) for _, _, v in said}) > 1:
            a, b = (as_typed(flag, v) for flag, v, _ in said[:2])
            raise UserError(f"{a} and {b} are two spellings of one setting with different values; pass one")
    check_choices(SimpleNamespace(**typed))  # a misspelt word costs a second, before a model's configs are read
    return typed


def hyphenated(argv):
    """argv (None: the command line's) with each flag's underscores as hyphens, --num_prompts as --num-prompts,
    for a parser whose flags are all hyphenated (sample.py); a value, and all after a bare --, stays as typed."""
    import sys

    argv, out = list(sys.argv[1:] if argv is None else argv), []
    for i, a in enumerate(argv):
        if a == "--":
            return out + argv[i:]
        name, eq, value = a.partition("=")
        out.append(name.replace("_", "-") + eq + value if a.startswith("--") else a)
    return out


def as_typed(flag, value):
    """How a flag with this value is typed: --lr 0.001, --low-memory, --no-low-memory, --no_low_memory."""
    if not isinstance(value, bool):
        return f"{flag} {value}"
    return flag if value else f"--no{'_' if '_' in flag else '-'}{flag[2:]}"


def read_config_file(path, config_class):
    """--config FILE: {field: value} of a JSON object of the config's fields (a run's config.json), each of
    its field's type as a checkpoint's config must be (`fits`); an unknown field is refused by name. Its
    FROM_FILE_IGNORED fields are dropped: a rerun never writes into the old run's folder unless told to.
    The rules (check_flags) are checked once it sits on its defaults (`check_config_file`)."""
    values = read_json(path, "--config", fix="pass a run's config.json or a JSON object of train.py's fields")
    known = {f.name: f for f in fields(config_class)}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise UserError(f"--config {path}: unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}"
                        "; it takes train.py's options, spelt as in config.json (e.g. max_steps)")
    for k, v in values.items():
        if not fits(v, known[k]):
            raise UserError(f"--config {path}: its {k} is {v!r}, not a {known[k].type.__name__} value")
    return {k: v for k, v in values.items() if k not in FROM_FILE_IGNORED}


def check_config_file(path, cfg):
    """--config FILE's fields on the defaults beneath them (`cfg`), checked by the rules a checkpoint's
    config is (check_flags and the reward's spec); a refusal names the file."""
    try:
        check_flags(cfg)
        check_reward_spec(cfg)
    except UserError as e:
        raise UserError(f"--config {path}: {e}") from None


def fits(value, f):
    """Whether a config.json value fits the Config field `f`: a bool for a bool, a whole number for
    an int, any number for a float, a string for a str; None only for lora_alpha (alpha = r)."""
    if value is None or isinstance(value, bool):
        return value is None and f.name == "lora_alpha" or isinstance(value, bool) and f.type is bool
    return isinstance(value, (int, float) if f.type is float else f.type)


def checkpoint_config(values, config_class):
    """A checkpoint's config.json as a Config: the LOCKED fields present, every field of its type and
    within its rule (a newer or older version's extra fields are dropped)."""
    known = {f.name: f for f in fields(config_class)}
    for k in LOCKED:
        if k not in values:
            raise UserError(f"it lacks the field {k!r}")
    for k, v in values.items():
        if k in known and not fits(v, known[k]):
            raise UserError(f"its {k} is {v!r}, not a {known[k].type.__name__} value")
    cfg = config_class(**{k: v for k, v in values.items() if k in known})
    check_flags(cfg)
    check_reward_spec(cfg)
    return cfg


def resumed(cfg, given):
    """--resume: the run's own settings from its newest intact checkpoint, under the flags typed now
    (which may not change a LOCKED field)."""
    config_class = type(cfg)
    check = lambda values: checkpoint_config(values, config_class)  # noqa: E731
    target = cfg.output_dir if cfg.resume == "latest" else cfg.resume
    fix = "pass a run folder or one of its checkpoints/step-N"
    check_name(target, "--resume", fix)  # a path the operating system refuses: one line, before it is looked in
    for folder in (Path(target), Path(target) / "checkpoints"):
        probe(folder, "--resume", fix)
    run_dir, ckpt = find_resume_point(target, check)
    values = read_json(ckpt / "config.json", "checkpoint config")
    old = asdict(check({"negative_prompt": "", **values}))  # a run from before --negative-prompt had the empty one
    for k in LOCKED:
        if k in given and given[k] != old[k]:
            raise UserError(f"--resume cannot change --{k.replace('_', '-')} (the run has {old[k]}); "
                            "start a new run with another --output-dir")
    for k, v in given.items():
        if k in old and old[k] != v and k != "resume":
            print(f"resume: {k} {old[k]} -> {v}")
    return config_class(**{**old, **given, "output_dir": str(run_dir), "resume": str(ckpt), "overwrite": False})


#### Checks before anything loads

def check_settings(cfg):
    """Every setting (infra/checks.py), the device and the output folder; a UserError names the flag."""
    check_reward_spec(cfg)
    check_flags(cfg)  # its CHOICES too: --dtype, --report-to
    check_device(cfg.device)
    check_output_dir(cfg.output_dir)
    if cfg.report_to and importlib.util.find_spec(cfg.report_to) is None:
        raise UserError(f"--report-to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to}")
    if cfg.shard:
        check_torch()
    check_run_folder(cfg.output_dir, cfg.resume, cfg.overwrite)


def check_reward_spec(cfg):
    """--reward's weights and --reward-options' values parsed (a weight or number must be finite), before
    the folder is claimed; the names and options are checked against the rewards as they are built."""
    from rewards import parse_options, parse_reward_spec

    parse_reward_spec(cfg.reward)
    parse_options(cfg.reward_options)


def split_prompts(cfg):
    """(training prompts, held-out prompts): --eval-prompts, or the last tenth of --prompts under --eval-every."""
    prompts = read_prompts(cfg.prompts)
    held_out = read_prompts(cfg.eval_prompts) if cfg.eval_prompts else []
    if cfg.eval_every and not held_out:
        if len(prompts) < 2:
            raise UserError("--eval-every needs held-out prompts: pass --eval-prompts or at least 2 --prompts")
        cut = len(prompts) - max(1, len(prompts) // 10)  # hold out the last tenth
        prompts, held_out = prompts[:cut], prompts[cut:]
    return prompts, held_out


def check_model_settings(model, cfg):
    """The run's video against the model: its size, and for two experts K and the guidance."""
    check_video_shape(model, cfg.frames, cfg.height, cfg.width)
    experts = model.denoiser if model.denoiser is not model.unet else None
    if experts is None:
        return
    low = cfg.num_steps - experts.steps(model.schedule, cfg.num_steps)
    if low < 1:  # the sampler ends with the trained expert, which also brings it back to the device
        raise UserError(f"--num-steps {cfg.num_steps} leaves no step to the low-noise expert; pass more --num-steps")
    if cfg.grad_steps > low:  # Wan2.2 A14B: K must stay within the low-noise expert's steps (wan.TwoExperts)
        raise UserError(f"--grad-steps {cfg.grad_steps} reaches into the high-noise expert's steps, which carry no "
                        f"LoRA: only the last {low} of the {cfg.num_steps} steps are the trained expert's; use "
                        f"--grad-steps {low} or less")
    if cfg.guidance == 1.0:
        raise UserError("--guidance 1 skips the unconditional pass that the high-noise expert's own guidance needs "
                        "(wan.TwoExperts); pass another --guidance")


def load_rewards(cfg, device, dtype, fps):
    """The reward (under --low-memory it leaves the device during backward) and the evaluation rewards;
    --decode-frames resolved for a video made at `fps` (so config.json records the number) and checked
    against the reward."""
    from rewards import load_eval_rewards, load_reward, parse_options

    reward_fn = load_reward(cfg.reward, device=device, dtype=dtype, **parse_options(cfg.reward_options))
    if cfg.low_memory:
        reward_fn = reward_leaves_in_backward(reward_fn, device)
    eval_fns = load_eval_rewards(cfg.eval_rewards, device, dtype, build=bool(cfg.eval_every))
    if cfg.decode_frames is None:
        cfg.decode_frames = default_decode_frames(reward_fn, cfg.frames, fps)
    if cfg.decode_frames < reward_fn.min_frames:
        raise UserError(f"the {cfg.reward} reward needs --decode-frames {reward_fn.min_frames} or more")
    return reward_fn, eval_fns


class OutOfMemory(UserError):
    """A run that ran out of memory: the user's to fix with a smaller setting."""


def is_out_of_memory(e):
    """Whether an exception is a failed allocation: a GPU's (torch.OutOfMemoryError, which
    torch.cuda.OutOfMemoryError is), the CPU's (a RuntimeError from DefaultCPUAllocator, or
    torch.OutOfMemoryError on newer torch), Apple's MPS, or Python's MemoryError."""
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError, MemoryError) if k)
    if isinstance(e, OutOfMemory) or isinstance(e, kinds):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def out_of_memory(cfg, device="cuda", where="", then=""):
    """The UserError for a run that ran out of memory (of the GPU, or of the CPU: RAM) `where` it did,
    with `then`, how to go on once a setting is lowered."""
    kind = "CPU memory (RAM)" if str(device).startswith("cpu") else "GPU memory"
    return OutOfMemory(f"out of {kind} at {cfg.frames}x{cfg.height}x{cfg.width}{f' {where}' if where else ''}; "
                       f"lower it with {LOWER_MEMORY}{f'; {then}' if then else ''}")


#### Each process's share of a batch

def batch_drawer(model, cfg, prompts, cond, generator, rank=0, world=1):
    """draw_batch() -> (B prompts, their embeddings (B, L, D), their noise z_T (B, C, F_lat, h, w)).

    Under torchrun every process draws the prompts and the noise of the whole global batch
    (world * B videos) from the same generator and keeps its own B, so N processes compute
    exactly what one process with N * B videos would, and every generator stays in step.
    """
    from vader import initial_noise

    b = cfg.batch_size

    def draw_batch():  # `cond` may wait in host memory (infra/prompt_store.py): only the B rows drawn move
        idx = torch.randint(len(prompts), (b * world,), generator=generator)[rank * b:(rank + 1) * b]
        z_T = initial_noise(model, b * world, cfg.frames, cfg.height, cfg.width, generator, model.device)
        rows = cond[idx.to(cond.device)].to(model.device, non_blocking=True)  # (B, L, D)
        return [prompts[i] for i in idx], rows, z_T[rank * b:(rank + 1) * b]

    return draw_batch
