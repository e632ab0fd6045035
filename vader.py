"""The VADER pieces: prompts encoded once, noise, a few decoded frames, and precision and memory.

VADER (Prabhudesai et al., arXiv 2407.08737) aligns a video diffusion model to a reward by
plain gradient ascent on   J(θ) = E_{prompt, z_T} [ r( decode( sampler_θ(z_T, prompt) ), prompt ) ]
with the gradient taken through the sampler's last K steps (sampler.py), through the VAE
decoder, and through a frozen reward model (rewards.py), into LoRA weights θ (lora.py).
train.py's `train_step` puts the pieces below together; the benchmarks run that same step.

Two tricks keep that affordable, both here:
- Frame subsampling: decoding all F frames through the VAE with gradients is the largest
  memory cost after the denoiser, so only f of them are decoded, random ones each step, drawn
  from the frames the model's VAE can decode exactly on their own (`model.frame_pool`: all F for
  SD's per-frame VAE; a prefix of the video for a causal one, wan.py). A reward that judges
  motion (VideoReward) instead reads f frames spread over the whole clip at its own frame rate
  (`spread_frames`); a causal VAE then decodes every latent frame, which under --low-memory costs
  the memory of one latent frame's decode however long the video (`wan.decode_by_latent_frame`).
- Cached prompt embeddings: the text encoder runs once per prompt, then leaves the GPU.

#### Precision and memory

Every tensor of a training step, its dtype, and why ("base" is the frozen model's dtype: bf16 on
a GPU that has it, fp16 on one that lacks it, float32 on a CPU; `resolve_dtype`):

| tensor | dtype | why |
| --- | --- | --- |
| frozen weights: denoiser, VAE, reward model | base | half the memory; never updated, so rounding cannot accumulate and no float32 master copy is needed. No autocast: each op runs in its weights' dtype |
| text encoder | base, on the GPU only to encode | not needed once the prompts are cached |
| text embeddings (P, L, D) | base | cached for the whole run |
| LoRA A, B, their gradients, AdamW's moments | float32 | an lr-2e-4 update of a weight of size ~1e-2 is below bf16's 8-bit mantissa: it would round away (lora.py) |
| latents x_t between sampler steps | float32 | DDIM subtracts nearly equal numbers when ᾱ is near 1 (sampler.guided_output) |
| denoiser activations | base | inside a LoRA layer the low-rank branch runs in float32 and its output is cast back (lora.LoRAUpdate) |
| decoded frames (B, f, 3, H, W), loss, rewards | float32 | the reward's preprocessing works in float32; with fp16 the loss is scaled before backward (`loss_scaler`) |

What autograd keeps for backward is cut three ways, each where it happens:
1. Checkpointing inside the denoiser, always on (`model.enable_checkpointing`: `checkpoint_blocks`
   below for the UNets; for Wan, diffusers' own per-block checkpointing with each block's
   attentions and FFN checkpointed again inside it): a grad step keeps each module's input, and
   backward recomputes one module at a time, for one more denoiser forward per grad step (two
   of each Wan sub-layer). Guidance's two passes run as two calls in a grad step
   (sampler.guided_output), so backward holds one pass's activations at a time.
2. Checkpointing each denoiser call of a grad step (sampler.sample's `checkpoint_steps`), only
   with --low-memory: a grad step keeps only its inputs, so memory stays flat in K, and backward
   recomputes one guidance pass at a time, for one more denoiser forward per grad step on top of (1).
3. Checkpointed decoding (`model.decode_frames`), always on: the decoder's activations are
   recomputed in backward, at two more decoder forwards of f frames per step, and inside the
   decode each of the decoder's resnets (and a causal VAE's resamplers) is a checkpoint of its
   own; with --low-memory each frame is its own checkpoint (for a causal VAE each latent frame
   of each video, taking and returning the feature cache, which waits in host memory between
   them: `wan.decode_by_latent_frame`).
   --low-memory also moves what autograd still saves (the reward model's activations, the
   sampler's arithmetic) to CPU memory and back (`saved_on_cpu`), at the cost of copies, sends
   the idle denoiser there while a whole video decodes (`denoiser_in_cpu_memory`), and a reward
   model that says which modules it is (`reward_fn.modules`) once backward is done with it
   (`leaves_in_backward`).
What each lever saves at real sizes is measured by `python bench.py memory` (BENCHMARKS.md).
"""
import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from infra.cli import UserError
from sampler import sample


@torch.no_grad()
def encode_prompts(model, prompts, batch=32):
    """Text embeddings (P, L, D) for P prompts, on the model's device (L: the family's text length).

    VADER's prompts come from a fixed list, so each is encoded once, before training, and the
    text encoder is not needed again; the family says how it encodes and where its encoder waits.
    """
    with model.text_encoder_on_device():
        out = [model.embed(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]  # each (b, L, D)
    return torch.cat(out).to(model.device)  # (P, L, D)


#### Noise and frame-subsampled decoding

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


def initial_noise(model, batch, frames, height, width, generator, device):
    """z_T ~ N(0, I), (B, C, F_lat, h, w), drawn on the CPU so a seed gives the same video on any device."""
    check_video_shape(model, frames, height, width)
    shape = (batch, model.latent_channels, model.latent_frames(frames), height // model.vae_factor,
             width // model.vae_factor)
    return torch.randn(shape, generator=generator).to(device)  # (B, C, F_lat, h, w)


def noise_share(model, b, cfg, generator, device, shard=(0, 1)):
    """This process's B videos of z_T, (B, C, F_lat, h, w).

    shard = (rank, world): under torchrun every process draws the noise of the whole global
    batch (world * B videos) from the same generator and keeps its own B, so N processes compute
    exactly what one process with N * B videos would, and every generator stays in step.
    """
    rank, world = shard
    z_T = initial_noise(model, b * world, cfg.frames, cfg.height, cfg.width, generator, device)  # (world*B, C, F_lat, h, w)
    return z_T[rank * b:(rank + 1) * b]  # (B, C, F_lat, h, w)


def choose_frames(num_frames, f, generator=None):
    """Indices of the f frames to decode this step: random, drawn from the run's generator, sorted."""
    return torch.randperm(num_frames, generator=generator)[:f].sort().values


def spread_frames(num_frames, f):
    """f frames spread evenly over the clip, the first and the last included: round(linspace(0, F - 1, f)),
    the frames a video reader sampling the clip at a lower rate picks."""
    return torch.linspace(0, num_frames - 1, f).round().long()


def spreads(reward_fn):
    """Whether a reward watches the clip at its own frame rate (it then carries `fps`: VideoReward)."""
    return getattr(reward_fn, "fps", None) is not None


def frames_for(reward_fn, num_frames, fps):
    """The default f: 1 for a reward that scores frames, or for one that watches the clip at its own
    rate the frames that rate gives of an F-frame clip made at `fps`, in pairs, at least 4 and at
    most F (the rule of Qwen2-VL's video reader: 33 frames at 16 fps, read at 2 fps -> 4; 81 -> 10)."""
    if not spreads(reward_fn):
        return 1
    n = max(num_frames / fps * reward_fn.fps, 4)
    return max(reward_fn.min_frames, min(num_frames, round(n / 2) * 2))


def frames_seen(reward_fn, video, f, fps):
    """What a reward scores of whole videos (B, F, 3, H, W) made at `fps`: every frame, or for one that
    watches the clip at its own rate f frames spread over it (None: `frames_for`'s number)."""
    if not spreads(reward_fn):
        return video
    f = f or frames_for(reward_fn, video.shape[1], fps)
    return video[:, spread_frames(video.shape[1], f).to(video.device)]  # (B, f, 3, H, W)


def decode_random_frames(model, z0, frames, f, generator, low_memory=False, spread=False):
    """f frames of each video z0 (B, C, F_lat, h, w), decoded with gradients -> (B, f, 3, H, W) in [0, 1].

    Random frames by default, from the pool the VAE decodes exactly: all of them for SD's VAE, the
    causal prefix for Wan's. A reward that judges motion needs frames across the whole clip
    (`spread`): for SD's VAE they cost what any f frames cost; Wan's causal VAE must decode every
    latent frame up to the last one, affordable because under --low-memory each latent frame is
    its own checkpoint and the caches between them wait in host memory (`wan.decode_by_latent_frame`).
    """
    if spread:
        return model.decode_frames(z0, spread_frames(frames, f).to(z0.device), one_at_a_time=low_memory)
    pool = model.frame_pool(frames, f)  # the first `pool` pixel frames can be decoded exactly
    idx = choose_frames(pool, f, generator).to(z0.device)
    z0 = z0[:, :, :model.latent_frames(pool)]  # (B, C, F_pool, h, w)
    return model.decode_frames(z0, idx, one_at_a_time=low_memory)  # (B, f, 3, H, W)


#### Checkpointing inside a UNet

def _checkpointed(forward, *args, **kwargs):
    """Run a module's forward under non-reentrant checkpointing whenever autograd is recording."""
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpoint_blocks(unet, enabled=True):
    """Checkpoint every module inside the UNet's blocks: keep only its input, recompute it in backward.

    The units are the modules in every block's lists (each resnet, attention, temporal conv or
    motion module, up- and downsampler) and `transformer_in`; backward recomputes one at a time,
    so the peak holds one unit's activations, for one more UNet forward per grad step. diffusers'
    UNet3D has no checkpointing of its own and UNetMotionModel's wraps only some modules. Each
    unit's `forward` attribute is wrapped, so module paths and state-dict keys are unchanged; it
    acts only while autograd records. `enabled=False` restores the plain forwards.
    """
    blocks = [*getattr(unet, "down_blocks", ()), unet.mid_block, *unet.up_blocks]
    units = [getattr(unet, "transformer_in", None)]
    units += [m for block in filter(None, blocks) for child in block.children()
              if isinstance(child, torch.nn.ModuleList) for m in child]
    checkpoint_units(filter(None, units), enabled)


def checkpoint_units(units, enabled=True, wrap=_checkpointed):
    """Make each module's forward a checkpoint of its own (while autograd records), in place;
    calling it again rewraps the class's own forward, and `enabled=False` restores it. `wrap`
    (forward, *args) runs the checkpoint: a causal VAE's units need one that replays their cache
    (wan.py)."""
    for unit in units:
        unit.__dict__.pop("forward", None)  # back to the class's own forward
        if enabled:
            unit.forward = functools.partial(wrap, unit.forward)


def saved_on_cpu(enabled, device):
    """--low-memory: what autograd saves for backward waits in (pinned) CPU memory instead of the GPU's."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.device(device).type == "cuda")


def leaves_in_backward(reward_fn, device):
    """--low-memory: the reward model waits in host memory while the decoder and the denoiser run backward.

    Backward reaches the reward first (its ops came last) and is done with it once the frames'
    gradient exists; from then on its weights only take room, and a video-language judge's are
    gigabytes. A hook on the frames sends its modules (`reward_fn.modules`) to host memory then,
    and the next call brings them back: two copies of the reward model per micro-batch. Rewards
    without `modules` (a weighted sum) stay where they are.
    """
    modules = getattr(reward_fn, "modules", None)
    if not modules or torch.device(device).type == "cpu":
        return reward_fn

    def reward(frames, prompts):
        move_modules(modules, device)  # back from host memory, if backward sent it there
        r = reward_fn(frames, prompts)
        if frames.requires_grad:
            frames.register_hook(lambda grad: move_modules(modules, "cpu"))
        return r

    reward.min_frames, reward.fps = reward_fn.min_frames, getattr(reward_fn, "fps", None)
    return reward


def move_modules(modules, device):
    """Each module's weights to `device` (its own function, so the memory simulator can count the moves)."""
    for m in modules:
        m.to(device)


def resolve_device(device="auto"):
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype, device):
    """The frozen base's dtype: 'auto' -> bf16 on a GPU that has it, fp16 on one that lacks it, fp32 on CPU
    (the table above says why)."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def loss_scaler(dtype, device):
    """Dynamic loss scaling for an fp16 base; a no-op (enabled=False) for bf16 and float32.

    fp16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero on their way back through
    the fp16 denoiser and VAE, and small LoRA gradients vanish. Multiplying the loss by S
    (scaler.scale) lifts them into range; scaler.unscale_ divides the float32 LoRA gradients by S
    before clipping; scaler.step skips the update when an inf or NaN shows the scale was too
    large, and scaler.update halves S then (and doubles it after 2000 clean steps). S starts at
    2^10 rather than PyTorch's 2^16, so the first steps are not spent skipping updates while S
    comes down. bf16 has float32's exponent range and needs none of this.
    """
    return torch.amp.GradScaler(torch.device(device).type, init_scale=2.0**10, enabled=dtype == torch.float16)


@torch.no_grad()
def generate(model, cond, uncond, frames, height, width, num_steps, guidance, seed, low_memory=False):
    """Plain generation (no gradients, all frames decoded): (B, F, 3, H, W) in [0, 1].

    Video i of the batch uses seed `seed + i`, so a video depends only on its own seed and
    prompt, not on what else is in the batch. With `low_memory` the denoiser waits in CPU memory
    while the VAE decodes every frame (`denoiser_in_cpu_memory`).
    """
    device = cond.device
    z_T = torch.cat([
        initial_noise(model, 1, frames, height, width, torch.Generator().manual_seed(seed + i), device)
        for i in range(len(cond))
    ])  # (B, C, F_lat, h, w)
    z0 = sample(model.unet, z_T, cond, uncond, model.schedule, num_steps, guidance, high_noise=model.high_noise)
    with denoiser_in_cpu_memory(model, low_memory):
        return model.decode_frames(z0, torch.arange(frames, device=device))  # (B, F, 3, H, W)


@contextlib.contextmanager
def denoiser_in_cpu_memory(model, enabled=True):
    """--low-memory: while a whole video decodes, the idle denoiser waits in CPU memory.

    A training step decodes f frames, but the before/after and evaluation videos decode all F,
    and a large VAE's decode of a whole video at high resolution can need more than the step, on
    top of the denoiser's weights. Moving the denoiser out for the decode costs one copy each way
    per batch of videos. A sharded denoiser (--shard) stays where FSDP keeps it; on a CPU there is
    nowhere else to go.
    """
    if not enabled or torch.device(model.device).type in ("cpu", "meta") or sharded(model.unet):
        yield
        return
    with visiting(model.device, leaving=[model.unet]):
        yield


@contextlib.contextmanager
def visiting(device, arriving=(), leaving=()):
    """For the block, `arriving` modules on `device` and `leaving` ones in CPU memory; then back."""
    for m in leaving:
        m.to("cpu")
    for m in arriving:
        m.to(device)
    try:
        yield
    finally:
        for m in arriving:
            m.to("cpu")
        for m in leaving:
            m.to(device)


def sharded(module):
    """Whether FSDP2 has split a module's weights (they are then DTensors)."""
    from torch.distributed.tensor import DTensor

    return isinstance(next(module.parameters(), None), DTensor)
