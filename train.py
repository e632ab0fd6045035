"""Align a text-to-video model to a reward with VADER: reward gradients into LoRA weights.

    python train.py --reward aesthetic --prompts animals.txt                  # ModelScope, GPU
    python train.py --model tiny --reward colorfulness --prompts animals.txt --max-steps 30   # CPU
    torchrun --nproc_per_node=4 train.py --reward aesthetic                   # several GPUs
    torchrun --nproc_per_node=4 train.py --model wan-14b --shard              # a model no one GPU holds

`train_step` is one optimizer step of VADER, and `main`'s loop takes them; the run's folder gets
config.json, metrics.csv, reward_curve.png, lora.safetensors, checkpoints/ and videos/.
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infra.cli import UserError, run_cli
from infra.distributed import distributed_env, join_process_group, leave_process_group, mean_over_processes
from infra.offload import saved_on_cpu
from infra.prompt_store import prompt_embeddings
from infra.run import Run, make_videos, print_banner
from infra.setup import (GENERATION, batch_drawer, check_config_file, check_model_settings, check_settings,
                         load_rewards, parse_flags, read_config_file, resumed, split_prompts)
from infra.sharding import shard_denoiser
from lora import inject_lora
from models import load_video_model, spec_of
from reward_models.registry import reward_recipe
from sampler import pick_grad_steps, sample
from vader import decode_f_frames, encode_prompts, loss_scaler, reads_whole_clip, resolve_dtype


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
    height: int = opt(None, "Video height in pixels.")
    width: int = opt(None, "Video width in pixels.")
    frames: int = opt(None, "Frames per video, F.")
    num_steps: int = opt(None, "Sampler steps N, DDIM or Euler (VADER uses 25).")
    guidance: float = opt(None, "Classifier-free guidance weight (VADER uses 9).")
    negative_prompt: str = opt(None, "The prompt guidance steers away from (Wan: its authors' list of flaws, in Chinese).")
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
    tracker_project: str = opt("", "--report-to wandb's project (empty: vader-minimal); a run is named after its folder.")
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


def parse_config(argv=None):
    """Build the Config once: dataclass defaults < the model's registry entry and recipe < the reward's
    recipe < --config FILE < a resumed run's own settings < typed flags. Returns (cfg, the model's registry entry)."""
    given = parse_flags(Config, argv, __doc__.split("\n\n")[0])  # only the flags actually typed, aliases mapped
    path = given.pop("config", None)
    if path and "resume" in given:
        raise UserError("--config and --resume: a resumed run takes its settings from its checkpoint; drop --config "
                        "(and type the settings to change)")
    from_file = read_config_file(path, Config) if path else {}  # its fields' types checked; not its output_dir
    # the typed --model, else the file's; a folder's or hub id's family and size are read off its configs
    spec = spec_of(given.get("model", from_file.get("model", Config.model)))
    defaults = {**{k: getattr(spec, k) for k in GENERATION}, **spec.recipe}
    defaults.update(reward_recipe(given.get("reward", from_file.get("reward", defaults.get("reward", Config.reward)))))
    if path:
        check_config_file(path, Config(**{**defaults, **from_file}))  # its values by a checkpoint config's rules
    cfg = Config(**{**defaults, **from_file, **given})
    cfg.output_dir = cfg.output_dir or f"runs/{Path(cfg.model).name}-{cfg.reward.replace(':', '').replace(',', '+')}"
    if cfg.resume:
        cfg = resumed(cfg, given)
        spec = spec_of(cfg.model)
    return cfg, spec


def load_models(cfg, spec, device, dtype, sharding=False):
    """The reward and the evaluation rewards, then the video model (`spec`), checked against the run's
    video; under --shard its denoiser stays in CPU memory until it is sharded."""
    reward_fn, eval_fns = load_rewards(cfg, device, dtype, spec.fps)
    model = load_video_model(cfg.model, "cpu" if sharding else device, dtype)
    if sharding:
        model.vae.to(device)
        model.device = device
    check_model_settings(model, cfg)  # its size, and for two experts K and the guidance
    return reward_fn, eval_fns, model


#### One optimizer step of VADER

def train_step(model, reward_fn, params, optimizer, scaler, draw_batch, uncond, cfg, generator, k, world=1):
    """Sample with gradients through the last k steps, decode f frames, score them, and ascend the reward.

    For each of `cfg.grad_accum` micro-batches `draw_batch()` gives B prompts, their cached
    embeddings (B, L, D) and their noise z_T; the loss -mean(r) is VADER's "-r" form. The LoRA
    gradients (`params`) are averaged over the `world` processes under torchrun, unscaled (fp16),
    clipped to `cfg.grad_clip`, and AdamW steps, unless the loss or the gradient is not finite:
    such an update would poison AdamW's moments for good, so it is skipped; a step that leaves a
    LoRA weight non-finite is undone. Returns (loss, rewards (grad_accum * B,), gradient norm
    before clipping, finite). The benchmarks time and simulate this very function.
    """
    optimizer.zero_grad(set_to_none=True)
    rewards, loss_sum = [], 0.0
    for _ in range(cfg.grad_accum):
        prompts, cond, z_T = draw_batch()  # B strings, (B, L, D), (B, C, F_lat, h, w)
        with saved_on_cpu(cfg.low_memory, cond.device):  # --low-memory: what backward keeps waits in CPU memory
            z0 = sample(model.denoiser, z_T, cond, uncond, model.schedule, cfg.num_steps, cfg.guidance, grad_steps=k,
                        checkpoint_steps=cfg.low_memory)  # (B, C, F_lat, h, w): a graph through the last k steps only
            frames = decode_f_frames(model, z0, cfg.frames, cfg.decode_frames, generator,
                                     spread=reads_whole_clip(reward_fn), one_at_a_time=cfg.low_memory)  # (B, f, 3, H, W)
            r = reward_fn(frames, prompts).float()  # (B,)
        loss = -r.mean()
        scaler.scale(loss / cfg.grad_accum).backward()  # fp16: scaled up; the mean over micro-batches
        rewards.append(r.detach())
        loss_sum += loss.item() / cfg.grad_accum
    loss = mean_over_processes(params, loss_sum, world)  # DDP's all-reduce of the gradients, and the loss for the log
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
    cfg, spec = parse_config(argv)
    check_settings(cfg)  # every flag, the device and the output folder, before anything loads (infra/setup.py)
    prompts, held_out = split_prompts(cfg)
    rank, world, device = distributed_env(cfg.device)  # torchrun's variables; none: one process
    # The folder is claimed, and Ctrl-C and SIGTERM caught, from before the models load to the end:
    # a stop ends at the next step boundary with a checkpoint (or, while loading, with nothing written),
    # and running out of memory anywhere is one line that says how to go on (infra/run.py).
    with Run(cfg, Path(cfg.output_dir), rank, world, device) as run:
        dtype = resolve_dtype(cfg.dtype, device)
        sharding = cfg.shard and world > 1  # FSDP2: each process keeps 1/world of every weight (infra/sharding.py)
        reward_fn, eval_fns, model = load_models(cfg, spec, device, dtype, sharding)
        join_process_group(world, device)

        # Text embeddings once per prompt; the text encoder is not needed again, and leaves host memory
        # too. The training prompts' wait in host memory, however many (and a costly encoder's also on
        # disk, for the next run: infra/prompt_store.py); a micro-batch moves its own B to the GPU.
        cond = prompt_embeddings(model, prompts)  # (P, L, D), host memory
        held_cond, uncond = encode_prompts(model, held_out + [cfg.negative_prompt]).split(
            [len(held_out), 1])  # (P_eval, L, D), (1, L, D)
        model.text_encoder = None
        torch.manual_seed(cfg.seed)  # LoRA's random A: the same on every process and in every run of this seed
        params = inject_lora(model.unet, cfg.lora_rank, cfg.lora_alpha, targets=model.spec.lora_targets,
                             dropout=cfg.lora_dropout)
        if sharding:
            params = shard_denoiser(model, world, device)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = loss_scaler(dtype, device)  # dynamic loss scaling for an fp16 base; does nothing for bf16/fp32
        generator = torch.Generator().manual_seed(cfg.seed)  # noise, prompt order, K and decoded frames
        draw_batch = batch_drawer(model, cfg, prompts, cond, generator, rank, world)

        def videos(name, n, scored):
            """n videos of the training prompts (before/after) or, scored, of the held-out ones."""
            which = (held_out, held_cond, reward_fn, eval_fns) if scored else (prompts, cond, None, None)
            return make_videos(model, cfg, which[0], which[1], uncond, run.out / "videos" / name, n, *which[2:],
                               write=run.main)

        # A resumed run's LoRA, AdamW and generators; config.json, the banner, the before-videos and
        # the step-0 evaluation. Returns the step to continue from.
        step = run.start(model, optimizer, generator, videos, params,
                         lambda params: print_banner(cfg, model, dtype, device, world, prompts, held_out, params,
                                                         reads_whole_clip(reward_fn)))

        #### Training loop
        while step < cfg.max_steps and not run.stopped():
            t0 = time.time()
            k = pick_grad_steps(cfg.num_steps, cfg.grad_steps, cfg.random_grad_steps, generator)
            loss, rewards, grad_norm, finite = train_step(model, reward_fn, params, optimizer, scaler, draw_batch, uncond,
                                                          cfg, generator, k, world)
            step += 1
            scores = run.evaluate(step)  # every --eval-every steps and at the end: held-out videos, scored
            run.record(step, loss, rewards, grad_norm, k, finite, time.time() - t0, scores)  # metrics.csv
            if run.checkpoint_due(step):
                run.save_checkpoint(step)  # checkpoints/step-N: the LoRA, AdamW, the generators

        #### What the run leaves
        if run.save_lora(step):  # the last checkpoint, lora.safetensors and reward_curve.png
            run.videos("after", cfg.num_videos, False)  # videos/after.mp4, from the seeds of before.mp4
            run.summary(step, [prompts[i % len(prompts)] for i in range(cfg.num_videos)])  # before_after.png
    leave_process_group(world)


if __name__ == "__main__":
    run_cli(main)
