"""The VADER pieces: prompts encoded once, noise, a few decoded frames, and precision and memory.

VADER (Prabhudesai et al., arXiv 2407.08737) aligns a video diffusion model to a reward by
plain gradient ascent on   J(θ) = E_{prompt, z_T} [ r( decode( sampler_θ(z_T, prompt) ), prompt ) ]
with the gradient taken through the sampler's last K steps (sampler.py), through the VAE
decoder, and through a frozen reward model (rewards.py), into LoRA weights θ (lora.py).
train.py's `train_step` puts the pieces below together; the benchmarks run that same step.

The pieces ask a video model (`model`, of a family in models.py) a few questions, the same for
every family:
- `embed(prompts)` -> text embeddings (b, L, D), with `text_encoder_on_device()` around it;
- its latent shape: `latent_channels`, `latent_frames(F)` (1 + (F - 1) / temporal_factor),
  `vae_factor` (pixels per latent cell);
- `decode_frames(z0, frame_idx)` -> the chosen pixel frames (B, f, 3, H, W) in [0, 1], and
  `prefix_frames(F, f)`, how many first frames its VAE must see to decode f of them exactly;
- `denoiser` and `schedule`, which sampler.sample runs.

Two tricks keep VADER affordable, both here:
- Frame subsampling: decoding all F frames through the VAE with gradients is the largest
  memory cost after the denoiser, so only f of them are decoded, random ones each step. SD's VAE
  decodes every frame on its own, so any f frames will do; a causal VAE decodes a frame only
  after the frames before it, so the f come from a short prefix of the video. A reward that
  judges motion instead reads f frames spread over the whole clip at its own frame rate.
- Cached prompt embeddings: the text encoder runs once per prompt, then leaves the GPU.

#### Precision and memory

Every tensor of a training step, its dtype, and why ("base" is the frozen model's dtype: bf16 on
a GPU that has it, fp16 on one that lacks it, float32 on a CPU; `resolve_dtype`):

| tensor | dtype | why |
| --- | --- | --- |
| frozen weights: denoiser, VAE, reward model | base | half the memory; never updated, so rounding cannot accumulate and no float32 master copy is needed. No autocast: each op runs in its weights' dtype |
| text encoder | base, on the GPU only to encode | not needed once the prompts are cached |
| text embeddings (P, L, D) | base | cached for the whole run |
| LoRA A, B, their gradients, AdamW's moments | float32 | bf16 would round an lr-2e-4 update of a weight of 0.01 to 1.83e-4, and one of a weight of 0.0625 or more to nothing (lora.py) |
| latents x_t between sampler steps | float32 | DDIM subtracts nearly equal numbers when ᾱ is near 1 (sampler.guided_output) |
| denoiser activations | base | inside a LoRA layer the low-rank branch runs in float32 and its output is cast back (lora.LoRAUpdate) |
| decoded frames (B, f, 3, H, W), loss, rewards | float32 | the reward's preprocessing works in float32; with fp16 the loss is scaled before backward (`loss_scaler`) |

What autograd keeps for backward is cut three ways, each where it happens:
1. Checkpointing inside the denoiser, always on (`model.enable_checkpointing`: `checkpoint_blocks`
   below for the UNets): a grad step keeps each module's input, and backward recomputes one
   module at a time, for one more denoiser forward per grad step. Guidance's two passes run as
   two calls in a grad step (sampler.guided_output), so backward holds one pass's activations.
2. Checkpointing each denoiser call of a grad step (sampler.sample's `checkpoint_steps`), only
   with --low-memory: a grad step keeps only its inputs, so memory stays flat in K, for one more
   denoiser forward per grad step on top of (1).
3. Checkpointed decoding (`model.decode_frames`), always on: the decoder's activations are
   recomputed in backward, at two more decoder forwards of f frames per step, and inside the
   decode each of the decoder's resnets is a checkpoint of its own; with --low-memory each frame
   is its own checkpoint.
--low-memory also moves what autograd still saves, and idle weights, to CPU memory and back, at
the cost of copies (infra/offload.py). What each lever saves at real sizes is predicted by
`python bench.py memory` (BENCHMARKS.md).
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint

from infra.offload import denoiser_in_cpu_memory
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

def initial_noise(model, batch, frames, height, width, generator, device):
    """z_T ~ N(0, I), (B, C, F_lat, h, w), drawn on the CPU so a seed gives the same video on any device."""
    shape = (batch, model.latent_channels, model.latent_frames(frames), height // model.vae_factor,
             width // model.vae_factor)
    return torch.randn(shape, generator=generator).to(device)  # (B, C, F_lat, h, w)


def choose_frames(num_frames, f, generator=None):
    """Indices of the f frames to decode this step: random, drawn from the run's generator, sorted."""
    return torch.randperm(num_frames, generator=generator)[:f].sort().values


def spread_frames(num_frames, f):
    """f frames spread evenly over the clip, the first and the last included: round(linspace(0, F - 1, f)),
    the frames a video reader sampling the clip at a lower rate picks."""
    return torch.linspace(0, num_frames - 1, f).round().long()


def reads_whole_clip(reward_fn):
    """Whether a reward watches the clip at its own frame rate (it then carries `fps`: VideoReward)."""
    return getattr(reward_fn, "fps", None) is not None


def decode_f_frames(model, z0, frames, f, generator, spread=False, one_at_a_time=False):
    """f of the F frames of each video z0 (B, C, F_lat, h, w), decoded with gradients -> (B, f, 3, H, W) in [0, 1].

    Random frames, from the prefix the VAE decodes exactly (the whole video for SD's VAE), or with
    `spread` frames spread over the whole clip, for a reward that judges motion: for SD's VAE they
    cost what any f frames cost, while a causal VAE must decode every latent frame up to the last
    one. `one_at_a_time` (--low-memory) makes each frame's decode a checkpoint of its own.
    """
    if spread:
        return model.decode_frames(z0, spread_frames(frames, f).to(z0.device), one_at_a_time=one_at_a_time)
    prefix = model.prefix_frames(frames, f)  # the first `prefix` pixel frames can be decoded exactly
    idx = choose_frames(prefix, f, generator).to(z0.device)
    z0 = z0[:, :, :model.latent_frames(prefix)]  # (B, C, F_prefix, h, w)
    return model.decode_frames(z0, idx, one_at_a_time=one_at_a_time)  # (B, f, 3, H, W)


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
    (forward, *args) runs the checkpoint, for units that need another kind."""
    for unit in units:
        unit.__dict__.pop("forward", None)  # back to the class's own forward
        if enabled:
            unit.forward = functools.partial(wrap, unit.forward)


#### Precision

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
    while the VAE decodes every frame.
    """
    device = cond.device
    z_T = torch.cat([
        initial_noise(model, 1, frames, height, width, torch.Generator().manual_seed(seed + i), device)
        for i in range(len(cond))
    ])  # (B, C, F_lat, h, w)
    z0 = sample(model.denoiser, z_T, cond, uncond, model.schedule, num_steps, guidance)
    with denoiser_in_cpu_memory(model, low_memory):
        return model.decode_frames(z0, torch.arange(frames, device=device))  # (B, F, 3, H, W)
