"""Align a text-to-video model to a reward with VADER: reward gradients into LoRA weights.

    python train.py --reward aesthetic --prompts animals.txt                  # ModelScope, GPU
    python train.py --model tiny --reward colorfulness --prompts animals.txt --max-steps 30   # CPU

One optimizer step: for each of `grad_accum` micro-batches, sample `batch_size` prompts, run
DDIM with gradients through the last K steps, decode f frames, score them, backpropagate
-mean(reward); then clip the LoRA gradients and take an AdamW step. The run's folder gets
config.json, metrics.csv, reward_curve.png, lora.safetensors, checkpoints/ and videos/.
"""
import argparse
import csv
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from common import UserError, atomic_path, atomic_write_text, run_cli


def opt(default, help):
    """A config field whose help text is its comment (and the --help line)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every setting of a run. Defaults are VADER's ModelScope settings (2407.08737, its configs).

    Fields left at None take the model's value (vader.MODELS): resolution, frames, DDIM steps
    and guidance from its spec, and training values from its recipe (the tiny model's are
    tuned for a CPU). A flag given on the command line always wins.
    """

    model: str = opt("modelscope", "Video model: a name in vader.MODELS, a local diffusers folder, or a hub id.")
    reward: str = opt("aesthetic", "Reward name from rewards.REWARDS.")
    reward_options: str = opt("", "Options for the reward as key=value pairs separated by commas.")
    prompts: str = opt("animals.txt", "Training prompts: a file path or a file name under prompts/.")
    output_dir: str = opt("", "Run folder; empty means runs/<model>-<reward>.")
    height: int = opt(None, "Video height in pixels (None: the model's).")
    width: int = opt(None, "Video width in pixels (None: the model's).")
    frames: int = opt(None, "Frames per video, F (None: the model's).")
    num_steps: int = opt(None, "DDIM steps N (None: the model's; VADER uses 25).")
    guidance: float = opt(None, "Classifier-free guidance weight (None: the model's; VADER uses 9).")
    grad_steps: int = opt(1, "K, the last DDIM steps that keep gradients (VADER: 1).")
    random_grad_steps: bool = opt(False, "Draw K uniformly from 1..K afresh every step (VADER's rand mode).")
    decode_frames: int = opt(1, "f, how many of the F frames the VAE decodes for the reward (random each step).")
    max_steps: int = opt(200, "Optimizer steps to train for.")
    batch_size: int = opt(1, "Videos per micro-batch (VADER: 1 on a 24 GB GPU).")
    grad_accum: int = opt(16, "Micro-batches per optimizer step (VADER: 16).")
    lr: float = opt(2e-4, "AdamW learning rate (VADER: 2e-4).")
    weight_decay: float = opt(1e-2, "AdamW weight decay (PyTorch's default).")
    grad_clip: float = opt(1.0, "Clip the LoRA gradients' global norm to this (VADER: 1.0).")
    lora_rank: int = opt(16, "LoRA rank r (VADER: 16).")
    lora_alpha: float = opt(None, "LoRA alpha; the update is scaled by alpha / r (None: alpha = r).")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.")
    num_videos: int = opt(4, "Prompts shown in the before/after videos (the first ones of the file).")
    save_every: int = opt(0, "Save a checkpoint every this many steps (0: only at the end).")
    seed: int = opt(0, "Seed for the noise, the prompt order and K.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "Frozen model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
    resume: bool = opt(False, "Continue the run in --output-dir from its last checkpoint.")
    overwrite: bool = opt(False, "Replace the run already in --output-dir.")


GENERATION = ("height", "width", "frames", "num_steps", "guidance")  # defaults come from the model spec
LOCKED = ("model", "height", "width", "frames", "lora_rank", "lora_alpha")  # a resume cannot change these
RUN_FILES = ("config.json", "metrics.csv", "reward_curve.png", "lora.safetensors", "checkpoints", "videos")
METRICS = ("step", "reward_mean", "reward_std", "loss", "lr", "grad_norm", "grad_steps", "seconds")


def parse_config(argv=None):
    """Build the Config: dataclass defaults < model spec and recipe < saved run (resume) < flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, type=f.type, metavar=f.type.__name__.upper(), help=f.metadata["help"])
    given = vars(p.parse_args(argv))  # only the flags actually typed
    from vader import MODELS

    cfg = Config(**given)
    if cfg.model in MODELS:
        spec = MODELS[cfg.model]
        for k in GENERATION:
            if k not in given:
                setattr(cfg, k, getattr(spec, k))
        for k, v in spec.recipe.items():
            if k not in given:
                setattr(cfg, k, v)
    cfg.output_dir = cfg.output_dir or f"runs/{Path(cfg.model).name}-{cfg.reward.replace(':', '').replace(',', '+')}"
    saved = Path(cfg.output_dir) / "config.json"
    if cfg.resume and saved.exists():
        old = json.loads(saved.read_text())
        for k in LOCKED:
            if k in given and given[k] != old[k]:
                raise UserError(f"--resume cannot change --{k.replace('_', '-')} ({old[k]} in {saved}); start a new run")
        cfg = Config(**{**old, **given, "resume": True, "overwrite": False})
    return cfg, given


def parse_options(text):
    """'label=dancing,log=true' -> {'label': 'dancing', 'log': True} (numbers and booleans parsed)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--reward-options wants key=value pairs, got {item!r}")
        low = value.strip().lower()
        if low in ("true", "false"):
            out[key.strip()] = low == "true"
            continue
        for cast in (int, float, str):
            try:
                out[key.strip()] = cast(value.strip())
                break
            except ValueError:
                pass
    return out


def validate(cfg, model=None):
    """Check the settings; raise UserError naming the flag. Runs before anything is written."""
    for k in ("max_steps", "batch_size", "grad_accum", "lora_rank", "num_steps", "frames", "height", "width"):
        if getattr(cfg, k) is not None and getattr(cfg, k) < 1:  # None: the model's value, known after loading
            raise UserError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(cfg, k)}")
    if cfg.num_steps is not None and not 0 <= cfg.grad_steps <= cfg.num_steps:
        raise UserError(f"--grad-steps must be between 0 and --num-steps ({cfg.num_steps}), got {cfg.grad_steps}")
    if cfg.frames is not None and not 1 <= cfg.decode_frames <= cfg.frames:
        raise UserError(f"--decode-frames must be between 1 and --frames ({cfg.frames}), got {cfg.decode_frames}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    out = Path(cfg.output_dir)
    taken = out.is_dir() and any((out / name).exists() for name in RUN_FILES)
    if taken and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                        "or another --output-dir")
    if cfg.resume and not latest_checkpoint(out):
        raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'}; start the run without --resume")
    if model is not None and (cfg.height % model.vae_factor or cfg.width % model.vae_factor):
        raise UserError(f"--height and --width must be multiples of {model.vae_factor} (the VAE's downsampling), "
                        f"got {cfg.height}x{cfg.width}")


#### Checkpoints

def latest_checkpoint(out):
    """The newest checkpoints/step-N folder of a run, or None."""
    steps = sorted((out / "checkpoints").glob("step-*"))
    return steps[-1] if steps else None


def save_checkpoint(out, model, optimizer, generator, step):
    """Write checkpoints/step-N/ (LoRA, optimizer, RNG) into a temporary folder, then rename it.

    The rename is atomic, so a crash leaves either the complete new checkpoint or none.
    """
    from lora import save_lora

    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora(model.unet, tmp / "lora.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "rng": generator.get_state(), "step": step},
               tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_checkpoint(folder, model, optimizer, generator):
    """Restore LoRA, optimizer and RNG from a checkpoint folder; returns its step."""
    from lora import load_lora

    load_lora(model.unet, folder / "lora.safetensors")
    state = torch.load(folder / "state.pt", weights_only=True)  # tensors and numbers only, no code
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"])
    return state["step"]


#### Logging

def write_metrics(out, rows):
    """metrics.csv, rewritten whole and atomically so a crash never leaves half a line."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def plot_rewards(out, rows, reward_name):
    """reward_curve.png: mean training reward per optimizer step, with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    mean = torch.tensor([r["reward_mean"] for r in rows])
    std = torch.tensor([r["reward_std"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, mean, label="train reward (mean)")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2, label="±1 std")
    ax.set(xlabel="optimizer step", ylabel=reward_name, title=f"VADER: {reward_name}")
    ax.legend()
    with atomic_path(out / "reward_curve.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def make_videos(model, cfg, prompts, cond, uncond, path_stem):
    """Generate the fixed before/after videos: the first prompts, seeds 0..n-1, tiled side by side."""
    from sample import tile, write_video
    from vader import generate

    n = min(cfg.num_videos, len(prompts))
    video = generate(model, cond[:n], uncond, cfg.frames, cfg.height, cfg.width, cfg.num_steps,
                     cfg.guidance, seed=0)  # (n, F, 3, H, W)
    write_video(tile(video), path_stem)  # (F, 3, H, n*W)


#### Main

def main(argv=None):
    cfg, given = parse_config(argv)
    from lora import inject_lora, save_lora
    from rewards import load_reward
    from sampler import pick_grad_steps
    from vader import encode_prompts, load_video_model, read_prompts, resolve_device, resolve_dtype, vader_loss

    prompts = read_prompts(cfg.prompts)
    validate(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    reward_fn = load_reward(cfg.reward, device=device, dtype=dtype, **parse_options(cfg.reward_options))
    if cfg.decode_frames < reward_fn.min_frames:
        raise UserError(f"the {cfg.reward} reward needs --decode-frames {reward_fn.min_frames} or more")
    model = load_video_model(cfg.model, device, dtype)
    for k in GENERATION:  # a local folder or hub id: its spec is known only now
        if getattr(cfg, k) is None:
            setattr(cfg, k, getattr(model.spec, k))
    validate(cfg, model)
    out = Path(cfg.output_dir)
    if cfg.overwrite:  # remove only what a run writes, never other files a user keeps there
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    # Text embeddings once per prompt; the text encoder is not needed again.
    cond = encode_prompts(model, prompts)  # (P, 77, D)
    uncond = encode_prompts(model, [""])  # (1, 77, D)
    model.text_encoder.to("cpu")
    params = inject_lora(model.unet, cfg.lora_rank, cfg.lora_alpha, dropout=cfg.lora_dropout)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    rows, step = [], 0
    if cfg.resume:
        step = load_checkpoint(latest_checkpoint(out), model, optimizer, generator)
        for group in optimizer.param_groups:  # a resumed run may change the learning rate
            group["lr"] = cfg.lr
        with open(out / "metrics.csv") as f:
            rows = [{k: (int if k in ("step", "grad_steps") else float)(v) for k, v in r.items()}
                    for r in csv.DictReader(f)][:step]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")

    n_params = sum(p.numel() for p in params)
    print(f"model {cfg.model}: {cfg.frames} frames of {cfg.height}x{cfg.width}, {cfg.num_steps} DDIM steps, "
          f"guidance {cfg.guidance} | base {str(dtype).replace('torch.', '')}, LoRA float32 | device {device}")
    print(f"reward {cfg.reward} | {len(prompts)} prompts | {cfg.batch_size * cfg.grad_accum} videos per optimizer "
          f"step ({cfg.batch_size} x {cfg.grad_accum} accumulated) | grad through the last "
          f"{'1..' if cfg.random_grad_steps else ''}{cfg.grad_steps} of {cfg.num_steps} steps | "
          f"{cfg.decode_frames} of {cfg.frames} frames decoded")
    print(f"LoRA rank {cfg.lora_rank}: {n_params:,} trainable parameters | lr {cfg.lr} | output {out}")
    if not (out / "videos" / "before.mp4").exists():
        make_videos(model, cfg, prompts, cond, uncond, out / "videos" / "before")

    #### Training loop
    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step")
    while step < cfg.max_steps:
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        rewards, loss_sum = [], 0.0
        k = pick_grad_steps(cfg.num_steps, cfg.grad_steps, cfg.random_grad_steps, generator)
        for _ in range(cfg.grad_accum):
            idx = torch.randint(len(prompts), (cfg.batch_size,), generator=generator)
            loss, r, _ = vader_loss(model, reward_fn, [prompts[i] for i in idx], cond[idx.to(cond.device)],
                                    uncond, cfg, generator, k)
            (loss / cfg.grad_accum).backward()  # average over micro-batches
            rewards.append(r)
            loss_sum += loss.item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        r = torch.cat(rewards)
        rows.append(dict(step=step, reward_mean=r.mean().item(), reward_std=r.std(unbiased=False).item(),
                         loss=loss_sum, lr=cfg.lr, grad_norm=grad_norm.item(), grad_steps=k,
                         seconds=round(time.time() - t0, 3)))
        write_metrics(out, rows)
        post = dict(reward=f"{rows[-1]['reward_mean']:.4f}", loss=f"{loss_sum:.4f}")
        if device.startswith("cuda"):
            post["peak_GB"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"
        bar.set_postfix(post)
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(out, model, optimizer, generator, step)
    bar.close()

    if not latest_checkpoint(out) or latest_checkpoint(out).name != f"step-{step:06d}":
        save_checkpoint(out, model, optimizer, generator, step)
    save_lora(model.unet, out / "lora.safetensors")
    plot_rewards(out, rows, cfg.reward)
    make_videos(model, cfg, prompts, cond, uncond, out / "videos" / "after")
    first, last = rows[0]["reward_mean"], rows[-1]["reward_mean"]
    print(f"done: reward {first:.4f} (step 1) -> {last:.4f} (step {step}); wrote {out}/lora.safetensors, "
          f"metrics.csv, reward_curve.png, videos/before|after.mp4")


if __name__ == "__main__":
    run_cli(main)
