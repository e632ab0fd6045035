"""Videos to files a person can open: .mp4 for players, .gif for browsers and READMEs."""
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from infra.files import atomic_path

MIN_SIDE = 128  # tiny videos are upscaled (nearest neighbour) to at least this height to be seen


def tile(videos, per_row=None):
    """Place B videos side by side, in rows of `per_row` (default: one row), a short last row
    padded with black: (B, F, 3, H, W) -> (F, 3, rows*H, per_row*W)."""
    per_row = min(per_row or len(videos), len(videos))
    pad = -len(videos) % per_row
    videos = torch.cat([videos, videos.new_zeros(pad, *videos.shape[1:])])  # (rows*per_row, F, 3, H, W)
    rows = [torch.cat(list(videos[i:i + per_row]), dim=-1) for i in range(0, len(videos), per_row)]  # each (F, 3, H, per_row*W)
    return torch.cat(rows, dim=-2)  # (F, 3, rows*H, per_row*W)


def to_uint8(video, rows=1):
    """(F, 3, H, W) in [0, 1] -> (F, H', W', 3) uint8, upscaled by a whole factor if small: until
    each of its `rows` rows of tiled videos is MIN_SIDE high."""
    scale = max(1, -(-MIN_SIDE * rows // video.shape[-2]))  # ceil(MIN_SIDE / (H / rows))
    if scale > 1:
        video = torch.nn.functional.interpolate(video, scale_factor=scale, mode="nearest")  # (F, 3, sH, sW)
    return (video.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (F, H', W', 3)


def write_video(video, stem, fps, rows=1):
    """Write (F, 3, H, W) in [0, 1], `rows` tiled videos high, to `stem`.mp4 and `stem`.gif (each
    atomically) at `fps` frames a second, the model's own (models.ModelSpec.fps); returns the paths."""
    import imageio

    frames = to_uint8(video, rows)
    stem = Path(stem)
    mp4, gif = stem.with_suffix(".mp4"), stem.with_suffix(".gif")
    with atomic_path(mp4) as tmp:
        # libx264 wants sides divisible by 16; to_uint8's upscaling keeps small videos so.
        imageio.mimwrite(tmp, list(frames), fps=fps, macro_block_size=16)
    # A GIF counts time in hundredths of a second: frame i ends at round((i + 1) * 100 / fps), so 16 fps
    # (6.25 each) shows frames of 60 and 70 ms that keep the clip's length to the hundredth.
    ends = [round((i + 1) * 100 / fps) for i in range(len(frames))]
    durations = [10 * (end - start) for start, end in zip([0, *ends], ends)]  # ms, each a multiple of 10
    with atomic_path(gif) as tmp:
        images = [Image.fromarray(f) for f in frames]
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return mp4, gif


def slug(text, n=40):
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def write_strip(videos, path):
    """(B, F, 3, H, W) in [0, 1] -> a PNG of B rows, each a video's F frames left to right, upscaled
    as the videos are (atomically); the still picture of a clip that a page or a slide can show."""
    frames = torch.cat(list(videos.transpose(0, 1)), dim=-1)  # (B, 3, H, F*W): each video's frames in a row
    image = to_uint8(torch.cat(list(frames), dim=-2)[None], rows=len(videos))[0]  # (B*H', F*W', 3)
    with atomic_path(Path(path)) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def plot_before_after(folder, captions, step):
    """before_after.png from before.png and after.png in `folder`: the base model's frames beside the
    aligned model's, for the same prompts and seeds, one caption a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = (np.asarray(Image.open(folder / f"{name}.png")) for name in ("before", "after"))
    fig, axes = plt.subplots(1, 2, figsize=(2 * before.shape[1] / 100 + 2.6, before.shape[0] / 100 + 0.6))
    for ax, image, title in zip(axes, (before, after), ("before: the base model", f"after: {step} steps of VADER")):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize="small")
        ax.set_xticks([])
        rows = len(captions)
        ax.set_yticks([(i + 0.5) * image.shape[0] / rows for i in range(rows)])
        ax.set_yticklabels(captions if ax is axes[0] else [], fontsize="x-small")
    fig.tight_layout()
    with atomic_path(folder / "before_after.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
