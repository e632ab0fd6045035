"""The VADER glue: prompts in, a few decoded frames out, the loss; plus plain generation.

VADER (Prabhudesai et al., arXiv 2407.08737) aligns a video diffusion model to a reward by
plain gradient ascent on   J(θ) = E_{prompt, z_T} [ r( decode( DDIM_θ(z_T, prompt) ), prompt ) ]
with the gradient taken through the sampler's last K steps (sampler.py), through the VAE
decoder, and through a frozen reward model (rewards.py), into LoRA weights θ (lora.py).

Two tricks keep that affordable, both here:
- Frame subsampling: decoding all F frames through the VAE with gradients is the largest
  memory cost, so only f of them are decoded (random ones each step); the reward sees those.
- Cached prompt embeddings: the text encoder runs once per prompt, then leaves the GPU.
`--low-memory` trades more speed for memory (`vader_loss`), and `loss_scaler` makes an fp16
base train safely. The model registry and loading live in models.py.
"""
import contextlib
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from common import UserError
from models import (  # noqa: F401  (the registry and loading live in models.py; re-exported here)
    MODELS,
    MODELSCOPE_SCHEDULER,
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
    ModelSpec,
    VideoModel,
    build_tiny_model,
    describe,
    load_video_model,
    resolve_device,
    resolve_dtype,
    write_clip_tokenizer,
)
from sampler import sample

PROMPTS_DIR = Path(__file__).parent / "prompts"


def read_prompts(arg):
    """Prompts from a file: a path, or a file name under prompts/. One a line; '#' starts a comment."""
    path = Path(arg)
    if not path.exists() and (PROMPTS_DIR / arg).exists():
        path = PROMPTS_DIR / arg
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in PROMPTS_DIR.glob("*.txt")))
        raise UserError(f"prompts file {arg!r} not found; pass a path or one of prompts/: {known}")
    prompts = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts; write one prompt a line")
    return prompts


@torch.no_grad()
def encode_prompts(model, prompts, batch=32):
    """Text embeddings (P, 77, D) for P prompts, on the text encoder's device.

    VADER's prompts come from a fixed list, so each is encoded once, before training, and the
    text encoder is not needed again (train.py moves it off the GPU).
    """
    device = next(model.text_encoder.parameters()).device
    out = []
    for i in range(0, len(prompts), batch):
        ids = model.tokenizer(prompts[i:i + batch], padding="max_length", truncation=True,
                              max_length=model.tokenizer.model_max_length, return_tensors="pt").input_ids
        out.append(model.text_encoder(ids.to(device))[0])  # (b, 77, D): the last hidden state
    return torch.cat(out)  # (P, 77, D)


#### Frame-subsampled decoding and the loss

def choose_frames(num_frames, f, generator=None, random_frames=True):
    """Indices of the f frames to decode: random and sorted (training), or evenly spaced."""
    if random_frames:
        return torch.randperm(num_frames, generator=generator)[:f].sort().values
    return torch.linspace(0, num_frames - 1, f).round().long()


def decode_frames(model, z0, frame_idx, use_checkpoint=True, one_at_a_time=False):
    """Decode only the chosen frames of z0 (B, C, F, h, w) -> frames (B, f, 3, H, W) in [0, 1].

    The VAE is a 2D image decoder, so the f frames of each video are folded into the batch.
    With `use_checkpoint`, the decoder's activations are recomputed during backward instead of
    stored: for ModelScope at 256x256 they are several GB per frame. With `one_at_a_time`
    (--low-memory) each frame is its own checkpoint, so backward recomputes one frame's
    activations at a time instead of all B*f at once; it costs B*f small decoder calls instead
    of one batched call (nothing when B*f = 1, VADER's setting).
    """
    z = z0[:, :, frame_idx]  # (B, C, f, h, w)
    b, c, f, h, w = z.shape
    z = z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B*f, C, h, w)
    z = (z / model.vae.config.scaling_factor).to(model.vae.dtype)  # undo the latent scaling of LDM

    def decode(z):
        return model.vae.decode(z).sample  # (n, 3, H, W) in about [-1, 1]

    def run(z):
        return checkpoint(decode, z, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else decode(z)

    x = torch.cat([run(zi) for zi in z.split(1)]) if one_at_a_time else run(z)  # (B*f, 3, H, W)
    x = (x.float() / 2 + 0.5).clamp(0, 1)  # (B*f, 3, H, W) in [0, 1]
    return x.view(b, f, *x.shape[1:])  # (B, f, 3, H, W)


def initial_noise(model, batch, frames, height, width, generator, device):
    """z_T ~ N(0, I), (B, C, F, h, w), drawn on the CPU so a seed gives the same video on any device."""
    if height % model.vae_factor or width % model.vae_factor:
        raise UserError(f"height and width must be multiples of {model.vae_factor} (the VAE's factor), got {height}x{width}")
    shape = (batch, model.latent_channels, frames, height // model.vae_factor, width // model.vae_factor)
    return torch.randn(shape, generator=generator).to(device)  # (B, C, F, h, w)


def vader_loss(model, reward_fn, prompts, cond, uncond, cfg, generator, grad_steps, shard=(0, 1),
               low_memory=False):
    """One VADER forward pass for a batch: sample with truncated backprop, decode f frames, score.

    cond/uncond: (B, 77, D) cached text embeddings. `cfg` supplies frames, height, width,
    num_steps, guidance, decode_frames. Returns (loss, rewards (B,) detached, frames (B, f, 3, H, W)).
    The loss is -mean(r): gradient ascent on the reward (VADER's "-r" form).

    shard = (rank, world): under torchrun every process draws the noise of the whole global
    batch (world * B videos) from the same generator and keeps its own B, so N processes compute
    exactly what one process with N * B videos would, and every generator stays in step.

    Memory. By default the UNet's blocks are checkpointed (models.checkpoint_blocks), so each of
    the K grad steps keeps its block boundaries until backward. `low_memory` trades speed for
    memory three ways: (1) each grad step is also checkpointed whole (sampler.sample), so only
    its input latent is kept and memory stays flat in K, at one more UNet forward per grad step;
    (2) the VAE decodes and recomputes one frame at a time (`decode_frames`); (3) what autograd
    still saves outside those checkpoints (the reward model's activations, DDIM's arithmetic)
    goes to CPU memory (pinned, on a GPU) and comes back during backward, at the cost of the copies.
    """
    rank, world = shard
    device = cond.device
    b = len(prompts)
    z_T = initial_noise(model, b * world, cfg.frames, cfg.height, cfg.width, generator, device)  # (world*B, C, F, h, w)
    z_T = z_T[rank * b:(rank + 1) * b]  # (B, C, F, h, w): this process's share
    offload = torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
    with offload if low_memory else contextlib.nullcontext():
        z0 = sample(model.unet, z_T, cond, uncond, model.schedule, cfg.num_steps, cfg.guidance, grad_steps,
                    use_checkpoint=low_memory)  # (B, C, F, h, w)
        idx = choose_frames(cfg.frames, cfg.decode_frames, generator).to(device)
        frames = decode_frames(model, z0, idx, one_at_a_time=low_memory)  # (B, f, 3, H, W)
        rewards = reward_fn(frames, prompts).float()  # (B,)
    return -rewards.mean(), rewards.detach(), frames.detach()


def loss_scaler(dtype, device):
    """Dynamic loss scaling for an fp16 base; a no-op (enabled=False) for bf16 and float32.

    fp16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero on their way back through
    the fp16 UNet and VAE, and small LoRA gradients vanish. Multiplying the loss by S (scaler.scale)
    lifts them into range; scaler.unscale_ divides the float32 LoRA gradients by S before clipping;
    scaler.step skips the update when an inf or NaN shows the scale was too large, and
    scaler.update halves S then (and doubles it after 2000 clean steps). S starts at 2^10 rather
    than PyTorch's 2^16, so the first steps are not spent skipping updates while S comes down
    (train.py stops after --max-bad-steps skipped steps in a row). bf16 has float32's exponent
    range and needs none of this.
    """
    return torch.amp.GradScaler(torch.device(device).type, init_scale=2.0**10, enabled=dtype == torch.float16)


@torch.no_grad()
def generate(model, cond, uncond, frames, height, width, num_steps, guidance, seed, progress=None):
    """Plain generation (no gradients, all frames decoded): (B, F, 3, H, W) in [0, 1].

    Video i of the batch uses seed `seed + i`, so a video depends only on its own seed and
    prompt, not on what else is in the batch.
    """
    device = cond.device
    z_T = torch.cat([
        initial_noise(model, 1, frames, height, width, torch.Generator().manual_seed(seed + i), device)
        for i in range(len(cond))
    ])  # (B, C, F, h, w)
    z0 = sample(model.unet, z_T, cond, uncond, model.schedule, num_steps, guidance, progress=progress)
    return decode_frames(model, z0, torch.arange(frames, device=device))  # (B, F, 3, H, W)
