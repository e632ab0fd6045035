"""Align a text-to-video model to a reward with VADER: reward gradients into LoRA weights.

    python train.py --reward aesthetic --prompts animals.txt                  # ModelScope, GPU
    python train.py --model tiny --reward colorfulness --prompts animals.txt --max-steps 30   # CPU
    torchrun --nproc_per_node=4 train.py --reward aesthetic                   # several GPUs

One optimizer step: for each of `grad_accum` micro-batches, sample `batch_size` prompts, run
the sampler (DDIM, or flow-matching Euler for Wan) with gradients through the last K steps, decode f frames, score them, backpropagate
-mean(reward); then clip the LoRA gradients and take an AdamW step. The run's folder gets
config.json, metrics.csv, reward_curve.png, lora.safetensors, checkpoints/ and videos/.
"""
import argparse
import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from infra.cli import UserError, run_cli, stop_signals
from infra.distributed import all_average, all_gather, distributed_env, join_process_group
from infra.files import atomic_write_text, read_json, read_prompts
from infra.runlog import (METRICS, eval_columns, eval_summary, find_resume_point, metrics_text, open_tracker,
                          plot_rewards, restore, save_checkpoint, tidy_run_folder)
from infra.video import tile, write_video
from lora import inject_lora, save_lora
from models import MODELS, describe, load_video_model, resolve_device, resolve_dtype
from rewards import load_eval_rewards, load_reward, parse_options
from sampler import pick_grad_steps
from vader import check_video_shape, encode_prompts, frame_pool, generate, loss_scaler, train_step


def opt(default, help):
    """A config field whose help text is its comment (and the --help line)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every setting of a run. Defaults are VADER's ModelScope settings (2407.08737, its configs).

    Fields left at None take the model's value (models.MODELS): resolution, frames, sampler steps
    and guidance from its spec, and training values from its recipe (the tiny model's are
    tuned for a CPU). A flag given on the command line always wins.
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
    random_grad_steps: bool = opt(False, "Draw K uniformly from 1..K afresh every step (VADER's rand mode).")
    decode_frames: int = opt(1, "f, how many of the F frames the VAE decodes for the reward (random each step).")
    max_steps: int = opt(200, "Optimizer steps to train for.")
    batch_size: int = opt(1, "Videos per micro-batch on each process (VADER: 1 on a 24 GB GPU).")
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
    low_memory: bool = opt(False, "Trade speed for memory: checkpoint whole grad steps, decode frame by frame, "
                                  "offload saved activations to CPU (vader.py: Precision and memory).")
    resume: str = opt("", "Continue a run: --resume alone uses --output-dir; or give a run folder or a checkpoint.")
    overwrite: bool = opt(False, "Replace the run already in --output-dir.")


GENERATION = ("height", "width", "frames", "num_steps", "guidance")  # defaults come from the model spec
LOCKED = ("model", "height", "width", "frames", "lora_rank", "lora_alpha", "lora_dropout")  # fixed by a run
RUN_FILES = ("config.json", "metrics.csv", "reward_curve.png", "lora.safetensors", "checkpoints", "videos")
LOWER_MEMORY = ("--decode-frames 1, --grad-steps 1, a smaller --height/--width or --frames, "
                "--batch-size 1 with a larger --grad-accum")


def parse_config(argv=None):
    """Build the Config: dataclass defaults < model spec and recipe < resumed run < typed flags."""
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
    cfg = Config(**given)
    if cfg.model in MODELS:
        spec = MODELS[cfg.model]
        for k in GENERATION:
            if given.get(k) is None:
                setattr(cfg, k, getattr(spec, k))
        for k, v in spec.recipe.items():
            if k not in given:
                setattr(cfg, k, v)
    cfg.output_dir = cfg.output_dir or f"runs/{Path(cfg.model).name}-{cfg.reward.replace(':', '').replace(',', '+')}"
    if cfg.resume:
        run_dir, ckpt = find_resume_point(cfg.output_dir if cfg.resume == "latest" else cfg.resume, LOCKED)
        known = {f.name for f in fields(Config)}  # a newer or older version's extra fields are dropped
        old = {k: v for k, v in read_json(ckpt / "config.json", "checkpoint config", LOCKED).items() if k in known}
        for k in LOCKED:
            if k in given and given[k] != old[k]:
                raise UserError(f"--resume cannot change --{k.replace('_', '-')} (the run has {old[k]}); "
                                "start a new run with another --output-dir")
        changed = {k: (old[k], v) for k, v in given.items() if k in old and old[k] != v and k not in ("resume",)}
        cfg = Config(**{**old, **given, "output_dir": str(run_dir), "resume": str(ckpt), "overwrite": False})
        for k, (a, b) in changed.items():
            print(f"resume: {k} {a} -> {b}")
    return cfg, given


def validate(cfg, model=None):
    """Check the settings; raise UserError naming the flag. Runs before anything is written."""
    for k in ("max_steps", "batch_size", "grad_accum", "lora_rank", "num_steps", "frames", "height", "width",
              "max_bad_steps"):
        if getattr(cfg, k) is not None and getattr(cfg, k) < 1:  # None: the model's value, known after loading
            raise UserError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(cfg, k)}")
    if cfg.num_steps is not None and not 0 <= cfg.grad_steps <= cfg.num_steps:
        raise UserError(f"--grad-steps must be between 0 and --num-steps ({cfg.num_steps}), got {cfg.grad_steps}")
    if cfg.frames is not None and not 1 <= cfg.decode_frames <= cfg.frames:
        raise UserError(f"--decode-frames must be between 1 and --frames ({cfg.frames}), got {cfg.decode_frames}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.report_to not in ("", "wandb", "tensorboard"):
        raise UserError(f"--report-to takes wandb or tensorboard, got {cfg.report_to!r}")
    needs = {"wandb": "wandb", "tensorboard": "tensorboard"}.get(cfg.report_to)
    if needs and importlib.util.find_spec(needs) is None:
        raise UserError(f"--report-to {cfg.report_to} needs the {needs} package: pip install {needs}")
    out = Path(cfg.output_dir)
    if out.is_dir() and any((out / n).exists() for n in RUN_FILES) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                        "or another --output-dir")
    if model is not None:
        check_video_shape(model, cfg.frames, cfg.height, cfg.width)


#### Helpers of main

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


def load_models(cfg, given, device, dtype):
    """The reward, the evaluation rewards and the video model. A local folder or hub id's
    generation defaults (height, frames, ...) and its family's recipe are known only once it is
    loaded, so they fill `cfg` here (flags typed in `given`, and a resumed run's own settings,
    still win) and are checked."""
    reward_fn = load_reward(cfg.reward, device=device, dtype=dtype, **parse_options(cfg.reward_options))
    eval_fns = load_eval_rewards(cfg.eval_rewards, device, dtype, build=bool(cfg.eval_every))
    if cfg.decode_frames < reward_fn.min_frames:
        raise UserError(f"the {cfg.reward} reward needs --decode-frames {reward_fn.min_frames} or more")
    model = load_video_model(cfg.model, device, dtype)
    for k in GENERATION:
        if getattr(cfg, k) is None:
            setattr(cfg, k, getattr(model.spec, k))
    if cfg.model not in MODELS and not cfg.resume:
        for k, v in model.spec.recipe.items():
            if k not in given:
                setattr(cfg, k, v)
    validate(cfg, model)
    return reward_fn, eval_fns, model


def print_banner(cfg, model, dtype, device, world, prompts, held_out, params):
    """The derived numbers of the run, printed once at start-up."""
    print(f"model {cfg.model}: {cfg.frames} frames of {cfg.height}x{cfg.width}, {cfg.num_steps} sampler steps, "
          f"guidance {cfg.guidance} | base {str(dtype).replace('torch.', '')}, LoRA float32 | device {device}"
          + (f" x {world} processes" if world > 1 else ""))
    print(f"registry entry {describe(model.spec)}" + (" | --low-memory" if cfg.low_memory else ""))
    print(f"reward {cfg.reward} | {len(prompts)} prompts ({len(held_out)} held out) | "
          f"{cfg.batch_size * cfg.grad_accum * world} videos per optimizer step ({cfg.batch_size} x "
          f"{cfg.grad_accum} accumulated x {world} processes) | grad through the last "
          f"{'1..' if cfg.random_grad_steps else ''}{cfg.grad_steps} of {cfg.num_steps} steps | "
          f"{cfg.decode_frames} of {cfg.frames} frames decoded"
          + (f" (from the first {frame_pool(model, cfg.frames, cfg.decode_frames)}: causal VAE)" if model.wan else ""))
    print(f"LoRA rank {cfg.lora_rank}: {sum(p.numel() for p in params):,} trainable parameters | lr {cfg.lr} | "
          f"output {cfg.output_dir}")


def make_videos(model, cfg, prompts, cond, uncond, path_stem, reward_fn=None, eval_fns=None):
    """Generate n videos, video i of prompt i (cycling through them) with seed i, tiled in rows of
    at most 8; with a reward, returns the held-out columns: its mean and the evaluation rewards'."""
    n = cfg.num_videos if reward_fn is None else cfg.eval_videos
    idx = torch.arange(n) % len(prompts)
    video = generate(model, cond[idx.to(cond.device)], uncond, cfg.frames, cfg.height, cfg.width, cfg.num_steps,
                     cfg.guidance, seed=0)  # (n, F, 3, H, W)
    write_video(tile(video, per_row=8), path_stem, rows=-(-n // 8))  # (F, 3, rows*H, 8*W)
    if reward_fn is not None:
        names = [prompts[i] for i in idx]
        with torch.no_grad():
            return {"eval_reward": reward_fn(video, names).float().mean().item(), **eval_columns(eval_fns, video, names)}


def progress(bar, row, device):
    """The progress bar's reward, loss and (on a GPU) peak memory after a step."""
    post = dict(reward=f"{row['reward_mean']:.4f}", loss=f"{row['loss']:.4f}")
    if device.startswith("cuda"):
        post["peak_GB"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"
    bar.set_postfix(post)
    bar.update(1)


#### Main

def main(argv=None):
    cfg, given = parse_config(argv)
    prompts, held_out = split_prompts(cfg)
    validate(cfg)
    rank, world, device = distributed_env(resolve_device(cfg.device))
    main_process = rank == 0
    dtype = resolve_dtype(cfg.dtype, device)
    reward_fn, eval_fns, model = load_models(cfg, given, device, dtype)
    join_process_group(world, device)
    out = Path(cfg.output_dir)
    if main_process:
        tidy_run_folder(out, RUN_FILES, cfg.overwrite)

    # Text embeddings once per prompt, in one call (Wan's text encoder visits the GPU once); the
    # text encoder is not needed again.
    cond, held_cond, uncond = encode_prompts(model, prompts + held_out + [""]).split(
        [len(prompts), len(held_out), 1])  # (P, L, D), (P_eval, L, D), (1, L, D)
    held_cond = held_cond if held_out else None
    model.text_encoder.to("cpu")
    torch.manual_seed(cfg.seed)  # LoRA's random A: the same on every process and in every run of this seed
    params = inject_lora(model.unet, cfg.lora_rank, cfg.lora_alpha, targets=model.spec.lora_targets,
                         dropout=cfg.lora_dropout)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = loss_scaler(dtype, device)  # dynamic loss scaling for an fp16 base; does nothing for bf16/fp32
    generator = torch.Generator().manual_seed(cfg.seed)  # noise, prompt order, K and decoded frames
    step, rows = restore(cfg.resume, cfg.lr, model.unet, optimizer, generator)
    config_text = json.dumps(asdict(cfg), indent=2) + "\n"
    tracker = None
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", config_text)
        tracker = open_tracker(cfg, out)
        print_banner(cfg, model, dtype, device, world, prompts, held_out, params)
        if not (out / "videos" / "before.mp4").exists():
            make_videos(model, cfg, prompts, cond, uncond, out / "videos" / "before")

    def evaluate(step):
        """Held-out rewards at fixed seeds, with their videos; {} when this step has no evaluation."""
        if not (main_process and held_out and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps)):
            return {}
        return make_videos(model, cfg, held_out, held_cond, uncond, out / "videos" / f"eval-step-{step:06d}",
                           reward_fn, eval_fns)

    def checkpoint():
        if main_process:
            save_checkpoint(out, step, model.unet, optimizer, generator, config_text, metrics_text(rows),
                            cfg.keep_checkpoints, model.lora_prefix)

    def draw_batch():
        """This process's share of one global micro-batch of prompts, drawn from the run's generator."""
        idx = torch.randint(len(prompts), (cfg.batch_size * world,), generator=generator)
        idx = idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        return [prompts[i] for i in idx], cond[idx.to(cond.device)]  # B strings, (B, 77, D)

    if not rows and held_out and cfg.eval_every and main_process:
        rows.append({**dict.fromkeys(METRICS, ""), "step": 0, **evaluate(0)})

    #### Training loop
    # Ctrl-C or SIGTERM (a cluster's pre-emption) ends the step in flight, then saves and exits.
    with stop_signals() as stop, tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step",
                                      disable=not main_process) as bar:  # closed before an error's line is printed
        bad_in_a_row = 0
        while step < cfg.max_steps:
            t0 = time.time()
            k = pick_grad_steps(cfg.num_steps, cfg.grad_steps, cfg.random_grad_steps, generator)
            try:
                loss, r, grad_norm, finite = train_step(model, reward_fn, params, optimizer, scaler, draw_batch, uncond,
                                                        cfg, generator, k, (rank, world), partial(all_average, world=world))
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"out of GPU memory at {cfg.frames}x{cfg.height}x{cfg.width}; lower it with "
                                f"{LOWER_MEMORY}") from None
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            step += 1
            r = all_gather(r.to(device), world)
            row = dict(step=step, reward_mean=r.mean().item(), reward_std=r.std(unbiased=False).item(), loss=loss,
                       lr=cfg.lr, grad_norm=grad_norm, grad_steps=k, skipped=int(not finite), eval_reward="")
            seconds = round(time.time() - t0, 3)  # the step's own time: an evaluation after it is not counted
            rows.append({**row, **evaluate(step), "seconds": seconds})
            if main_process:
                atomic_write_text(out / "metrics.csv", metrics_text(rows))
                if tracker:
                    tracker(rows[-1])
                progress(bar, rows[-1], device)
            if bad_in_a_row >= cfg.max_bad_steps:
                checkpoint()
                raise UserError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (up to step {step}); "
                                "their updates were skipped. Lower --lr or check the reward; resume with --resume")
            if not finite:
                tqdm.write(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_a_row} in a row)")
            interrupted = bool(all_gather(torch.tensor([float(bool(stop))], device=device), world).max())
            if (cfg.save_every and step % cfg.save_every == 0) or interrupted:
                checkpoint()
            if interrupted:
                break

    if main_process:
        finish(cfg, out, model, rows, step, stop, checkpoint,
               lambda: make_videos(model, cfg, prompts, cond, uncond, out / "videos" / "after"))


def finish(cfg, out, model, rows, step, stop, checkpoint, after_videos):
    """The end of a run on the main process: last checkpoint, LoRA, reward curve, after-videos."""
    if not stop and not (cfg.save_every and step % cfg.save_every == 0):
        checkpoint()
    save_lora(model.unet, out / "lora.safetensors", prefix=model.lora_prefix)
    plot_rewards(out, rows, cfg.reward)
    if stop:
        print(f"stopped by {stop[0]} after step {step}; checkpoint saved. Continue with: "
              f"python train.py --resume {out}")
        return
    after_videos()
    trained = [r for r in rows if r["reward_mean"] != ""]
    print(f"done: training reward {trained[0]['reward_mean']:.4f} (step {trained[0]['step']}) -> "
          f"{trained[-1]['reward_mean']:.4f} (step {step}); wrote {out}/lora.safetensors, metrics.csv, "
          "reward_curve.png, videos/before|after.mp4")
    for line in eval_summary(rows):
        print(line)


if __name__ == "__main__":
    run_cli(main)
