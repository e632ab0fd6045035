"""Align a text-to-video model to a reward with VADER: reward gradients into LoRA weights.

    python train.py --reward aesthetic --prompts animals.txt                  # ModelScope, GPU
    python train.py --model tiny --reward colorfulness --prompts animals.txt --max-steps 30   # CPU
    torchrun --nproc_per_node=4 train.py --reward aesthetic                   # several GPUs
    torchrun --nproc_per_node=4 train.py --model wan-14b --shard              # a model no one GPU holds

`train_step` is one optimizer step of VADER, and `main`'s loop takes them; the run's folder gets
config.json, metrics.csv, reward_curve.png, lora.safetensors, checkpoints/ and videos/.
"""
import argparse
import importlib.util
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from infra.checks import check_device, check_flags, check_output_dir
from infra.cli import UserError, run_cli
from infra.distributed import average_gradients, distributed_env, join_process_group, leave_process_group
from infra.files import read_json, read_prompts
from infra.folder import check_run_folder
from infra.run import Run, make_videos, print_banner
from infra.runlog import find_resume_point
from infra.sharding import check_torch, shard_denoiser
from lora import inject_lora
from models import load_video_model, spec_of
from rewards import load_eval_rewards, load_reward, parse_options, reward_recipe
from sampler import high_noise_steps, pick_grad_steps, sample
from vader import (check_video_shape, decode_random_frames, encode_prompts, frames_for, leaves_in_backward, loss_scaler,
                   noise_share, resolve_device, resolve_dtype, saved_on_cpu, spreads)


def opt(default, help):
    """A config field whose help text is its comment (and the --help line)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every setting of a run. Defaults are VADER's ModelScope settings (2407.08737, its configs).

    Fields left at None take the model's value (models.MODELS): resolution, frames, sampler steps
    and guidance from its registry entry, and training values from its recipe (the tiny and toy
    models' are tuned for a CPU). A flag given on the command line always wins.
    """

    model: str = opt("modelscope", "Video model: a name in models.MODELS, a local diffusers folder, or a hub id.")
    reward: str = opt("aesthetic", "Reward name from rewards.REWARDS, or a weighted sum like aesthetic:1,hps:2.")
    reward_options: str = opt("", "Options for the reward as key=value pairs separated by commas.")
    prompts: str = opt("animals.txt", "Training prompts: a file path or a file name under prompts/.")
    output_dir: str = opt("", "Run folder; empty means runs/<model>-<reward>.")
    height: int = opt(None, "Video height in pixels (None: the model's).")
    width: int = opt(None, "Video width in pixels (None: the model's).")
    frames: int = opt(None, "Frames per video, F (None: the model's).")
    num_steps: int = opt(None, "Sampler steps N, DDIM or Euler (None: the model's; VADER uses 25).")
    guidance: float = opt(None, "Classifier-free guidance weight (None: the model's; VADER uses 9).")
    grad_steps: int = opt(1, "K, the last sampler steps that keep gradients (VADER: 1).")
    random_grad_steps: bool = opt(False, "Draw K afresh each step, uniformly from 1..--grad-steps (AlignProp's "
                                                 "randomised truncation); with --grad-steps 1 it changes nothing.")
    decode_frames: int = opt(None, "f, how many of the F frames the VAE decodes for the reward: random ones each step "
                                   "(None: 1), or for a reward that watches the clip at its own frame rate "
                                   "(videoreward) frames spread over it (None: as many as that rate gives).")
    max_steps: int = opt(200, "Optimizer steps to train for.")
    batch_size: int = opt(1, "Videos per micro-batch on each process (VADER: 1).")
    grad_accum: int = opt(16, "Micro-batches per optimizer step (VADER: 16).")
    lr: float = opt(2e-4, "AdamW learning rate (VADER: 2e-4).")
    weight_decay: float = opt(1e-2, "AdamW weight decay (PyTorch's default).")
    grad_clip: float = opt(1.0, "Clip the LoRA gradients' global norm to this (VADER: 1.0).")
    lora_rank: int = opt(16, "LoRA rank r (VADER: 16).")
    lora_alpha: float = opt(None, "LoRA alpha; the update is scaled by alpha / r (None: alpha = r).")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.")
    num_videos: int = opt(4, "Prompts shown in the before/after videos (the first ones of the file).")
    eval_every: int = opt(0, "Score held-out prompts every this many steps, and at the start and end (0: never).")
    eval_prompts: str = opt("", "Held-out prompts file; empty: hold out the last tenth of --prompts.")
    eval_videos: int = opt(4, "Held-out videos at each evaluation: video i is prompt i (cycling) with seed i.")
    eval_rewards: str = opt("dynamics", "More rewards that score the held-out videos, each in its own metrics.csv "
                                        "column and panel of the curve (e.g. aesthetic,pickscore,dynamics); never trained on.")
    save_every: int = opt(0, "Save a checkpoint every this many steps (0: only at the end).")
    keep_checkpoints: int = opt(3, "Keep only the newest this many checkpoints (0: keep all).")
    max_bad_steps: int = opt(3, "Stop after this many steps in a row with a non-finite loss or gradient.")
    report_to: str = opt("", "Also log to 'wandb' or 'tensorboard' (imported only when asked for).")
    seed: int = opt(0, "Seed for the noise, the prompt order and K.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ... (under torchrun: each process its own GPU).")
    dtype: str = opt("auto", "Frozen model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
    low_memory: bool = opt(False, "Trade speed for memory: checkpoint each grad step's denoiser calls, decode frame by frame, "
                                  "offload saved activations to CPU (vader.py: Precision and memory).")
    resume: str = opt("", "Continue a run: --resume alone uses --output-dir; or give a run folder or a checkpoint.")
    overwrite: bool = opt(False, "Replace the run already in --output-dir.")
    shard: bool = opt(False, "Under torchrun, split the frozen denoiser across the processes with FSDP2 instead of "
                             "copying it to each (for models one GPU cannot hold, e.g. wan-14b); checkpoints are "
                             "then written sharded. On one process it trains the same.")


GENERATION = ("height", "width", "frames", "num_steps", "guidance")  # defaults come from the registry entry
LOCKED = ("model", "height", "width", "frames", "lora_rank", "lora_alpha", "lora_dropout")  # fixed by a run
LOWER_MEMORY = ("--decode-frames 1, --grad-steps 1, a smaller --height/--width or --frames, "
                "--batch-size 1 with a larger --grad-accum")


def parse_config(argv=None):
    """Build the Config once: dataclass defaults < the model's registry entry and recipe < the reward's
    recipe < a resumed run's own settings < typed flags. Returns (cfg, the flags typed)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:  # --flag and --no-flag: a model's recipe may turn one on (Wan: --low-memory)
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        elif f.name == "resume":
            p.add_argument(flag, nargs="?", const="latest", metavar="PATH", help=help)
        else:
            p.add_argument(flag, type=f.type, metavar=f.type.__name__.upper(), help=help)
    given = vars(p.parse_args(argv))  # only the flags actually typed
    spec = spec_of(given.get("model", Config.model))  # a folder's or hub id's family and size are read off its configs
    defaults = {**{k: getattr(spec, k) for k in GENERATION}, **spec.recipe}
    defaults.update(reward_recipe(given.get("reward", defaults.get("reward", Config.reward))))
    cfg = Config(**{**defaults, **given})
    cfg.output_dir = cfg.output_dir or f"runs/{Path(cfg.model).name}-{cfg.reward.replace(':', '').replace(',', '+')}"
    if not cfg.resume:
        return cfg, given
    run_dir, ckpt = find_resume_point(cfg.output_dir if cfg.resume == "latest" else cfg.resume, checkpoint_config)
    old = asdict(checkpoint_config(read_json(ckpt / "config.json", "checkpoint config")))
    for k in LOCKED:
        if k in given and given[k] != old[k]:
            raise UserError(f"--resume cannot change --{k.replace('_', '-')} (the run has {old[k]}); "
                            "start a new run with another --output-dir")
    for k, v in given.items():
        if k in old and old[k] != v and k != "resume":
            print(f"resume: {k} {old[k]} -> {v}")
    return Config(**{**old, **given, "output_dir": str(run_dir), "resume": str(ckpt), "overwrite": False}), given


def fits(value, f):
    """Whether a config.json value fits the Config field `f`: a bool for a bool, a whole number for
    an int, any number for a float, a string for a str; None only for lora_alpha (alpha = r)."""
    if value is None or isinstance(value, bool):
        return value is None and f.name == "lora_alpha" or isinstance(value, bool) and f.type is bool
    return isinstance(value, (int, float) if f.type is float else f.type)


def checkpoint_config(values):
    """A checkpoint's config.json as a Config: the LOCKED fields present, every field of its type and
    within its rule (a newer or older version's extra fields are dropped)."""
    known = {f.name: f for f in fields(Config)}
    for k in LOCKED:
        if k not in values:
            raise UserError(f"it lacks the field {k!r}")
    for k, v in values.items():
        if k in known and not fits(v, known[k]):
            raise UserError(f"its {k} is {v!r}, not a {known[k].type.__name__} value")
    cfg = Config(**{k: v for k, v in values.items() if k in known})
    check_flags(cfg)
    return cfg


def validate(cfg):
    """Check every setting (infra/checks.py), the device and the output folder; raise UserError naming
    the flag. Runs before anything is loaded or written."""
    check_flags(cfg)
    check_device(cfg.device)
    if cfg.report_to not in ("", "wandb", "tensorboard"):
        raise UserError(f"--report-to takes wandb or tensorboard, got {cfg.report_to!r}")
    if cfg.report_to and importlib.util.find_spec(cfg.report_to) is None:
        raise UserError(f"--report-to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to}")
    if cfg.shard:
        check_torch()
    check_output_dir(cfg.output_dir)
    check_run_folder(cfg.output_dir, cfg.resume, cfg.overwrite)


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


def load_models(cfg, device, dtype, sharding=False):
    """The reward (checked against --decode-frames), the evaluation rewards and the video model;
    with `sharding` (--shard on several processes) its denoiser stays in CPU memory until it is sharded."""
    reward_fn = load_reward(cfg.reward, device=device, dtype=dtype, **parse_options(cfg.reward_options))
    if cfg.low_memory:
        reward_fn = leaves_in_backward(reward_fn, device)
    eval_fns = load_eval_rewards(cfg.eval_rewards, device, dtype, build=bool(cfg.eval_every))
    if cfg.decode_frames is None:  # resolved here, so config.json records the number
        cfg.decode_frames = frames_for(reward_fn, cfg.frames, spec_of(cfg.model).fps)
    if cfg.decode_frames < reward_fn.min_frames:
        raise UserError(f"the {cfg.reward} reward needs --decode-frames {reward_fn.min_frames} or more")
    model = load_video_model(cfg.model, "cpu" if sharding else device, dtype)
    if sharding:
        model.vae.to(device)
        model.device = device
    check_video_shape(model, cfg.frames, cfg.height, cfg.width)
    low = cfg.num_steps - high_noise_steps(model.schedule, cfg.num_steps, model.high_noise)
    if cfg.grad_steps > low:  # Wan2.2 A14B: K must stay within the low-noise expert's steps (sampler.sample)
        raise UserError(f"--grad-steps {cfg.grad_steps} reaches into the high-noise expert's steps, which carry no "
                        f"LoRA: only the last {low} of the {cfg.num_steps} steps are the trained expert's; use "
                        f"--grad-steps {low} or less")
    return reward_fn, eval_fns, model


#### One optimizer step of VADER

def train_step(model, reward_fn, params, optimizer, scaler, draw_batch, uncond, cfg, generator, k, shard=(0, 1)):
    """Sample with gradients through the last k steps, decode f frames, score them, and ascend the reward.

    For each of `cfg.grad_accum` micro-batches `draw_batch()` gives (B prompts, their cached
    embeddings (B, L, D)); the loss -mean(r) is VADER's "-r" form. The LoRA gradients (`params`)
    are averaged over processes under torchrun, unscaled (fp16), clipped to `cfg.grad_clip`, and
    AdamW steps, unless the loss or the gradient is not finite: such an update would poison
    AdamW's moments for good, so it is skipped; a step that leaves a LoRA weight non-finite is undone. Returns (loss, rewards (grad_accum * B,),
    gradient norm before clipping, finite). The benchmarks time and simulate this very function.
    """
    optimizer.zero_grad(set_to_none=True)
    rewards, loss_sum = [], 0.0
    for _ in range(cfg.grad_accum):
        prompts, cond = draw_batch()
        with saved_on_cpu(cfg.low_memory, cond.device):
            z_T = noise_share(model, len(prompts), cfg, generator, cond.device, shard)  # (B, C, F_lat, h, w)
            z0 = sample(model.unet, z_T, cond, uncond, model.schedule, cfg.num_steps, cfg.guidance, k,
                        checkpoint_steps=cfg.low_memory,
                        high_noise=model.high_noise)  # (B, C, F_lat, h, w): a graph through the last k steps only
            frames = decode_random_frames(model, z0, cfg.frames, cfg.decode_frames, generator, cfg.low_memory,
                                          spread=spreads(reward_fn))  # (B, f, 3, H, W)
            r = reward_fn(frames, prompts).float()  # (B,)
        loss = -r.mean()
        scaler.scale(loss / cfg.grad_accum).backward()  # fp16: scaled up; the mean over micro-batches
        rewards.append(r.detach())
        loss_sum += loss.item() / cfg.grad_accum
    loss = average_gradients(params, loss_sum, shard[1])  # DDP's all-reduce (FSDP2's was done in backward)
    scaler.unscale_(optimizer)  # fp16: divide the gradients by the loss scale before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    finite = math.isfinite(loss) and torch.isfinite(grad_norm).item()
    if finite:
        before = [p.detach().clone() for p in params]  # after backward, so no addition to the peak
        scaler.step(optimizer)
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all().item()
        if not finite:  # a finite gradient times a huge learning rate: undo the step, count it as bad
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)
    scaler.update()  # fp16: halve the loss scale after an overflow, grow it after many clean steps
    return loss, torch.cat(rewards), grad_norm.item(), finite


#### Main

def main(argv=None):
    cfg, given = parse_config(argv)
    validate(cfg)
    prompts, held_out = split_prompts(cfg)
    rank, world, device = distributed_env(resolve_device(cfg.device))
    # The folder is claimed, and Ctrl-C and SIGTERM caught, from before the models load to the end:
    # a stop ends at the next step boundary with a checkpoint (or, while loading, with nothing written).
    with Run(cfg, Path(cfg.output_dir), rank, world, device) as run:
        dtype = resolve_dtype(cfg.dtype, device)
        sharding = cfg.shard and world > 1  # FSDP2: each process keeps 1/world of every weight (infra/sharding.py)
        reward_fn, eval_fns, model = load_models(cfg, device, dtype, sharding)
        join_process_group(world, device)

        # Text embeddings once per prompt, in one call; the text encoder is not needed again, and
        # leaves host memory too.
        cond, held_cond, uncond = encode_prompts(model, prompts + held_out + [""]).split(
            [len(prompts), len(held_out), 1])  # (P, L, D), (P_eval, L, D), (1, L, D)
        model.text_encoder = None
        torch.manual_seed(cfg.seed)  # LoRA's random A: the same on every process and in every run of this seed
        params = inject_lora(model.unet, cfg.lora_rank, cfg.lora_alpha, targets=model.spec.lora_targets,
                             dropout=cfg.lora_dropout)
        if sharding:
            params = shard_denoiser(model, world, device)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = loss_scaler(dtype, device)  # dynamic loss scaling for an fp16 base; does nothing for bf16/fp32
        generator = torch.Generator().manual_seed(cfg.seed)  # noise, prompt order, K and decoded frames

        def draw_batch():
            """This process's share of one global micro-batch of prompts, drawn from the run's generator."""
            idx = torch.randint(len(prompts), (cfg.batch_size * world,), generator=generator)
            idx = idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            return [prompts[i] for i in idx], cond[idx.to(cond.device)]  # B strings, (B, L, D)

        def videos(name, n, scored):
            """n videos of the training prompts (before/after) or, scored, of the held-out ones."""
            which = (held_out, held_cond, reward_fn, eval_fns) if scored else (prompts, cond, None, None)
            return make_videos(model, cfg, which[0], which[1], uncond, run.out / "videos" / name, n, *which[2:],
                               write=run.main)

        step = run.start(model, optimizer, generator, videos, params,
                         lambda params: print_banner(cfg, model, dtype, device, world, prompts, held_out, params,
                                                         spreads(reward_fn)))

        #### Training loop
        while step < cfg.max_steps and not run.stopped():
            t0 = time.time()
            k = pick_grad_steps(cfg.num_steps, cfg.grad_steps, cfg.random_grad_steps, generator)
            try:
                loss, rewards, grad_norm, finite = train_step(model, reward_fn, params, optimizer, scaler, draw_batch,
                                                              uncond, cfg, generator, k, (rank, world))
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"out of GPU memory at {cfg.frames}x{cfg.height}x{cfg.width}; lower it with "
                                f"{LOWER_MEMORY}") from None
            step += 1
            run.record(step, loss, rewards, grad_norm, k, finite, seconds=time.time() - t0)
        run.finish(step, [prompts[i % len(prompts)] for i in range(cfg.num_videos)])
    leave_process_group(world)


if __name__ == "__main__":
    run_cli(main)
