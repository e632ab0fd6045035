"""The VADER glue: prompts in, a few decoded frames out, the loss, and the one training step.

VADER (Prabhudesai et al., arXiv 2407.08737) aligns a video diffusion model to a reward by
plain gradient ascent on   J(θ) = E_{prompt, z_T} [ r( decode( DDIM_θ(z_T, prompt) ), prompt ) ]
with the gradient taken through the sampler's last K steps (sampler.py), through the VAE
decoder, and through a frozen reward model (rewards.py), into LoRA weights θ (lora.py).

Two tricks keep that affordable, both here:
- Frame subsampling: decoding all F frames through the VAE with gradients is the largest
  memory cost after the UNet, so only f of them are decoded (random ones each step; for Wan's
  causal VAE, from the shortest prefix of the video that holds f frames: `frame_pool`).
- Cached prompt embeddings: the text encoder runs once per prompt, then leaves the GPU.
`train_step` is the one optimizer step that train.py, bench.py and the efficiency benchmark
all run, so what is measured is what is trained.

#### Precision and memory

Every tensor of a training step, its dtype, and why ("base" is the frozen model's dtype: bf16 on
a GPU that has it, fp16 on one that lacks it, float32 on a CPU; models.resolve_dtype):

| tensor | dtype | where | why |
| --- | --- | --- | --- |
| frozen weights: UNet, VAE, reward model | base | GPU | half the memory; never updated, so rounding cannot accumulate and no float32 master copy is needed. No autocast: the modules are cast whole, so each op runs in its weights' dtype |
| text encoder | base | GPU to encode the prompts once, then CPU (Wan's UMT5: CPU, visiting the GPU alone to encode) | not needed after that |
| text embeddings (P, L, D) | base | GPU | cached for the whole run (L = 77, or 512 for Wan) |
| LoRA A, B | float32 | GPU | an lr-2e-4 update of a weight of size ~1e-2 is below bf16's 8-bit mantissa: it would round away |
| LoRA gradients, AdamW's two moments | float32 | GPU | the same reason; 3x the LoRA's size in all (6.65 M parameters for ModelScope) |
| latents x_t between DDIM steps | float32 | GPU | DDIM subtracts nearly equal numbers when ᾱ is near 1 (sampler.guided_eps) |
| UNet activations | base | GPU | the UNet is called on x_t cast to base; inside a LoRA layer the low-rank branch runs in float32 and its output is cast back, with no float32 copy of its input kept for backward (lora.LoRAUpdate) |
| decoded frames (B, f, 3, H, W) | float32 in [0, 1] | GPU | the reward's preprocessing works in float32 |
| reward activations | base | GPU | the reward model's weights |
| loss, rewards | float32 | GPU | with fp16, the loss is multiplied by a dynamic scale before backward (`loss_scaler`) |

What autograd keeps for backward is cut three ways, each where it happens (Wan's transformer
uses diffusers' own checkpointing of each of its 30 blocks for (1), and its causal VAE is
checkpointed whole for (3), see `decode_causal`):
1. Checkpointing inside the UNet (models.checkpoint_blocks), always on: during a grad step each
   resnet, attention and temporal module of the UNet's blocks keeps only its input, and backward
   recomputes one at a time, so the peak holds one module's activations. Cost: one more UNet
   forward per grad step (about 4 forward-equivalents instead of 3, counting backward as 2).
   No-grad steps are unaffected. Guidance's two passes run as two calls in a grad step
   (sampler.guided_eps), so backward holds one pass's activations at a time.
2. Whole-step checkpointing (sampler.sample's `checkpoint_steps`), only with --low-memory: a grad
   step keeps only its input latent, so memory stays flat in K. Cost: one more UNet forward per
   grad step on top of (1), as the step is re-run before its blocks are.
3. Checkpointed decoding (`decode_frames`), always on: the VAE decoder's activations are
   recomputed in backward, one decoder resnet at a time (models.checkpoint_blocks), at two more
   decoder forwards per step (of f frames: cheap); with --low-memory each of the
   B*f frames is its own checkpoint. --low-memory also moves what autograd still saves (the
   reward model's activations, DDIM's arithmetic) to CPU memory and back, at the cost of copies.
"""
import contextlib
import math

import torch
from torch.utils.checkpoint import checkpoint

from infra.cli import UserError
from sampler import sample


@torch.no_grad()
def encode_prompts(model, prompts, batch=32):
    """Text embeddings (P, L, D) for P prompts, on the model's device: L = 77 for CLIP, 512 for Wan.

    VADER's prompts come from a fixed list, so each is encoded once, before training, and the
    text encoder is not needed again (train.py moves it off the GPU; Wan's never stays there).
    Wan's UMT5 reads the prompt with an attention mask, and WanPipeline zeroes the embeddings of
    the padding tokens before the transformer sees them; both are done here the same way. CLIP
    encoders (the UNet families) were trained on padded prompts and read the padding as is.
    """
    out = []
    with model.text_encoder_on_device():
        device = next(model.text_encoder.parameters()).device
        for i in range(0, len(prompts), batch):
            tokens = model.tokenizer(prompts[i:i + batch], padding="max_length", truncation=True,
                                     max_length=model.text_length, return_tensors="pt")
            if model.wan:
                mask = tokens.attention_mask.to(device)  # (b, 512): 1 for the prompt's tokens
                emb = model.text_encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
                out.append(emb * mask[..., None].to(emb.dtype))  # (b, 512, 4096), padding zeroed
            else:
                out.append(model.text_encoder(tokens.input_ids.to(device))[0])  # (b, 77, D): the last hidden state
    return torch.cat(out).to(model.device)  # (P, L, D)


#### Frame-subsampled decoding and the loss

def choose_frames(num_frames, f, generator=None):
    """Indices of the f frames to decode this step: random, drawn from the run's generator, sorted."""
    return torch.randperm(num_frames, generator=generator)[:f].sort().values


def frame_pool(model, frames, f):
    """How many of the first pixel frames the f decoded frames are drawn from.

    SD's VAE decodes each frame alone, so any f of all F frames cost the same: the pool is F.
    Wan's VAE is causal in time (decode_causal): pixel frames 1..4 come from latent frame 1 *and*
    the cache that latent frame 0 left behind, and so on, so a frame can only be decoded exactly
    by decoding every latent frame before it. The pool is therefore the shortest prefix that
    holds f frames: m = 1 + ceil((f - 1) / 4) latent frames, 1 + 4 (m - 1) pixel frames
    (f = 1: latent frame 0, pixel frame 0 alone, the cheapest; f = 5: 2 latent frames). The
    reward then sees only the start of the video, the price of exactness.
    """
    if not model.wan:
        return frames
    r = model.temporal_factor
    return min(frames, 1 + r * math.ceil((f - 1) / r))


def decode_frames(model, z0, frame_idx, use_checkpoint=True, one_at_a_time=False):
    """Decode only the chosen frames of z0 (B, C, F, h, w) -> frames (B, f, 3, H, W) in [0, 1].

    Wan's causal VAE is handed to `decode_causal`. SD's VAE is a 2D image decoder, so the f
    frames of each video are folded into the batch.
    With `use_checkpoint`, the decoder's activations are recomputed during backward instead of
    stored: for ModelScope at 256x256 they are several GB per frame. With `one_at_a_time`
    (--low-memory) each frame is its own checkpoint, so backward recomputes one frame's
    activations at a time instead of all B*f at once; it costs B*f small decoder calls instead
    of one batched call (nothing when B*f = 1, VADER's setting).
    """
    if model.wan:
        return decode_causal(model, z0, frame_idx, use_checkpoint, one_at_a_time)
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


def decode_causal(model, z0, frame_idx, use_checkpoint=True, one_at_a_time=False):
    """Wan: decode all m latent frames of z0 (B, C, m, h, w), keep pixel frames `frame_idx` of the 1 + 4 (m - 1).

    z0 may be the first m latent frames of a longer video (vader_loss passes the prefix that
    frame_pool names): the frames returned equal those of a full decode, exactly, because the
    decoder only looks back. Cost: the decoder's activations of 1 + 4 (m - 1) frames at full
    resolution, recomputed in backward under one checkpoint; every latent frame beyond the first
    adds four frames' worth. (The decoder's blocks are not checkpointed one by one, as SD's are:
    each call advances a feature cache shared by the whole decode, so a block run again on its
    own would read the cache of a later frame.)

    The checkpoint runs with `early_stop=False`. By default a checkpoint's recomputation stops as
    soon as it has rebuilt the tensors backward needs, here before the decode's final
    `clear_cache()`; the VAE's causal cache would then keep the recomputed activations alive
    through the whole transformer backward that follows (at 480x832x33, a peak 3.7 GiB higher).
    """
    config = model.vae.config
    mean = torch.tensor(config.latents_mean, device=z0.device).view(1, -1, 1, 1, 1)  # (1, C, 1, 1, 1)
    std = torch.tensor(config.latents_std, device=z0.device).view(1, -1, 1, 1, 1)
    z = (z0 * std + mean).to(model.vae.dtype)  # (B, C, m, h, w): undo Wan's per-channel normalisation

    def decode(z):
        return model.vae.decode(z).sample  # (n, 3, 1 + 4 (m - 1), H, W) in [-1, 1]

    def run(z):
        if use_checkpoint and torch.is_grad_enabled():
            return checkpoint(decode, z, use_reentrant=False, early_stop=False)
        return decode(z)

    x = torch.cat([run(zi) for zi in z.split(1)]) if one_at_a_time else run(z)  # (B, 3, 1 + 4 (m - 1), H, W)
    x = x[:, :, frame_idx.to(x.device)]  # (B, 3, f, H, W)
    return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, f, 3, H, W) in [0, 1]


def check_video_shape(model, frames, height, width):
    """UserError unless the model can make a video of this size: height and width multiples of the
    VAE's factor (times the 2x2 patches of Wan's transformer), and for Wan 1 + 4k frames."""
    m, r = model.size_multiple, model.temporal_factor
    if height % m or width % m:
        raise UserError(f"--height and --width must be multiples of {m} (the VAE's downsampling"
                        f"{' times the 2x2 patches' if model.wan else ''}), got {height}x{width}")
    if (frames - 1) % r:
        k = (frames - 1) // r * r + 1
        raise UserError(f"--frames must be 1 + {r}k for this model (its VAE packs {r} frames a latent frame after "
                        f"the first), got {frames}; try {k} or {k + r}")


def initial_noise(model, batch, frames, height, width, generator, device):
    """z_T ~ N(0, I), (B, C, F_lat, h, w), drawn on the CPU so a seed gives the same video on any device.

    F_lat is F, or 1 + (F - 1) / 4 for Wan's causal VAE.
    """
    check_video_shape(model, frames, height, width)
    shape = (batch, model.latent_channels, model.latent_frames(frames), height // model.vae_factor,
             width // model.vae_factor)
    return torch.randn(shape, generator=generator).to(device)  # (B, C, F_lat, h, w)


def vader_loss(model, reward_fn, prompts, cond, uncond, cfg, generator, grad_steps, shard=(0, 1),
               low_memory=False):
    """One VADER forward pass for a batch: sample with truncated backprop, decode f frames, score.

    cond/uncond: (B, 77, D) cached text embeddings. `cfg` supplies frames, height, width,
    num_steps, guidance, decode_frames. Returns (loss, rewards (B,) detached, frames (B, f, 3, H, W)).
    The loss is -mean(r): gradient ascent on the reward (VADER's "-r" form).

    shard = (rank, world): under torchrun every process draws the noise of the whole global
    batch (world * B videos) from the same generator and keeps its own B, so N processes compute
    exactly what one process with N * B videos would, and every generator stays in step.

    `low_memory`: checkpointing mechanisms (2) and (3) of the module docstring, and the CPU offload.
    """
    rank, world = shard
    device = cond.device
    b = len(prompts)
    z_T = initial_noise(model, b * world, cfg.frames, cfg.height, cfg.width, generator, device)  # (world*B, C, F, h, w)
    z_T = z_T[rank * b:(rank + 1) * b]  # (B, C, F, h, w): this process's share
    offload = torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
    with offload if low_memory else contextlib.nullcontext():
        z0 = sample(model.unet, z_T, cond, uncond, model.schedule, cfg.num_steps, cfg.guidance, grad_steps,
                    checkpoint_steps=low_memory)  # (B, C, F, h, w)
        pool = frame_pool(model, cfg.frames, cfg.decode_frames)  # the first `pool` frames are decodable
        idx = choose_frames(pool, cfg.decode_frames, generator).to(device)
        z0 = z0[:, :, :model.latent_frames(pool)]  # (B, C, F_pool, h, w): all of SD's, Wan's causal prefix
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


def train_step(model, reward_fn, params, optimizer, scaler, draw_batch, uncond, cfg, generator, grad_steps,
               shard=(0, 1), average=None):
    """One optimizer step of VADER, the same for training and for every benchmark.

    For each of `cfg.grad_accum` micro-batches: `draw_batch()` gives (prompts, cond (B, 77, D)),
    `vader_loss` samples with gradients through the last `grad_steps` DDIM steps, decodes
    `cfg.decode_frames` frames and scores them, and the loss, scaled for fp16 and divided by the
    number of micro-batches, is backpropagated into the LoRA `params`. Then: average the
    gradients over processes (`average`, under torchrun; None for one process), unscale them,
    clip their global norm to `cfg.grad_clip`, and step AdamW, unless the loss or the gradient
    is not finite: such an update would poison AdamW's moments for good, so it is skipped.
    `cfg` also supplies frames, height, width, num_steps, guidance and low_memory.

    Returns (loss, rewards (grad_accum * B,) detached, gradient norm before clipping, finite).
    """
    optimizer.zero_grad(set_to_none=True)
    rewards, loss_sum = [], 0.0
    for _ in range(cfg.grad_accum):
        prompts, cond = draw_batch()
        loss, r, _ = vader_loss(model, reward_fn, prompts, cond, uncond, cfg, generator, grad_steps, shard,
                                cfg.low_memory)
        scaler.scale(loss / cfg.grad_accum).backward()  # the mean over micro-batches
        rewards.append(r)
        loss_sum += loss.item() / cfg.grad_accum
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    loss_t = torch.tensor([loss_sum], device=grads[0].device)
    if average is not None:
        average(grads + [loss_t])  # DDP's all-reduce: every process ends with the same gradients
    for p, g in zip(params, grads):
        p.grad = g
    scaler.unscale_(optimizer)  # fp16: divide the gradients by the loss scale before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    finite = math.isfinite(loss_t.item()) and torch.isfinite(grad_norm).item()
    if finite:
        scaler.step(optimizer)
    scaler.update()  # fp16: halve the loss scale after an overflow, grow it after many clean steps
    return loss_t.item(), torch.cat(rewards), grad_norm.item(), finite


@torch.no_grad()
def generate(model, cond, uncond, frames, height, width, num_steps, guidance, seed):
    """Plain generation (no gradients, all frames decoded): (B, F, 3, H, W) in [0, 1].

    Video i of the batch uses seed `seed + i`, so a video depends only on its own seed and
    prompt, not on what else is in the batch.
    """
    device = cond.device
    z_T = torch.cat([
        initial_noise(model, 1, frames, height, width, torch.Generator().manual_seed(seed + i), device)
        for i in range(len(cond))
    ])  # (B, C, F, h, w)
    z0 = sample(model.unet, z_T, cond, uncond, model.schedule, num_steps, guidance)
    return decode_frames(model, z0, torch.arange(frames, device=device))  # (B, F, 3, H, W)
