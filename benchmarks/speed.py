"""`python bench.py speed`: peak GPU memory and time of a training step against plain generation.

A configuration is a model family at one resolution with VADER's settings: 25 DDIM steps,
guidance, gradients through the last K steps, f = 1 decoded frame (9 for `-f9`), the aesthetic reward, one
video per micro-batch, LoRA r = 16. One run measures (a) the peak GPU memory and the time of one
optimizer step (train.train_step, the step train.py runs: DDIM, decode, reward, backward, clip,
AdamW) and (b), in the same process, plain no-grad generation of the same video with the same
DDIM steps, all F frames decoded. Absolute seconds belong to one GPU; the ratio (a) / (b)
travels between machines. The weights are random, built from the real configs
(benchmarks/architectures.py): nothing is downloaded, and random weights cost exactly the memory
and time trained ones do.
"""
import argparse
import contextlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from infra.cli import UserError
from infra.files import atomic_write_text
from train import Config

# name -> (family, height, width, frames, K[, f decoded frames (1)[, VideoReward's options (None: the aesthetic reward)]]);
# the tiny ones run anywhere. VideoReward's frames are spread over the clip, as many as it reads at 2 fps.
SPEED_CONFIGS = {
    "modelscope-256": ("unet3d", 256, 256, 16, 1),  # ModelScope's own resolution
    "modelscope-384": ("unet3d", 384, 384, 16, 1),  # VADER's ModelScope setting
    "modelscope-256-k5": ("unet3d", 256, 256, 16, 5),
    "zeroscope-576": ("unet3d", 320, 576, 24, 1),
    "animatediff-512": ("animatediff", 512, 512, 16, 1),
    "wan-480-33": ("wan", 480, 832, 33, 1),  # Wan2.1 1.3B at 480p, the registry's 33 frames (9 latent)
    "wan-480-81": ("wan", 480, 832, 81, 1),  # its full length, 81 frames (21 latent)
    "wan-480-33-k5": ("wan", 480, 832, 33, 5),
    "wan-480-81-k5": ("wan", 480, 832, 81, 5),
    "wan-480-33-f9": ("wan", 480, 832, 33, 1, 9),  # 9 decoded frames: the first 3 latent frames, 9 pixel frames
    "wan14b-480-33": ("wan-14b", 480, 832, 33, 1),  # Wan2.1 14B (several GPUs: bench.py memory --ranks)
    "wan14b-480-81": ("wan-14b", 480, 832, 81, 1),
    "wan22-5b-704-121": ("wan22-5b", 704, 1280, 121, 1),  # Wan2.2 TI2V-5B at its documented 720p, 121 frames
    "wan22-5b-704-49": ("wan22-5b", 704, 1280, 49, 1),
    "wan22a14b-480-81": ("wan22-a14b", 480, 832, 81, 1),  # Wan2.2 T2V-A14B, its 480p at 81 frames
    "wan22a14b-480-33": ("wan22-a14b", 480, 832, 33, 1),
    # Wan2.1 1.3B and ModelScope with VideoReward (reward_models/videoreward.py): 480x832 frames read at
    # 336x588, its pixel budget; "-full" keeps the reward model's activations (no checkpointing inside it),
    # "-100k" halves the budget (224x392).
    "wan-480-33-vr": ("wan", 480, 832, 33, 1, 4, {}),
    "wan-480-81-vr": ("wan", 480, 832, 81, 1, 10, {}),
    "wan-480-33-vr-full": ("wan", 480, 832, 33, 1, 4, {"checkpointing": False}),
    "wan-480-81-vr-full": ("wan", 480, 832, 81, 1, 10, {"checkpointing": False}),
    "wan-480-81-vr-100k": ("wan", 480, 832, 81, 1, 10, {"max_pixels": 100_352}),
    "modelscope-256-vr": ("unet3d", 256, 256, 16, 1, 4, {}),
    "tiny": ("tiny", 32, 32, 8, 1),
    "toy": ("toy", 32, 32, 8, 1),
    "tiny-wan": ("tiny-wan", 32, 32, 9, 1),
}
SMALL = ("tiny", "toy", "tiny-wan")  # the CPU-sized models: loaded by name, scored by a tiny CLIP
SPEED_STEPS = 25  # VADER's DDIM steps, for the training step and for generation alike
SPEED_TARGETS_GB = {"modelscope-256": 12, "modelscope-384": 24, "wan-480-33": 12, "wan-480-81": 16}  # a step's peak
STEP_TARGET = 1.3  # a training step may take at most 1.3x the time of generating the video
# CLIP ViT-L/14, the aesthetic head's backbone (~428 M parameters), and a tiny stand-in for the CPU.
CLIP_L14_CONFIG = dict(projection_dim=768, text_config=dict(hidden_size=768, intermediate_size=3072,
                       num_hidden_layers=12, num_attention_heads=12),
                       vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, patch_size=14, image_size=224))
CLIP_TINY_CONFIG = dict(projection_dim=32, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4), vision_config=dict(hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=4, patch_size=8, image_size=32))


def add_parser(sub):
    s = sub.add_parser("speed", help="peak memory and step time of training vs generation at real sizes",
                       description="Measure one VADER optimizer step (peak GPU memory, seconds) against plain "
                                   "generation of the same video. Without a GPU, the tiny model on the CPU.")
    s.add_argument("--config", default="modelscope-256",
                   help=f"comma-separated names, or 'all': {', '.join(SPEED_CONFIGS)}")
    s.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="train.py's --low-memory (slower, less memory); default: train.py's for the model (on for Wan)")
    s.add_argument("--repeats", type=int, default=2, help="timed repetitions of each, after one warm-up")
    s.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    s.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="frozen weights: auto (bf16 on GPU, fp16 where it lacks bf16)")
    s.add_argument("--shard", action="store_true",
                   help="under torchrun: shard the denoiser as train.py --shard does and report each process's "
                        "peak (rank 0's in the table, every rank's in the JSON)")
    s.add_argument("--output-dir", default="runs/bench", help="where speed-<config>.json goes")
    s.set_defaults(run=run_speed)


def config_of(name):
    """SPEED_CONFIGS[name] with its defaults filled in: (family, height, width, frames, K, f, reward options)."""
    values = SPEED_CONFIGS[name]
    return (*values, *(1, None)[len(values) - 5:])


def low_memory_for(name, flag):
    """--low-memory as train.py would run the configuration: the flag when given, else the
    registry's recipe for its model (Wan's turns it on)."""
    from models import MODELS

    family = SPEED_CONFIGS[name][0]
    return flag if flag is not None else MODELS[{"unet3d": "modelscope"}.get(family, family)].recipe.get("low_memory", False)


def config_names(arg):
    """--config: comma-separated names of SPEED_CONFIGS, or 'all' (every real-size one)."""
    names = [n for n in SPEED_CONFIGS if n not in SMALL] if arg == "all" else arg.split(",")
    unknown = [n for n in names if n not in SPEED_CONFIGS]
    if unknown:
        raise UserError(f"unknown --config {', '.join(unknown)}; known: {', '.join(SPEED_CONFIGS)}, all")
    return names


def random_aesthetic(config, device, dtype):
    """The aesthetic reward (reward_models.image.aesthetic) at a CLIP size, with random weights: same cost.

    Returns (reward, its frozen modules). As the real reward, only CLIP's vision tower and
    projection are built: the aesthetic head never reads the text tower.
    """
    import torch.nn.functional as F
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from reward_models.common import freeze
    from rewards import AestheticHead, clip_pixels

    with torch.device(device):
        vision_config = CLIPVisionConfig(**config["vision_config"], projection_dim=config["projection_dim"])
        clip = freeze(CLIPVisionModelWithProjection(vision_config), device, dtype)
        head = freeze(AestheticHead(config["projection_dim"]), device, dtype)
    size = vision_config.image_size

    def score(images):  # (N, 3, H, W) -> (N,)
        embeds = clip(pixel_values=clip_pixels(images, size).to(dtype)).image_embeds  # (N, 768)
        return head(F.normalize(embeds, dim=-1)).float()

    from rewards import per_frame

    return per_frame(score), [clip, head]


def random_videoreward(device, dtype, checkpointing=True, **options):
    """VideoReward (reward_models.videoreward) at Qwen2-VL-2B's size, with random weights and a stand-in
    tokenizer (benchmarks.architectures.build_videoreward): (reward, its frozen modules)."""
    from benchmarks.architectures import build_videoreward
    from reward_models.videoreward import reward_from

    model = build_videoreward(device, dtype, checkpointing)
    return reward_from(model, **options), [model]


def speed_model(family, device, dtype, denoiser_device=None):
    """A VideoModel: the tiny one, or a family's real architecture with random weights on `device`
    (the denoiser on `denoiser_device` when given: CPU memory, before --shard splits it)."""
    from benchmarks.architectures import build_architecture
    from infra.tiny import BOUNDARY_RATIO, MODELSCOPE_SCHEDULER, WAN_SCHEDULER
    from models import MODELS, family_class, load_video_model

    if family in SMALL:
        return load_video_model(family, "cpu" if device == "meta" else device, dtype)
    spec = MODELS[{"unet3d": "modelscope"}.get(family, family)]  # the registry entry of the family
    default = torch.get_default_dtype()
    try:  # built in the base dtype: a 14B initialised in float32 would need twice the CPU memory
        torch.set_default_dtype(dtype if denoiser_device else default)
        *experts, vae, text = build_architecture(family, denoiser_device or device, dtype)
    finally:
        torch.set_default_dtype(default)
    vae.to(device)
    cls = family_class(spec.family)
    scheduler = WAN_SCHEDULER if spec.family == "wan" else MODELSCOPE_SCHEDULER  # the real configs' values
    # Two experts (Wan2.2 A14B): the first is the high-noise one, as in the hub folder's transformer/;
    # it waits in CPU memory, as models.py loads it, and visits the GPU for its steps.
    extra = dict(high_expert=experts[0].to("cpu") if device != "meta" else experts[0],
                 boundary_ratio=BOUNDARY_RATIO) if len(experts) == 2 else {}
    model = cls(experts[-1], vae, text, None, cls.schedule_class.from_config({**scheduler, **spec.scheduler}), spec,
                device, **extra)
    model.enable_checkpointing()
    return model


def materialize_fake(module):
    """Give every parameter and buffer of a meta-device module a fake CPU tensor of its shape and
    dtype, in place (called inside FakeTensorMode; `.to()` on a module built under the mode fails
    with 'Couldn't swap ... has weakref')."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def prepare(name, device, dtype, low_memory, fake_mode=None, foreach=None, num_steps=SPEED_STEPS, shard=None):
    """What one configuration's measurements need: (train_step(), generation(), parts).

    `train_step()` is one optimizer step exactly as train.py takes it (train.train_step on one
    micro-batch) and `generation()` the plain generation of the same video. The memory simulator
    passes a FakeTensorMode: the models are then built on the meta device and given fake weights
    (`materialize_fake`), and `foreach=True`, AdamW's choice on a GPU. `shard` = (rank, world)
    under torchrun: the denoiser is built in CPU memory and sharded as train.py --shard does.
    """
    family, *_, reward = config_of(name)
    build_on = device if fake_mode is None else "meta"
    model = speed_model(family, build_on, dtype, "cpu" if shard else None)
    if reward is not None:
        reward_fn, reward_modules = random_videoreward(build_on, dtype, **reward)
        if low_memory:  # as train.py: the reward waits in host memory during the decoder's and denoiser's backward
            from infra.offload import reward_leaves_in_backward

            reward_fn = reward_leaves_in_backward(reward_fn, "cuda" if fake_mode is not None else device)
    else:
        reward_fn, reward_modules = random_aesthetic(CLIP_TINY_CONFIG if family in SMALL else CLIP_L14_CONFIG,
                                                     build_on, dtype)
    with fake_mode or contextlib.nullcontext():
        if fake_mode is not None:
            for module in (model.unet, model.vae, model.text_encoder, *reward_modules):
                materialize_fake(module)
            if getattr(model, "high_expert", None) is not None:
                materialize_fake(model.high_expert)
        step, generation, parts = _step_and_generation(model, reward_fn, name, device, dtype, low_memory, foreach,
                                                       num_steps, shard)
    return step, generation, dict(parts, reward_modules=reward_modules)


def _step_and_generation(model, reward_fn, name, device, dtype, low_memory, foreach, num_steps, shard=None):
    from lora import inject_lora
    from train import train_step
    from vader import generate, initial_noise, loss_scaler

    family, height, width, frames, k, f, _ = config_of(name)
    # train.py's defaults for everything the step reads but the configuration does not set.
    cfg = SimpleNamespace(frames=frames, height=height, width=width, num_steps=num_steps,
                          guidance=model.spec.guidance, decode_frames=f, grad_accum=1, grad_clip=Config.grad_clip,
                          low_memory=low_memory)
    # As train.py: the text encoder runs once (random tokens: its cost does not depend on them), then leaves.
    with torch.no_grad():
        tokens = torch.randint(0, model.text_encoder.config.vocab_size, (2, model.text_length),
                               generator=torch.Generator().manual_seed(0))
        cond, uncond = model.text_encoder(tokens.to(model.text_encoder.device))[0].to(device).chunk(2)  # (1, L, D) each
    if device != "cpu":
        model.text_encoder.to("cpu")
    params = inject_lora(model.unet, rank=Config.lora_rank, targets=model.spec.lora_targets)
    if shard:
        from infra.distributed import join_process_group
        from infra.sharding import shard_denoiser

        join_process_group(shard[1], device)
        params = shard_denoiser(model, shard[1], device)
    optimizer = torch.optim.AdamW(params, lr=Config.lr, weight_decay=Config.weight_decay, foreach=foreach)
    scaler = loss_scaler(dtype, device)

    rank, world = shard or (0, 1)

    def step():
        generator = torch.Generator().manual_seed(0)

        def draw_batch():  # as train.py's: every process draws the whole batch's noise and keeps its own
            z_T = initial_noise(model, world, frames, height, width, generator, device)  # (world, C, F_lat, h, w)
            return ["a prompt"], cond, z_T[rank:rank + 1]

        train_step(model, reward_fn, params, optimizer, scaler, draw_batch, uncond, cfg, generator, k, world)

    def generation():
        generate(model, cond, uncond, frames, height, width, cfg.num_steps, cfg.guidance, seed=0,
                 low_memory=low_memory)  # (1, F, 3, H, W)

    return step, generation, dict(model=model, params=params, optimizer=optimizer, cfg=cfg, cond=cond, uncond=uncond)


def timed(fn, repeats, cuda):
    """Seconds per call of fn(), the mean of `repeats` calls after one warm-up call."""
    fn()  # warm-up: kernel selection, the allocator's pools, AdamW's state
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def real_sizes(family):
    """Parameter counts of a family's real architecture, built on the meta device (nothing allocated)."""
    from benchmarks.architectures import build_architecture
    from lora import inject_lora, lora_layers

    *experts, vae, text = build_architecture(family, "meta")
    unet = experts[-1]  # the denoiser that is trained (A14B: the low-noise expert)
    clip = sum(p.numel() for m in random_aesthetic(CLIP_L14_CONFIG, "meta", torch.float32)[1] for p in m.parameters())
    lora = sum(p.numel() for p in inject_lora(unet, rank=16))
    sizes = [sum(p.numel() for p in m.parameters() if not p.requires_grad) for m in (unet, vae, text)]
    return dict(zip(("unet", "vae", "text_encoder"), sizes), reward_clip=clip, lora=lora,
                lora_layers=len(lora_layers(unet)), experts=len(experts))


def measure_speed(name, a, device, dtype):
    """One configuration's figures: seconds and peak GB of a training step and of generation."""
    family, height, width, frames, k, f, _ = config_of(name)
    cuda = device.startswith("cuda")
    low_memory = low_memory_for(name, a.low_memory)
    step, generation, _ = prepare(name, device, dtype, low_memory, shard=a.shard_of)
    r = dict(config=name, device=torch.cuda.get_device_name(device) if cuda else "cpu",
             dtype=str(dtype).removeprefix("torch."), low_memory=low_memory, frames=frames, height=height,
             width=width, num_steps=SPEED_STEPS, grad_steps=k, decode_frames=f)
    for what, fn in (("step", step), ("generation", generation)):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        r[f"{what}_s"] = timed(fn, a.repeats, cuda)
        r[f"{what}_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    r["ratio"] = r["step_s"] / r["generation_s"]
    if a.shard_of:  # every process's peaks, gathered; the table shows rank 0's
        from infra.distributed import all_gather

        world = a.shard_of[1]
        r["processes"] = world
        for what in ("step", "generation"):
            peak = torch.tensor([r[f"{what}_peak_gb"] or 0.0], device=device)
            r[f"{what}_peak_gb_per_rank"] = all_gather(peak, world).tolist()
    return r


def join_for_shard(device):
    """(rank, world, this process's device) under torchrun for --shard (the group is joined once the
    models are built: a tiny model is written to a folder by each process first)."""
    from infra.distributed import distributed_env

    rank, world, local = distributed_env(device)
    if world == 1:
        raise UserError("bench.py speed --shard measures several processes: run it under torchrun "
                        "--nproc_per_node=N")
    return rank, world, local


def run_speed(a):
    from infra.distributed import resolve_device
    from vader import resolve_dtype

    from infra.checks import check_device, check_flags, check_output_dir

    names = config_names(a.config)
    if a.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {a.repeats}")
    check_flags(a)  # --dtype
    check_device(a.device)
    check_output_dir(a.output_dir)
    for family in dict.fromkeys(SPEED_CONFIGS[n][0] for n in names if n not in SMALL):
        c = real_sizes(family)
        experts = f"{c['experts']} experts of " if c["experts"] > 1 else ""
        print(f"{family} at real size (random weights, counted on the meta device): denoiser {experts}{c['unet'] / 1e6:,.1f} M, "
              f"VAE {c['vae'] / 1e6:,.1f} M, text encoder {c['text_encoder'] / 1e6:,.1f} M, reward CLIP ViT-L/14 "
              f"{c['reward_clip'] / 1e6:,.1f} M; LoRA r=16 on {c['lora_layers']} linears: {c['lora'] / 1e6:,.2f} M")
    device = resolve_device(a.device)
    if not device.startswith("cuda") and not set(names) <= set(SMALL):
        print(f"no CUDA GPU: the time and memory of {', '.join(names)} need one (run the same command on a "
              "GPU); measuring the tiny model on the CPU instead")
        names = ["tiny"]
    dtype = resolve_dtype(a.dtype, device)
    a.shard_of, main = None, True
    if a.shard:
        rank, world, device = join_for_shard(device)
        a.shard_of, main = (rank, world), rank == 0
    if main:
        print("\n| config | device | dtype | low-memory | F x H x W | K | step s | generation s | step / generation "
              "| peak GB, step | peak GB, generation |\n|" + " --- |" * 11)
    for name in names:
        r = measure_speed(name, a, device, dtype)
        if not main:
            continue
        gb = [f"{x:.2f}" if x is not None else "n/a (CPU)" for x in (r["step_peak_gb"], r["generation_peak_gb"])]
        print(f"| {name} | {r['device']} | {r['dtype']} | {'yes' if r['low_memory'] else 'no'} | {r['frames']}x"
              f"{r['height']}x{r['width']} | {r['grad_steps']} | {r['step_s']:.2f} | {r['generation_s']:.2f} | "
              f"{r['ratio']:.2f} | {gb[0]} | {gb[1]} |")
        stem = f"speed-{name}" + ("-low-memory" if r["low_memory"] else "") + (f"-shard{a.shard_of[1]}" if a.shard else "")
        atomic_write_text(Path(a.output_dir) / f"{stem}.json", json.dumps(r, indent=2) + "\n")
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if main:
        print(f"\ntargets: step / generation <= {STEP_TARGET}; peak GB of a step <= "
              + ", ".join(f"{gb} for {n}" for n, gb in SPEED_TARGETS_GB.items()) + f"; wrote {a.output_dir}/speed-*.json")
