"""The toy world's learned judge: a small video classifier, and the reward built on it.

Real alignment rewards (HPS, PickScore, an aesthetic predictor) are networks trained on data
to score how well an image follows its prompt. They are differentiable, which is what VADER
needs, and they are exploitable: a network scores the pixels it was trained on well and
anything else arbitrarily, so an optimiser that pushes hard enough finds pixels it scores
highly that no person would. The judge is the same thing in the toy world: a few convolutions
trained (toy/train_judge.py) to read a clip's colour, shape, size and direction from its
pixels. The weight-free detector in world.py reads the same four attributes by rule, so it
gives a second opinion that cannot be fooled in the same way. A judge never trained on what an
optimiser makes (toy/judge_unhardened.safetensors) is fooled: the README's reward-hacking run
shows its reward rising while the detector's accuracy falls.

    reward "toy_judge": mean log-probability the judge gives the caption's attributes, -inf..0

Shapes: a clip is (F, 3, H, W) in [0, 1]; the judge reads colour, shape and size from each frame
alone and the direction from each pair of consecutive frames it is given.
"""
from pathlib import Path

import torch
from torch import nn

from infra.cli import UserError
from infra.loading import misfit, unfit_text
from toy.world import COLOURS, DIRECTIONS, SHAPES, SIZES, Clip, by_group

JUDGE_FILE = Path(__file__).resolve().parent / "judge.safetensors"  # float16, written by toy/train_judge.py
NAIVE_JUDGE_FILE = JUDGE_FILE.with_name("judge_naive.safetensors")  # the same, trained with --naive
UNHARDENED_JUDGE_FILE = JUDGE_FILE.with_name("judge_unhardened.safetensors")  # and with --unhardened
# The attributes a caption names and their values, in the order of the judge's logits.
ATTRIBUTES = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "direction": list(DIRECTIONS)}
APPEARANCE = ("colour", "shape", "size")  # read from one frame; "direction" needs two


def trunk(channels, width):
    """Four 3x3 convolutions, three of stride 2: (N, channels, 32, 32) -> (N, 2*width*16) features.

    The features keep a coarse 4x4 map rather than a global pool, so where the shape lies (and,
    for a pair of frames, where it went) survives to the linear heads.
    """
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 16x16
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 8x8
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 4x4
        nn.Flatten(),
    )


class Judge(nn.Module):
    """Logits of every attribute for videos (B, f, 3, H, W) in [0, 1].

    appearance: one frame (3 channels) -> colour, shape and size logits.
    motion: a frame and its change to the next given frame (6 channels) -> direction logits.
    """

    def __init__(self, width=16, size=32):
        super().__init__()
        features = 2 * width * (size // 8) ** 2
        self.appearance = trunk(3, width)
        self.appearance_head = nn.Linear(features, sum(len(ATTRIBUTES[a]) for a in APPEARANCE))
        self.motion = trunk(6, width)
        self.motion_head = nn.Linear(features, len(ATTRIBUTES["direction"]))

    def forward(self, frames):
        """{attribute: logits}: colour, shape, size (B, f, n) per frame; direction (B, f-1, 4) per
        consecutive pair, absent when f = 1."""
        b, f = frames.shape[:2]
        x = frames * 2 - 1  # (B, f, 3, H, W) in [-1, 1]
        logits = self.appearance_head(self.appearance(x.flatten(0, 1))).view(b, f, -1)  # (B, f, 4+3+2)
        out = dict(zip(APPEARANCE, logits.split([len(ATTRIBUTES[a]) for a in APPEARANCE], dim=-1)))
        if f > 1:
            pairs = torch.cat([x[:, :-1], x[:, 1:] - x[:, :-1]], dim=2)  # (B, f-1, 6, H, W)
            out["direction"] = self.motion_head(self.motion(pairs.flatten(0, 1))).view(b, f - 1, -1)  # (B, f-1, 4)
        return out


def labels(captions, device="cpu"):
    """{attribute: (B,) index of the caption's value}, the targets of the judge's logits."""
    clips = [Clip.parse(c) for c in captions]
    return {a: torch.tensor([ATTRIBUTES[a].index(getattr(c, a)) for c in clips], device=device) for a in ATTRIBUTES}


def log_probs(judge, frames, captions):
    """{attribute: (B, f or f-1) log-probability the judge gives each caption's value}, per frame or pair."""
    want = labels(captions, frames.device)
    out = {}
    for a, logits in judge(frames).items():  # (B, n_frames, n_values)
        index = want[a].view(-1, 1, 1).expand(-1, logits.shape[1], 1)  # (B, n_frames, 1)
        out[a] = logits.log_softmax(dim=-1).gather(-1, index).squeeze(-1)  # (B, n_frames)
    return out


@torch.no_grad()
def classify(judge, videos):
    """The judge's reading of each video (B, F, 3, H, W): a list of Clip, each attribute the value
    of highest log-probability summed over frames (or pairs)."""
    picks = {a: logits.log_softmax(-1).sum(dim=1).argmax(-1).tolist() for a, logits in judge(videos).items()}
    return [Clip(*(ATTRIBUTES[a][picks[a][i]] for a in ("colour", "shape", "size", "direction")))
            for i in range(len(videos))]


def load_judge(path=JUDGE_FILE, device="cpu", dtype=torch.float32):
    """The committed judge, frozen (`eval()`, no gradients for its weights)."""
    from infra.files import read_safetensors

    fix = "restore it with `git checkout -- toy/judge.safetensors` or rebuild it with `python -m toy.train_judge`"
    tensors, _ = read_safetensors(path, "toy judge weights", fix)
    judge = Judge()
    unfit = unfit_text(*misfit(judge.state_dict(), tensors))  # every wrong name, not only the first kind
    if unfit:
        raise UserError(f"toy judge weights {path} do not fit the judge ({unfit}); {fix}")
    judge.load_state_dict(tensors)
    return judge.to(device, dtype).eval().requires_grad_(False)


def toy_judge(device="cpu", dtype=torch.float32, weights=str(JUDGE_FILE)):
    """How well the frames match their caption by the judge: the mean, over the caption's four
    attributes, of the log-probability the judge gives the caption's value, averaged over the
    decoded frames (and over consecutive pairs for the direction; one decoded frame scores
    colour, shape and size only). 0 is a perfect match; a wrong shape costs about -1 to -5.

    Log-probability rather than probability: a shape the judge reads as wrong has a probability
    near 0, where its gradient vanishes, while its log keeps pulling. That same unbounded pull
    is what over-optimisation turns into reward hacking.
    """
    judge = load_judge(weights, device, dtype)

    def reward(frames, prompts):  # frames (B, f, 3, H, W)
        scores = log_probs(judge, frames.to(dtype), prompts)  # {attribute: (B, f or f-1)}
        return torch.stack([s.float().mean(dim=1) for s in scores.values()]).mean(dim=0)  # (B,)

    # As an evaluation reward (--eval-rewards toy_judge) it reports the videos of the held-out
    # pairs and of the seen pairs apart: one mean would hide a gain on one paid for by the other.
    reward.parts = lambda frames, prompts: by_group(reward(frames, prompts), prompts)
    return reward
