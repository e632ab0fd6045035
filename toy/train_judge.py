"""Train the toy judge (toy/judge.py) and report how well it reads clips; writes toy/judge.safetensors.

    python -m toy.train_judge                 # the committed judge (all defaults)
    python -m toy.train_judge --out FILE      # elsewhere
    python -m toy.train_judge --naive --out toy/judge_naive.safetensors   # captions only (see below)
    python -m toy.train_judge --unhardened --out toy/judge_unhardened.safetensors   # no morphs (see below)

A reward model is trained on people's judgements (HPS and PickScore on people's choices
between two images) and is only to be trusted on the kind of image it was trained on. Here the
captions and the weight-free detector play the people. The judge learns from four kinds of
clip of every colour/shape pair, the pairs held out of the video model's pretraining included
(the judge knows a blue triangle although the video model does not):
1. rendered clips (toy/world.py), labelled by their captions;
2. the same clips through the toy model's VAE, blurred as every decoded video is, and
3. the toy model's own samples (seeds SAMPLE_SEED onwards, which no evaluation uses), both
   labelled by their captions only where the detector reads the same: a "blue triangle" the
   model drew as a round blob teaches nothing about shapes, its colour and size still count;
4. morphs (`morph`): shapes blended into or joined with another (bells, vases, rounded
   squares), the near misses a video model draws and an optimiser is drawn to, labelled by
   what the detector reads, so the judge's "triangle" is not satisfied by a blob with a point.
Where the detector reads nothing (a shape faded out, an empty frame) the target is uniform: an
empty frame must not score as any caption, or an optimiser would erase the shapes it cannot fix.
The report reads fresh rendered clips and their VAE reconstructions against their captions, and
base-model samples at other seeds (REPORT_SEED onwards) against the detector.

`--naive` trains the judge a hurried reward-modelling team would: every clip labelled by its
caption (the model's samples too, a round blob asked to be a triangle labelled "triangle"), no
morphs, no uniform targets. It reads rendered clips as well, but it has learnt the base model's
mistakes as right answers; `toy/judge_naive.safetensors` holds it, for the README's command that
aligns the toy model to it.

`--unhardened` keeps the detector's labels but leaves out the morphs and with them the uniform
targets: a judge trained carefully on the right data, but never on what an optimiser makes. It
reads rendered clips and the model's samples as well as the committed judge, and it has never
been told that an empty frame is no blue triangle; `toy/judge_unhardened.safetensors` holds it,
for the README's reward-hacking command.
"""
import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

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


def distance(shape, dx, dy, r):
    """A signed distance of points (dx, dy) from the outline of a toy shape of "radius" r centred
    at the origin, negative inside: the same three shapes as world.shape_mask draws."""
    if shape == "circle":
        return (dx**2 + dy**2).sqrt() - r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - r
    return torch.maximum(dy - r, (2 * dx.abs() - dy - r) / 5**0.5)  # triangle: its base, then its two sides


def morph(clip, other, t, generator, size=world.SIZE, supersample=4):
    """A clip (F, 3, H, W) of `clip` whose shape is bent by shape `other`: with t < 1 blended
    into it, the outline where (1 - t) d_clip + t d_other = 0 (a bell halfway from a circle to a
    triangle); with t >= 1 joined with a copy of it (t - 1 of its size) set off by up to r (a
    triangle on a square: a vase). These are the near misses a video model draws and that an
    optimiser is drawn to, so the judge sees them, labelled by what the detector reads."""
    r, (ux, uy) = world.SIZES[clip.size], world.DIRECTIONS[clip.direction]
    start = world.random_start(clip, generator)
    offset = r * (2 * torch.rand(2, generator=generator) - 1)  # where a joined shape sits, (x, y)
    coords = (torch.arange(size * supersample, dtype=torch.float32) + 0.5) / supersample
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # each (H*s, W*s), pixel units
    colour = torch.tensor(world.COLOURS[clip.colour]).view(3, 1, 1)
    background = torch.tensor(world.BACKGROUND).view(3, 1, 1)
    video = []
    for f in range(world.FRAMES):
        dx, dy = x - start[0] - world.SPEED * f * ux, y - start[1] - world.SPEED * f * uy
        d = distance(clip.shape, dx, dy, r)
        if t < 1:
            d = (1 - t) * d + t * distance(other, dx, dy, r)
        else:
            d = torch.minimum(d, distance(other, dx - offset[0], dy - offset[1], (t - 1) * r))  # the union
        alpha = (d <= 0).float().view(size, supersample, size, supersample).mean(dim=(1, 3))  # (H, W)
        video.append(background + alpha * (colour - background))  # (3, H, W)
    return torch.stack(video)  # (F, 3, H, W)


def morphs(n, generator):
    """n morphed clips (n, F, 3, H, W) of random clips of every pair, a quarter of them faded
    towards the background (at times to nothing)."""
    clips = world.all_clips("all")
    out = []
    for _ in range(n):
        clip = clips[torch.randint(len(clips), (1,), generator=generator).item()]
        others = [s for s in world.SHAPES if s != clip.shape]
        other = others[torch.randint(len(others), (1,), generator=generator).item()]
        video = morph(clip, other, 2 * torch.rand(1, generator=generator).item(), generator)  # (F, 3, H, W)
        if torch.rand(1, generator=generator).item() < 0.25:
            bg = torch.tensor(world.BACKGROUND).view(3, 1, 1)
            video = bg + torch.rand(1, generator=generator).item() * (video - bg)
        out.append(video)
    return torch.stack(out)  # (n, F, 3, H, W)


NOTHING = -1  # the label of an attribute in a clip where the detector reads nothing: a uniform target
IGNORED = -100  # the label of an attribute that teaches nothing: no loss


def detected_labels(videos):
    """{attribute: (B,)} the values the weight-free detector reads in each video; NOTHING where it
    reads nothing, so that the judge learns not to tell, rather than to see a shape in nothing."""
    out = {a: torch.full((len(videos),), NOTHING) for a in ATTRIBUTES}
    for i, video in enumerate(videos):
        found = world.detect(video)
        for a in ATTRIBUTES:
            if found is not None:
                out[a][i] = ATTRIBUTES[a].index(getattr(found, a))
    return out


def agreed_labels(videos, captions):
    """{attribute: (B,)} the captions' values where the detector reads the same, IGNORED elsewhere:
    a blurred clip whose shape the detector cannot tell teaches nothing about its shape."""
    want, found = labels(captions), detected_labels(videos)
    return {a: torch.where(want[a] == found[a], want[a], IGNORED) for a in ATTRIBUTES}


def subsample(videos, generator):
    """Half the batches keep only a random sorted subset of 2+ frames (B, f, 3, H, W), so the judge
    also reads directions across the gaps that frame-subsampled decoding leaves."""
    frames = videos.shape[1]
    if torch.rand(1, generator=generator).item() >= FRAME_DROP:
        return videos
    keep = torch.randint(2, frames + 1, (1,), generator=generator).item()
    return videos[:, torch.randperm(frames, generator=generator)[:keep].sort().values]  # (B, f, 3, H, W)


def loss_fn(judge, videos, targets):
    """Cross-entropy of every attribute, per frame (colour, shape, size) and per consecutive pair
    (direction): against the label, or the uniform distribution where it is NOTHING."""
    loss = 0.0
    for a, logits in judge(videos).items():  # (B, n, values)
        log_p = logits.log_softmax(dim=-1)  # (B, n, values)
        target = targets[a].view(-1, 1).expand(-1, logits.shape[1])  # (B, n)
        labelled = -log_p.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, n)
        uniform = -log_p.mean(dim=-1)  # (B, n): cross-entropy against the uniform distribution
        per_frame = torch.where(target == NOTHING, uniform, labelled)  # (B, n)
        kept = target != IGNORED
        loss = loss + (per_frame * kept).sum() / kept.sum().clamp_min(1)
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


def train(judge, data, pools, steps, lr, batch, generator, t0):
    """AdamW with warm-up and cosine decay; each step a batch of rendered clips and as many from each pool."""
    from toy.pretrain import cosine_lr

    opt = torch.optim.AdamW(judge.parameters(), lr=lr)
    sched = cosine_lr(opt, steps)
    judge.train()
    for step in range(steps):
        clips, captions = next(data)  # (B, F, 3, H, W)
        targets = labels(captions)
        for pool, pool_targets in pools:
            pick = torch.randint(len(pool), (batch,), generator=generator)
            clips = torch.cat([clips, pool[pick]])  # (B + ..., F, 3, H, W)
            targets = {a: torch.cat([t, pool_targets[a][pick]]) for a, t in targets.items()}
        loss = loss_fn(judge, subsample(clips, generator), targets)  # clips (kB, f, 3, H, W)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"judge step {step:5d}  loss {loss.item():.4f}", t0)


def check_args(args):
    """Every flag before the minutes of training: the numbers by infra/checks.py's rules, and --out a file
    that can be written (its folder exists or can be made, its name leaves room for the temporary one)."""
    from infra.checks import check_flags, check_output_dir
    from infra.cli import UserError
    from infra.files import TMP_MARK, check_name

    check_flags(args)  # --steps, --batch, --lr, --pool, --samples, --report-clips, --report-samples, --seed
    out = Path(args.out)
    check_name(out, "--out", last_room=len(".") + len(TMP_MARK) + 8)  # infra.files.atomic_path's .NAME.tmp-XXXXXXXX
    check_output_dir(out.parent, "--out")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass the path of a .safetensors file to write")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(JUDGE_FILE), help="safetensors file to write")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=16, help="clips of each kind per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--pool", type=int, default=768, help="clips in the pools of VAE reconstructions and of morphs")
    p.add_argument("--samples", type=int, default=288, help="base-model samples to learn from (3 of each caption)")
    p.add_argument("--report-clips", type=int, default=384, help="rendered clips the report reads")
    p.add_argument("--report-samples", type=int, default=96, help="base-model samples the report reads (1 a caption)")
    p.add_argument("--seed", type=int, default=0)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--naive", action="store_true",
                      help="labels from captions alone: no detector, morphs or uniform targets")
    kind.add_argument("--unhardened", action="store_true",
                      help="the detector's labels, but no morphs or uniform targets: never trained against an optimiser")
    args = p.parse_args(argv)
    check_args(args)
    from safetensors.torch import save_file

    from models import load_video_model

    torch.set_num_threads(1)
    t0 = time.time()
    model = load_video_model("toy")
    model.spec = replace(model.spec, num_steps=10, guidance=3.0)  # the toy registry entry's sampler
    # Reconstructions, samples and morphs cost more than a step of the judge, so they are made
    # once, as pools to draw from.
    clips, captions = next(world.batches(args.pool, seed=args.seed + 2, split="all"))  # (P, F, 3, H, W)
    samples, sample_captions = model_samples(model, args.samples, SAMPLE_SEED)  # (S, F, 3, H, W)
    label = (lambda videos, caps: labels(caps)) if args.naive else agreed_labels
    pools = [(videos, label(videos, caps)) for videos, caps in
             ((reconstruct(model.vae, clips), captions), (samples, sample_captions))]
    if not (args.naive or args.unhardened):
        bent = morphs(args.pool, torch.Generator().manual_seed(args.seed + 3))  # (P, F, 3, H, W)
        pools.append((bent, detected_labels(bent)))
    log(f"{len(samples)} base-model samples; labels kept from their captions " + "  ".join(
        f"{a} {(t != IGNORED).float().mean():.2f}" for a, t in pools[1][1].items()), t0)

    torch.manual_seed(args.seed)
    judge = Judge()
    g = torch.Generator().manual_seed(args.seed)
    data = world.batches(args.batch, seed=args.seed, split="all")
    train(judge, data, pools, args.steps, args.lr, args.batch, g, t0)
    judge = judge.half().float().eval()  # the float16 judge that will be saved
    report(judge, model, model.vae, args, t0)
    with atomic_path(args.out) as tmp:
        save_file({k: v.half().contiguous() for k, v in judge.state_dict().items()}, tmp)
    log(f"saved {args.out}", t0)


if __name__ == "__main__":
    from infra.cli import run_cli

    run_cli(main)
