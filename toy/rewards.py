"""The toy world's rewards: what the one shape of a toy clip looks like, with no learned weights.

A toy clip is one coloured shape on a plain dark-grey background, so `world.foreground` (a soft,
differentiable mask of the pixels that differ from that background) finds the shape, and a
statistic of its pixels is something a person can name: its colour, its size, how much it
stands out, how far it moves. On other videos they measure whatever is not dark grey. They follow
the reward contract of rewards.py, whose registry names them. The last, `detector`, is no reward
to train on but a second opinion to evaluate with: the weight-free detector's accuracy.
"""
import torch

from infra.cli import UserError
from rewards import per_frame
from toy.world import BACKGROUND, CHANCE, COLOURS, Clip, by_group, centroids, detect, foreground

MIN_AREA = 20.0  # pixels; the smallest toy shape, a small triangle, covers about 50
MAX_AREA = 300.0  # pixels; the biggest, a big square, covers 16 x 16 = 256


def _masked_mean(values, mask):
    """Mean of `values` (N, H, W) over the pixels of `mask` (N, H, W), weighted -> (N,)."""
    return (values * mask).sum(dim=(-2, -1)) / mask.sum(dim=(-2, -1)).clamp_min(1e-6)


def redness(device="cpu", dtype=torch.float32):
    """Cosine between (pixel - background) and (red - background), over the shape's pixels.

    The toy palette scores red 0.99, yellow 0.78, green 0.21, blue 0.19; an empty frame -0.87.
    Built to resist three ways of gaming a colour reward. Fading: a shape's edge pixels, and a
    shape fading out, are blends α·colour + (1 - α)·background, and the cosine does not depend on
    α, so growing dim earns nothing. Vanishing: the score falls towards -1 as the shape shrinks
    below MIN_AREA pixels (an empty frame stops at -0.87, as the soft mask leaks 0.25% of every
    background pixel). Flooding, in part: red blobs anywhere would raise a mean over the
    foreground, so a foreground larger than MAX_AREA (the biggest toy shape) costs 2 per frame
    covered; red squiggles within that area still pay. BENCHMARKS.md shows each hack at work.
    """

    def score(img):  # (N, 3, H, W)
        bg = torch.tensor(BACKGROUND, device=img.device, dtype=img.dtype).view(3, 1, 1)
        red = torch.tensor(COLOURS["red"], device=img.device, dtype=img.dtype).view(3, 1, 1) - bg  # (3, 1, 1)
        d = img - bg  # (N, 3, H, W): each pixel's colour as seen from the background
        cosine = (d * red).sum(dim=1) / (d.norm(dim=1) * red.norm() + 1e-4)  # (N, H, W)
        mask = foreground(img)  # (N, H, W)
        area = mask.sum(dim=(-2, -1))  # (N,) pixels
        presence = (area / MIN_AREA).clamp(max=1)  # (N,): 1 for any toy shape
        flood = (area - MAX_AREA).clamp(min=0) / mask[0].numel()  # (N,): 0 for any toy shape
        return presence * _masked_mean(cosine, mask) - (1 - presence) - 2 * flood  # (N,)

    return per_frame(score)


def size(device="cpu", dtype=torch.float32):
    """A small toy shape covers about 0.03-0.05 of the frame, a big one 0.1-0.15."""
    return per_frame(lambda img: foreground(img).mean(dim=(-2, -1)))


def contrast(device="cpu", dtype=torch.float32):
    """Euclidean distance in RGB over sqrt(3) (white on black is 1), averaged over the shape."""
    def score(img):  # (N, 3, H, W)
        bg = torch.tensor(BACKGROUND, device=img.device, dtype=img.dtype).view(3, 1, 1)
        distance = ((img - bg).pow(2).sum(dim=1) + 1e-8).sqrt() / 3**0.5  # (N, H, W)
        return _masked_mean(distance, foreground(img))  # (N,)

    return per_frame(score)


def motion(device="cpu", dtype=torch.float32):
    """How far the shape's centre of mass moves; a toy clip's full travel is 10.5/32 = 0.33.

    With frame subsampling the first and last decoded frames are random, so the reward is noisy
    from step to step but still points the gradient towards faster motion.
    """
    def reward(frames, prompts):  # frames (B, f, 3, H, W)
        if frames.shape[1] < 2:
            raise UserError("the motion reward compares frames: use --decode-frames 2 or more")
        c = centroids(foreground(frames[:, [0, -1]]))  # (B, 2, 2): (first, last) x (x, y) in pixels
        return (c[:, 1] - c[:, 0]).norm(dim=-1) / frames.shape[-1]  # (B,)

    reward.min_frames = 2
    return reward


def detector(device="cpu", dtype=torch.float32):
    """Evaluation only: how often `world.detect` reads each caption's attributes in its video.

    The detector thresholds pixels and reads shapes by rule, so it has no gradient to follow and
    no learned weights to fool: it is the second opinion on the learned toy judge (toy/judge.py).
    The reward is the fraction of the four attributes read right, per video (B,); `parts` gives
    the accuracy of each attribute over the videos of the pairs held out of pretraining
    (`heldout_shape`, ...) and over the pairs seen in it (`seen_shape`, ...), '' for a group
    with no video. Videos must hold 2+ frames (the direction is read from the motion).
    """

    def hits(frames, prompts):
        """(B, 4) 1.0 where the detector reads the caption's colour, shape, size, direction."""
        out = []
        for video, prompt in zip(frames.detach().float().cpu(), prompts):  # video (F, 3, H, W)
            found, want = detect(video), Clip.parse(prompt)
            out.append([float(found is not None and getattr(found, a) == getattr(want, a)) for a in CHANCE])
        return torch.tensor(out).view(-1, len(CHANCE))  # (B, 4)

    def reward(frames, prompts):
        return hits(frames, prompts).mean(dim=1)  # (B,)

    def parts(frames, prompts):
        h = hits(frames, prompts)  # (B, 4)
        groups = [by_group(h[:, i], prompts) for i in range(len(CHANCE))]  # per attribute {group: accuracy}
        return {f"{g}_{a}": acc[g] for g in ("heldout", "seen") for a, acc in zip(CHANCE, groups)}

    reward.parts, reward.differentiable, reward.min_frames = parts, False, 2
    return reward
