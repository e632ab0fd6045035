"""Weight-free rewards on pixels: something real for the tiny model to optimise on a laptop CPU.

Each takes frames (B, f, 3, H, W) in [0, 1] and is differentiable in them, as rewards.py's
contract says; none loads a model.
"""
import torch

from infra.cli import UserError
from rewards import per_frame

# Rec. 601 luma weights: Y = 0.299 R + 0.587 G + 0.114 B.
LUMA = (0.299, 0.587, 0.114)


def luma(images):
    """(..., 3, H, W) in [0, 1] -> (..., H, W) luma."""
    w = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
    return torch.einsum("...chw,c->...hw", images, w)


def brightness(device="cpu", dtype=torch.float32):
    return per_frame(lambda img: luma(img).mean(dim=(-2, -1)))


def darkness(device="cpu", dtype=torch.float32):
    return per_frame(lambda img: 1 - luma(img).mean(dim=(-2, -1)))


def colorfulness(device="cpu", dtype=torch.float32):
    """Hasler & Suesstrunk (2003), "Measuring colourfulness in natural images", Eq. (3).

    With opponent channels rg = R - G and yb = (R + G)/2 - B over the pixels of a frame:
        C = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2).
    Computed on [0, 1] pixels (the paper uses 0..255, so its thresholds are 255 times ours).
    A tiny epsilon keeps the square roots differentiable at a grey frame.
    """

    def score(img):  # (N, 3, H, W)
        r, g, b = img.unbind(dim=1)  # each (N, H, W)
        rg, yb = r - g, 0.5 * (r + g) - b
        spread = (rg.var(dim=(-2, -1)) + yb.var(dim=(-2, -1)) + 1e-8).sqrt()
        offset = (rg.mean(dim=(-2, -1)) ** 2 + yb.mean(dim=(-2, -1)) ** 2 + 1e-8).sqrt()
        return spread + 0.3 * offset  # (N,)

    return per_frame(score)


def compressibility(device="cpu", dtype=torch.float32):
    """DDPO's "compressibility" reward is minus the JPEG file size, which has no gradient.

    Total variation (the mean absolute difference between neighbouring pixels) tracks how much
    high-frequency detail an image has, which is what JPEG spends its bits on; its negative is a
    differentiable proxy. Range about -1..0; 0 is a flat image.
    """

    def score(img):  # (N, 3, H, W)
        dy = (img[..., 1:, :] - img[..., :-1, :]).abs().mean(dim=(-3, -2, -1))
        dx = (img[..., :, 1:] - img[..., :, :-1]).abs().mean(dim=(-3, -2, -1))
        return -(dx + dy)  # (N,)

    return per_frame(score)


def frame_change(name, sign):
    """sign * mean |frame[i+1] - frame[i]| over the decoded frames: a reward of 2+ frames."""

    def reward(frames, prompts):  # frames (B, f, 3, H, W)
        if frames.shape[1] < 2:
            raise UserError(f"the {name} reward compares frames: use --decode-frames 2 or more")
        return sign * (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4))  # (B,)

    reward.min_frames = 2
    return reward


def smoothness(device="cpu", dtype=torch.float32):
    """Temporal smoothness: -mean |frame[i+1] - frame[i]| over the decoded frames, range -1..0.

    With frame subsampling the decoded frames are a sorted random subset, so "consecutive" means
    consecutive among those decoded; the reward still rewards less flicker and motion.
    """
    return frame_change("smoothness", -1)


def dynamics(device="cpu", dtype=torch.float32):
    """The opposite of smoothness, as a measure to watch: image rewards scored frame by frame are
    known to lower a video's motion, and a fall of this number on the held-out videos shows it."""
    return frame_change("dynamics", 1)
