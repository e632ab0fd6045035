"""Pretrain the toy-world video model (toy/world.py) on a CPU and save it in the diffusers layout.

Pretraining is not what this project teaches, so this script is short and plain: it exists so
that the committed weights in toy/model/ can be reproduced and changed. Three parts:

1. A tiny `AutoencoderKL` (32x32 frames <-> 4x8x8 latents) trained on single frames with an L1
   reconstruction loss and a small KL term, as Stable Diffusion's VAE is, minus its perceptual
   and adversarial losses (Rombach et al. 2112.10752, Sec. 3.1 and Appendix G).
2. A fixed random CLIP text encoder (infra.tiny.TINY_TEXT, seed 0) whose token embeddings are
   re-drawn with standard deviation 1 instead of CLIP's 0.02 (`random_text_encoder`). Untrained
   weights are fine: cross-attention only needs each caption word to be readable.
3. A tiny `UNet3DConditionModel` trained to predict v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0 (Salimans &
   Ho 2202.00512) under DDPM's linear β schedule (Ho et al. 2006.11239), with 10% of captions
   dropped to "" so classifier-free guidance (Ho & Salimans 2207.12598) has an unconditional
   model to use. Why not ModelScope's ε-prediction and scaled-linear schedule: see TOY_SCHEDULER.

The weights are stored in float16 to keep the folder small. The text encoder and the VAE are
rounded to float16 *before* the UNet trains on their outputs, so the UNet learns exactly the
embeddings and latents that the saved (and reloaded) model produces.

The committed toy/model/ was written by `python -m toy.pretrain` (all defaults); BENCHMARKS.md
says how long that took and how often the samples show what their captions ask for
(`python -m toy.evaluate`).
"""
import argparse
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from infra.files import atomic_write_text
from infra.tiny import MODELSCOPE_SCHEDULER, TINY_TEXT, TINY_UNET, TINY_VAE, write_clip_tokenizer
from models import TOY_FOLDER
from sampler import Schedule
from toy import world

# Three VAE levels: 32x32 frames -> 8x8 latents, so a UNet step costs a sixteenth of 32x32 (a
# 16x16 latent made each step five times slower here). 32 channels at the top, not 16: small
# triangles and circles then keep their shape (the detector reads 86% of reconstructed shapes
# right instead of 72%).
TOY_VAE = dict(TINY_VAE, block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3)
TOY_UNET = dict(TINY_UNET, sample_size=8)
KL_WEIGHT = 1e-6  # Stable Diffusion's VAE weight on the KL term
SHAPE_WEIGHT = 9.0  # extra weight of the shape's pixels in the VAE's L1 loss
DROP_CAPTION = 0.1  # fraction of captions replaced by "" (the unconditional model of CFG)
# Every toy caption is 8 CLIP tokens (start, 6 words, end), so the toy tokenizer pads to 8, not
# CLIP's 77: cross-attention then sees the caption's tokens instead of 69 copies of the padding.
TOKENS = 8
# ModelScope's scaled-linear schedule ends at ᾱ_999 = 0.0047: its noisiest training input still
# holds 7% of the clean latents, enough for the UNet to read where the shape is and which way it
# goes from the input itself, so it never learns to take the direction from the caption, and at
# sampling time, from pure noise, it moved shapes every way at random (25% right, chance). DDPM's
# linear schedule ends at ᾱ_999 = 4e-5, close to the zero terminal SNR that Lin et al.
# (2305.08891) recommend, and with it v-prediction, whose loss does not vanish where the input
# holds no signal (ε-prediction's weight on the clean video there is ᾱ / (1 - ᾱ) ≈ 0). With both,
# 500 steps drew the prompted direction 95% of the time. Our sampler handles both settings.
TOY_SCHEDULER = dict(MODELSCOPE_SCHEDULER, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                     prediction_type="v_prediction")


def random_text_encoder(seed):
    """A random CLIP text encoder in which every position still says which word sits there.

    With CLIP's initialisation (token embeddings of std 0.02) the random attention and MLP layers
    write far more into the residual stream than the word itself, so a late word such as "left"
    is drowned by the words before it: the direction explains about 10% of the variance of the
    output at its own position. Token embeddings of std 1 make each word dominate its position
    (about 98% for every attribute), which is what lets cross-attention learn to read them.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    torch.nn.init.normal_(text_encoder.embeddings.token_embedding.weight, std=1.0)
    return text_encoder.half().float().eval()  # the float16 model that will be saved


def log(msg, t0):
    print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)


def cosine_lr(opt, steps, warmup=50):
    """Linear warm-up, then cosine decay to zero: a stable start and a calm end for tiny models."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train_vae(steps, batch, lr, seed, t0):
    """Train the autoencoder on single frames, each from a different random training clip.

    One frame per clip: the frames of one clip are near copies, so a batch of whole clips
    teaches the VAE far less per step than the same number of frames from different clips.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TOY_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = cosine_lr(opt, steps)
    data, g = world.batches(batch, seed=seed), torch.Generator().manual_seed(seed)
    for step in range(steps):
        videos, _ = next(data)  # (B, F, 3, H, W) in [0, 1]
        frames = videos[torch.arange(batch), torch.randint(world.FRAMES, (batch,), generator=g)]  # (B, 3, H, W)
        x = frames * 2 - 1  # the VAE's range, [-1, 1]
        # The shape covers 5-25% of a frame; weighting its pixels keeps the VAE from settling
        # for a perfect background around a blurred shape.
        weight = 1 + SHAPE_WEIGHT * world.foreground(frames).unsqueeze(1)  # (B, 1, H, W)
        posterior = vae.encode(x).latent_dist
        # Decode the posterior mean: the UNet trains on mean latents, and at this size the noise
        # of sampling them slows training; the KL term only keeps the latents near N(0, I).
        recon = vae.decode(posterior.mode()).sample  # (B, 3, H, W)
        loss = ((recon - x).abs() * weight).mean() + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae  step {step:5d}  loss {loss.item():.4f}", t0)
    return vae.half().float().eval().requires_grad_(False)  # the float16 model that will be saved


@torch.no_grad()
def encode(vae, videos):
    """Videos (B, F, 3, H, W) in [0, 1] -> scaled latents (B, C, F, h, w), the UNet's layout."""
    b, f = videos.shape[:2]
    z = vae.encode(videos.flatten(0, 1) * 2 - 1).latent_dist.mean  # (B*F, C, h, w)
    z = z * vae.config.scaling_factor
    return z.view(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)


def fit_scaling_factor(vae, seed):
    """LDM's latent scaling: 1 / std of the latents, so the diffusion sees unit-variance data.

    Stable Diffusion's 0.18215 was measured the same way on its own VAE (2112.10752, Sec. 4.3.2).
    """
    videos, _ = next(world.batches(64, seed=seed + 1))  # (64, F, 3, H, W)
    vae.register_to_config(scaling_factor=1.0)
    std = encode(vae, videos).std().item()
    vae.register_to_config(scaling_factor=round(1 / std, 5))


@torch.no_grad()
def caption_table(tokenizer, text_encoder, captions):
    """{caption: embedding (TOKENS, D)} for every training caption and "", computed once."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return dict(zip(captions, text_encoder(ids)[0]))  # each (TOKENS, D)


def train_unet(vae, table, steps, batch, lr, seed, t0):
    """Diffusion training: from a clean latent video noised to a random timestep, predict v."""
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(**TOY_UNET)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    sched = cosine_lr(opt, steps)
    alpha_bar = Schedule.from_config(TOY_SCHEDULER).alphas_cumprod()  # ᾱ_t, (T,)
    data = world.batches(batch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        videos, captions = next(data)  # (B, F, 3, H, W)
        z0 = encode(vae, videos)  # (B, C, F, h, w)
        drop = torch.rand(batch, generator=g) < DROP_CAPTION
        cond = torch.stack([table["" if d else c] for c, d in zip(captions, drop)])  # (B, TOKENS, D)
        t = torch.randint(len(alpha_bar), (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)  # ε, (B, C, F, h, w)
        a = alpha_bar[t].view(-1, 1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise  # q(x_t | x_0), Eq. (4) of 2006.11239
        v = a.sqrt() * noise - (1 - a).sqrt() * z0  # the target, Sec. 4 of 2202.00512
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=cond).sample, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step:5d}  loss {loss.item():.4f}", t0)
    return unet.eval()


def write_prompts(folder):
    """The toy prompt files. toy.txt: one training caption per non-red colour/shape pair (so
    `--reward redness` has something to change). toy_heldout.txt: every caption of the held-out
    pairs, the pairs alternating (so the first videos of a run show both). toy_eval.txt: those
    16 again, then two in every five training captions (32), to evaluate an alignment on the
    held-out pairs and check that the seen ones did not suffer."""
    pairs = [(c, s) for c in world.COLOURS if c != "red" for s in world.SHAPES if (c, s) not in world.HELDOUT]
    sizes, dirs = list(world.SIZES), list(world.DIRECTIONS)
    demo = [world.Clip(c, s, sizes[i % 2], dirs[i % 4]).caption for i, (c, s) in enumerate(pairs)]
    atomic_write_text(folder / "toy.txt", "# Toy-world training captions (toy/world.py), none of them red.\n" + "\n".join(demo) + "\n")
    by_pair = [[c.caption for c in world.all_clips("heldout") if (c.colour, c.shape) == pair] for pair in world.HELDOUT]
    held = [caption for group in zip(*by_pair) for caption in group]  # the pairs alternating
    atomic_write_text(folder / "toy_heldout.txt",
                      f"# Toy-world captions never seen in pretraining: the pairs {world.HELDOUT}.\n" + "\n".join(held) + "\n")
    seen = [c.caption for i, c in enumerate(world.all_clips("train")) if i % 5 in (0, 2)]  # 32 of the 80
    atomic_write_text(folder / "toy_eval.txt", "# Evaluation of an alignment on the held-out pairs: their 16 captions, "
                      "then 32 captions of pairs seen in pretraining.\n" + "\n".join(held + seen) + "\n")


MODEL_PARTS = {"scheduler", "text_encoder", "tokenizer", "unet", "vae"}  # what main writes into --out


def check_args(args):
    """Every flag before the minutes of training: the numbers by infra/checks.py's rules, and the folders.
    --out is replaced whole once the model is made, so it must be new or a model this script wrote."""
    from infra.checks import check_flags, check_output_dir
    from infra.cli import UserError

    check_flags(args)  # --vae-steps, --unet-steps, --batch, --vae-lr, --lr, --seed
    final = Path(args.out)
    check_output_dir(final, "--out", room=ROOM)
    check_output_dir(args.prompts_dir, "--prompts-dir")
    if final.is_dir():
        others = sorted(p.name for p in final.iterdir() if p.name not in MODEL_PARTS)
        if others:
            raise UserError(f"--out {final} holds {others[0]}, so it is not a model toy/pretrain.py wrote; it would be "
                            "replaced whole: pass a new folder, or an earlier one of this script")
    elif final.exists() or final.is_symlink():
        raise UserError(f"--out {final} is a file; pass a new folder, or an earlier one of this script")
    from infra.files import check_name

    check_name(final.resolve(), "--out", last_room=len(".partial"))  # written beside it first as NAME.partial


ROOM = 160  # bytes of the deepest file written inside --out (text_encoder/..., tokenizer/...)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(TOY_FOLDER), help="folder to write (the diffusers layout)")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--unet-steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=16, help="clips per UNet step; the VAE sees 2x as many frames")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--lr", type=float, default=4e-3, help="the UNet's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts-dir", default=str(Path(__file__).parent / "prompts"),
                   help="where to write toy.txt, toy_heldout.txt and toy_eval.txt")
    args = p.parse_args(argv)
    check_args(args)
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    torch.set_num_threads(1)  # the laptop CPU is shared; one thread is also the most reproducible
    # Everything goes to a side folder that replaces --out only once complete, so an interrupted
    # run never leaves the committed toy/model/ half overwritten.
    t0, final = time.time(), Path(args.out).resolve()  # resolved: --out . has a name to put .partial beside
    out = final.with_name(final.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    write_clip_tokenizer(out)
    DDIMScheduler(**TOY_SCHEDULER).save_pretrained(out / "scheduler")
    text_encoder = random_text_encoder(args.seed)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer", model_max_length=TOKENS)
    assert max(len(tokenizer(c.caption).input_ids) for c in world.all_clips("all")) <= TOKENS
    tokenizer.save_pretrained(out / "tokenizer")
    table = caption_table(tokenizer, text_encoder, [c.caption for c in world.all_clips("train")] + [""])

    vae = train_vae(args.vae_steps, 2 * args.batch, args.vae_lr, args.seed, t0)
    fit_scaling_factor(vae, args.seed)
    log(f"vae scaling factor {vae.config.scaling_factor}", t0)
    unet = train_unet(vae, table, args.unet_steps, args.batch, args.lr, args.seed, t0)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        m.half().save_pretrained(out / name)
    write_prompts(Path(args.prompts_dir))
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    out.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    log(f"saved {final}", t0)


if __name__ == "__main__":
    from infra.cli import run_cli

    run_cli(main)
