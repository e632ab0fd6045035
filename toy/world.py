"""A toy world for the CPU: one coloured shape moving over a plain background.

A randomly initialised model proves the code runs, but it only makes noise, so alignment has
nothing to change that a person could name. This world is small enough to pretrain a video
diffusion model on a laptop CPU in about half an hour (toy/pretrain.py), and every clip is
described exactly by its caption: "a big green square moving left". After alignment one can say
what changed ("the square turned red") and check what did not (it is still a square, still
moving left) with the detector below, which needs no learned weights.

Clips are rendered on the fly from a seed: nothing is stored. Some shape/colour pairs are held
out of training (HELDOUT) to probe whether the model composes attributes it saw separately.

`python -m toy.evaluate` measures how often the pretrained model draws what its prompts ask for.
"""
from dataclasses import dataclass

import torch

FRAMES, SIZE = 8, 32  # a clip is (FRAMES, 3, SIZE, SIZE)
BACKGROUND = (0.1, 0.1, 0.1)  # a plain dark grey, the same in every clip
COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.2, 0.8, 0.25), "blue": (0.2, 0.35, 0.95), "yellow": (0.95, 0.85, 0.2)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 5.0, "big": 8.0}  # "radius" in pixels: half the width of the shape's bounding box
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y points down
SPEED = 1.5  # pixels per frame: 10.5 pixels over a clip
JITTER = 3.0  # how far, in pixels, a clip's track may sit from the centred one
HELDOUT = (("blue", "triangle"), ("yellow", "circle"))  # (colour, shape) pairs never seen in training
# What guessing scores on each attribute the detector reads: one over the number of choices.
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "size": 1 / len(SIZES), "direction": 1 / len(DIRECTIONS)}


@dataclass(frozen=True)
class Clip:
    """The four attributes a caption names."""

    colour: str
    shape: str
    size: str
    direction: str

    @property
    def caption(self):
        return f"a {self.size} {self.colour} {self.shape} moving {self.direction}"

    @classmethod
    def parse(cls, caption):
        """Inverse of `caption`: "a big red circle moving left" -> Clip("red", "circle", "big", "left")."""
        _, size, colour, shape, _, direction = caption.split()
        return cls(colour, shape, size, direction)


def all_clips(split="train"):
    """Every attribute combination of a split: "train", "heldout" (the HELDOUT pairs) or "all"."""
    clips = [Clip(c, s, z, d) for c in COLOURS for s in SHAPES for z in SIZES for d in DIRECTIONS]
    if split == "all":
        return clips
    held = [(c.colour, c.shape) in HELDOUT for c in clips]
    return [c for c, h in zip(clips, held) if h == (split == "heldout")]


#### Rendering

def shape_mask(shape, cx, cy, r, size=SIZE, supersample=4):
    """Anti-aliased coverage (H, W) in [0, 1] of one shape centred at (cx, cy) in pixel units.

    Each pixel is split into supersample² points and the coverage is the fraction inside, which
    gives soft edges: hard 0/1 edges at 32x32 would alias badly as the shape moves.
    All three shapes fill a 2r x 2r box differently (area over box): circle π/4, square 1,
    triangle 1/2. The detector reads the shape from that ratio.
    """
    s = supersample
    coords = (torch.arange(size * s, dtype=torch.float32) + 0.5) / s  # sample points in pixel units
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # each (H*s, W*s)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        inside = (dx.abs() <= r) & (dy.abs() <= r)
    elif shape == "triangle":  # apex at the top, base at the bottom of the box
        inside = (dy <= r) & (dx.abs() <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.float().view(size, s, size, s).mean(dim=(1, 3))  # (H, W)


def render(clip, start, frames=FRAMES, size=SIZE):
    """The video of `clip` whose centre starts at `start` (x, y): (F, 3, H, W) in [0, 1]."""
    r, (ux, uy) = SIZES[clip.size], DIRECTIONS[clip.direction]
    colour = torch.tensor(COLOURS[clip.colour]).view(3, 1, 1)
    background = torch.tensor(BACKGROUND).view(3, 1, 1)
    video = []
    for t in range(frames):
        cx, cy = start[0] + SPEED * t * ux, start[1] + SPEED * t * uy
        alpha = shape_mask(clip.shape, cx, cy, r, size)  # (H, W)
        video.append(background + alpha * (colour - background))  # (3, H, W)
    return torch.stack(video)  # (F, 3, H, W)


def random_start(clip, generator, frames=FRAMES, size=SIZE):
    """A start point (x, y) within JITTER pixels of the track centred in the frame.

    The shape stays whole inside the frame for the whole clip. Little jitter makes a caption
    nearly determine its video, which is what lets a CPU learn the world in minutes.
    """
    r, travel = SIZES[clip.size], SPEED * (frames - 1)
    lo, hi = r + 1, size - 1 - r  # centre range that keeps a 1-pixel margin
    u = torch.rand(2, generator=generator).tolist()
    start = []
    for axis, step in enumerate(DIRECTIONS[clip.direction]):
        a, b = (lo - step * travel, hi) if step < 0 else (lo, hi - step * travel)  # leave room to travel
        half = min(JITTER, (b - a) / 2)
        start.append((a + b) / 2 + half * (2 * u[axis] - 1))
    return start


def batches(batch_size, seed=0, split="train", frames=FRAMES, size=SIZE):
    """An endless, seeded stream of (videos (B, F, 3, H, W), captions): the training data."""
    g = torch.Generator().manual_seed(seed)
    clips = all_clips(split)
    while True:
        picks = [clips[i] for i in torch.randint(len(clips), (batch_size,), generator=g).tolist()]
        videos = torch.stack([render(c, random_start(c, g, frames, size), frames, size) for c in picks])  # (B, F, 3, H, W)
        yield videos, [c.caption for c in picks]


#### A detector that needs no weights

def foreground(frames, threshold=0.3, softness=0.05):
    """Soft foreground mask (..., H, W) in [0, 1] of frames (..., 3, H, W) in [0, 1].

    A pixel belongs to the shape when some channel differs from BACKGROUND by more than
    `threshold`; the sigmoid makes the mask differentiable (toy/rewards.py uses it).
    """
    bg = torch.tensor(BACKGROUND, device=frames.device, dtype=frames.dtype).view(3, 1, 1)
    distance = (frames - bg).abs().amax(dim=-3)  # (..., H, W)
    return torch.sigmoid((distance - threshold) / softness)


def centroids(mask):
    """Centre of mass (..., 2) as (x, y) in pixels of masks (..., H, W); the mask's weight is its sum."""
    h, w = mask.shape[-2:]
    ys = torch.arange(h, device=mask.device, dtype=mask.dtype) + 0.5
    xs = torch.arange(w, device=mask.device, dtype=mask.dtype) + 0.5
    total = mask.sum(dim=(-2, -1)).clamp_min(1e-6)  # (...,)
    cx = (mask.sum(dim=-2) * xs).sum(dim=-1) / total
    cy = (mask.sum(dim=-1) * ys).sum(dim=-1) / total
    return torch.stack([cx, cy], dim=-1)  # (..., 2)


def detect(video, min_pixels=4):
    """Read a Clip's attributes from one video (F, 3, H, W) in [0, 1]; None if nothing is drawn.

    colour: the palette colour nearest the mean foreground pixel.
    size: the bounding box's longer side (2r for every shape) against halfway between the sizes.
    shape: foreground area over bounding-box area (circle π/4, square 1, triangle 1/2).
    direction: the sign of the larger component of the centroid's least-squares velocity.
    """
    mask = foreground(video) > 0.5  # (F, H, W), hard
    area = mask.sum(dim=(-2, -1)).float()  # (F,)
    seen = area >= min_pixels
    if seen.sum() < 2:
        return None
    mask, video, area = mask[seen], video[seen], area[seen]
    m = mask.unsqueeze(1).float()  # (f, 1, H, W)
    mean_rgb = (video * m).sum(dim=(0, 2, 3)) / m.sum()  # (3,)
    names = list(COLOURS)
    colour = names[int(torch.cdist(mean_rgb[None], torch.tensor([COLOURS[n] for n in names]))[0].argmin())]
    fills, sides = [], []
    for frame in mask:  # (H, W)
        rows, cols = frame.any(dim=1).nonzero(), frame.any(dim=0).nonzero()
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        fills.append(frame.sum() / (height * width))
        sides.append(max(height, width))
    fill, side = torch.stack(fills).median(), torch.stack(sides).float().median()
    size = "big" if side > SIZES["small"] + SIZES["big"] else "small"
    shape = "triangle" if fill < 0.64 else "circle" if fill < 0.89 else "square"
    c = centroids(mask.float())  # (f, 2)
    t = seen.nonzero()[:, 0].float()  # the frame index of each kept frame
    v = ((t - t.mean())[:, None] * (c - c.mean(dim=0))).sum(dim=0) / ((t - t.mean()) ** 2).sum()  # (2,) px/frame
    direction = ("right" if v[0] > 0 else "left") if v[0].abs() > v[1].abs() else ("down" if v[1] > 0 else "up")
    return Clip(colour, shape, size, direction)


def heldout_mask(captions):
    """(B,) bool: which captions name a HELDOUT colour/shape pair."""
    return torch.tensor([(Clip.parse(c).colour, Clip.parse(c).shape) in HELDOUT for c in captions])


def by_group(values, captions):
    """{"heldout": mean, "seen": mean} of per-video values (B,) over the videos of held-out and of
    seen pairs, '' for a group with no video: the two numbers an evaluation of the toy world reads."""
    held = heldout_mask(captions)
    return {g: values[rows].float().mean().item() if rows.any() else "" for g, rows in (("heldout", held), ("seen", ~held))}


def accuracy(videos, captions):
    """Fraction of videos (B, F, 3, H, W) whose detected attribute matches the caption's, per attribute."""
    hits = {k: 0 for k in CHANCE}
    for video, caption in zip(videos, captions):
        found, want = detect(video), Clip.parse(caption)
        for k in hits:
            hits[k] += found is not None and getattr(found, k) == getattr(want, k)
    return {k: v / len(captions) for k, v in hits.items()}
