"""Train the toy judge (toy/judge.py) and report how well it reads clips; writes toy/judge.safetensors.

    python -m toy.train_judge                 # the committed judge (all defaults)
    python -m toy.train_judge --out FILE      # elsewhere

A reward model is only useful where the videos it will score live, so the judge learns from
three kinds of clip of every colour/shape pair, the pairs held out of the video model's
pretraining included (the judge knows what a blue triangle looks like even if the video model
does not):
1. rendered clips (toy/world.py), sharp and exactly labelled by their captions;
2. the same clips passed through the toy model's VAE, blurred as every decoded video is;
3. the toy model's own samples, labelled by their captions only where the weight-free detector
   reads the same value (a "blue triangle" the model drew as a circle teaches nothing about
   its shape; its colour, size and direction still count).
The samples come from seeds (SAMPLE_SEED onwards) that no evaluation uses. The report reads
fresh rendered clips, and base-model samples at other seeds (REPORT_SEED onwards) against the
detector, whose rules are not learned and so are the reference for what was drawn.
"""
import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from infra.files import atomic_path
from toy import world
from toy.judge import ATTRIBUTES, JUDGE_FILE, Judge, classify, labels

SAMPLE_SEED = 100_000  # base-model samples for training use seeds from here on
REPORT_SEED = 200_000  # and those of the report from here
FRAME_DROP = 0.5  # chance that a batch keeps a random subset of frames, as frame-subsampled decoding does


def log(msg, t0):
    print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)


@torch.no_grad()
def reconstruct(vae, videos, chunk=256):
    """Videos (B, F, 3, H, W) in [0, 1] through the VAE and back, as decoded samples look."""
    frames = videos.flatten(0, 1) * 2 - 1  # (B*F, 3, H, W) in [-1, 1]
    out = [vae.decode(vae.encode(x).latent_dist.mean).sample for x in frames.split(chunk)]  # each (n, 3, H, W)
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1).view(videos.shape)  # (B, F, 3, H, W)


@torch.no_grad()
def model_samples(model, n, seed):
    """n samples of the base model, video i of the i-th caption (cycling through all 96) with seed
    `seed` + i: (n, F, 3, H, W) in [0, 1], and their captions."""
    from toy.evaluate import sample_model

    every = [c.caption for c in world.all_clips("all")]
    captions = [every[i % len(every)] for i in range(n)]
    return sample_model(model, captions, seed), captions


def detected_labels(videos):
    """{attribute: (B,)} the values the weight-free detector reads in each video; -100 (ignored by
    cross-entropy) where it reads nothing."""
    out = {a: torch.full((len(videos),), -100) for a in ATTRIBUTES}
    for i, video in enumerate(videos):
        found = world.detect(video)
        for a in ATTRIBUTES:
            if found is not None:
                out[a][i] = ATTRIBUTES[a].index(getattr(found, a))
    return out


def loss_fn(judge, videos, targets, generator):
    """Cross-entropy of every attribute, per frame (colour, shape, size) and per consecutive pair
    (direction); half the batches keep only a random sorted subset of 2+ frames, so the judge
    also reads directions across the gaps that frame-subsampled decoding leaves."""
    frames = videos.shape[1]
    if torch.rand(1, generator=generator).item() < FRAME_DROP:
        keep = torch.randint(2, frames + 1, (1,), generator=generator).item()
        videos = videos[:, torch.randperm(frames, generator=generator)[:keep].sort().values]  # (B, f, 3, H, W)
    loss = 0.0
    for a, logits in judge(videos).items():  # (B, n, values)
        target = targets[a].view(-1, 1).expand(-1, logits.shape[1])  # (B, n)
        loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    return loss


def accuracy(judge, videos, truth):
    """Per attribute, the fraction of videos whose judge reading matches `truth` (a list of Clip or None)."""
    read = classify(judge, videos)
    kept = [(r, t) for r, t in zip(read, truth) if t is not None]
    return {a: sum(getattr(r, a) == getattr(t, a) for r, t in kept) / max(1, len(kept)) for a in ATTRIBUTES}


def report(judge, model, vae, args, t0):
    """The judge's accuracy on fresh rendered clips, their VAE reconstructions and base-model samples."""
    videos, captions = next(world.batches(args.report_clips, seed=args.seed + 1, split="all"))
    truth = [world.Clip.parse(c) for c in captions]
    rows = {"rendered clips": accuracy(judge, videos, truth),
            "VAE reconstructions": accuracy(judge, reconstruct(vae, videos), truth)}
    samples, captions = model_samples(model, args.report_samples, REPORT_SEED)
    detected = [world.detect(v) for v in samples]
    rows["base-model samples (vs detector)"] = accuracy(judge, samples, detected)
    for name, acc in rows.items():
        log(f"judge on {name:34s} " + "  ".join(f"{a} {v:.3f}" for a, v in acc.items()), t0)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(JUDGE_FILE), help="safetensors file to write")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16, help="clips of each of the three kinds per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--pool", type=int, default=768, help="rendered clips reconstructed by the VAE once, drawn from")
    p.add_argument("--samples", type=int, default=288, help="base-model samples to learn from (3 of each caption)")
    p.add_argument("--report-clips", type=int, default=384, help="rendered clips the report reads")
    p.add_argument("--report-samples", type=int, default=96, help="base-model samples the report reads (1 a caption)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    from models import load_video_model
    from toy.pretrain import cosine_lr

    torch.set_num_threads(1)
    t0 = time.time()
    model = load_video_model("toy")
    model.spec = replace(model.spec, num_steps=10, guidance=3.0)  # the toy registry entry's sampler
    # The VAE costs more than the judge's step, so its reconstructions are made once, as a pool.
    clips, captions = next(world.batches(args.pool, seed=args.seed + 2, split="all"))  # (P, F, 3, H, W)
    recon = reconstruct(model.vae, clips)
    pools = [(recon, detected_labels(recon))]
    samples, captions = model_samples(model, args.samples, SAMPLE_SEED)
    pools.append((samples, detected_labels(samples)))
    log(f"{len(samples)} base-model samples; caption kept for " + "  ".join(
        f"{a} {(t >= 0).float().mean():.2f}" for a, t in pools[1][1].items()), t0)

    torch.manual_seed(args.seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=args.lr)
    sched = cosine_lr(opt, args.steps)
    data, g = world.batches(args.batch, seed=args.seed, split="all"), torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        clips, captions = next(data)  # (B, F, 3, H, W)
        targets = labels(captions)
        for pool, pool_targets in pools:
            pick = torch.randint(len(pool), (args.batch,), generator=g)
            clips = torch.cat([clips, pool[pick]])  # (B + ..., F, 3, H, W)
            targets = {a: torch.cat([t, pool_targets[a][pick]]) for a, t in targets.items()}
        loss = loss_fn(judge, clips, targets, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            log(f"judge step {step:5d}  loss {loss.item():.4f}", t0)
    judge = judge.half().float().eval()  # the float16 judge that will be saved
    report(judge, model, model.vae, args, t0)
    with atomic_path(args.out) as tmp:
        save_file({k: v.half().contiguous() for k, v in judge.state_dict().items()}, tmp)
    log(f"saved {args.out}", t0)


if __name__ == "__main__":
    main()
