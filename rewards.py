"""Reward models: one registry, one signature.

Every reward is made by a small factory picked by name (the ddpo-pytorch pattern) and has the
signature

    reward(frames, prompts) -> Tensor (B,)      higher is better

where `frames` is a float tensor (B, f, 3, H, W) in [0, 1] (the f decoded frames of each of the
B videos) and `prompts` a list of B strings. The reward must be differentiable with respect to
`frames`: VADER's whole point is that the reward's gradient flows back through the VAE decoder
and the last denoising steps into the LoRA weights. Reward models are frozen
(`requires_grad_(False)`, `eval()`), so only the video model learns.

A reward function may carry `min_frames` (how many decoded frames it needs at least);
`train.py` checks `--decode-frames` against it before any work starts.

The rewards in this file need no weights, so the built-in tiny model has something real to
optimise on a laptop CPU. The model-backed rewards live in `image_rewards.py` (aesthetic, hps,
pickscore, clip, aesthetic_hps) and `video_rewards.py` (actpred, object, video_text, temporal);
they register themselves when this module is imported and load their libraries and weights only
when a reward is built; `reward_models.py` holds what they share (loading, preprocessing).
"""
import inspect

import torch

from common import UserError

REWARDS: dict[str, str] = {}  # name -> one-line description, shown by --help and in errors
_FACTORIES = {}  # name -> factory(device, dtype, **options) -> reward function


def register(name, description):
    """Decorator: add a reward factory to the registry under `name`."""

    def add(factory):
        REWARDS[name] = description
        _FACTORIES[name] = factory
        return factory

    return add


def known_rewards():
    """The registered names, for error messages."""
    return ", ".join(sorted(REWARDS))


def _options_of(name):
    """The option names a reward's factory takes, or None when it passes **options through."""
    params = inspect.signature(_FACTORIES[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) - {"device", "dtype"}


def _build(name, device, dtype, options):
    """Build one registered reward, checking its options first."""
    accepted = _options_of(name)
    unknown = set() if accepted is None else set(options) - accepted
    if unknown:
        raise UserError(
            f"reward {name!r} takes no option {', '.join(sorted(unknown))}; "
            f"its options: {', '.join(sorted(accepted)) or 'none'}"
        )
    fn = _FACTORIES[name](device=device, dtype=dtype, **options)
    fn.min_frames = getattr(fn, "min_frames", 1)
    return fn


def parse_reward_spec(spec):
    """'aesthetic:1.0,hps:2.0' -> [('aesthetic', 1.0), ('hps', 2.0)]; 'hps' -> [('hps', 1.0)]."""
    terms = []
    for part in spec.split(","):
        name, has_weight, weight = part.strip().partition(":")
        try:
            terms.append((name.strip(), float(weight) if has_weight else 1.0))
        except ValueError:
            raise UserError(
                f"reward weight {weight!r} in {spec!r} is not a number; write e.g. aesthetic:1.0,hps:2.0"
            ) from None
    return terms


def load_reward(name, device="cpu", dtype=torch.float32, **options):
    """Build the reward `name` on `device`; `options` go to its factory.

    `name` may be one registered reward ("hps") or a weighted sum ("aesthetic:1.0,hps:2.0"),
    whose reward is sum_i w_i * r_i(frames, prompts). Options reach a sum's terms by name:
    "hps.version" goes to the hps term only (and wins over a plain one); a plain option
    ("weights") goes to every term that takes it and is an error when none does; `device` and
    `dtype` go to every term. A single reward takes its options plainly ("version") or
    qualified ("hps.version").
    Raises `UserError` for an unknown name, a bad weight, or an option no term takes.
    """
    terms = parse_reward_spec(name)
    names = [n for n, _ in terms]
    for n in names:
        if n not in _FACTORIES:
            raise UserError(f"unknown reward {n!r}; known rewards: {known_rewards()}")
    per_term = {n: {} for n in names}
    for key, value in sorted(options.items(), key=lambda kv: "." in kv[0]):  # qualified ones win
        target, dot, option = key.rpartition(".")
        if dot and target in per_term:
            takers = [target]
        elif dot:  # "hps.version" for a term that is itself a sum (aesthetic_hps) goes on whole
            takers, option = [n for n in names if _options_of(n) is None], key
            if not takers:
                raise UserError(f"option {key!r} names no term of reward {name!r} (terms: {', '.join(names)})")
        elif len(names) == 1:
            takers = names  # a lone reward reports its own "takes no option" error in _build
        else:
            takers = [n for n in names if _options_of(n) is None or option in _options_of(n)]
        if not takers:
            raise UserError(f"no term of reward {name!r} takes option {key!r}")
        for n in takers:
            per_term[n][option] = value
    fns = [(w, _build(n, device, dtype, per_term[n])) for n, w in terms]
    if len(fns) == 1 and fns[0][0] == 1.0:
        return fns[0][1]

    def weighted_sum(frames, prompts):
        return sum(w * fn(frames, prompts) for w, fn in fns)  # (B,)

    weighted_sum.min_frames = max(fn.min_frames for _, fn in fns)
    return weighted_sum


def parse_options(text):
    """--reward-options 'label=dancing,log_prob=true' -> {'label': 'dancing', 'log_prob': True} (numbers, booleans parsed)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise UserError(f"--reward-options wants key=value pairs, got {item!r}")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
            continue
        for cast in (int, float, str):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                pass
    return out


def per_frame(score_images):
    """Lift an image score (N, 3, H, W) -> (N,) to a video reward: score each frame, then average.

    Image reward models see every decoded frame on its own; the video's reward is the mean over
    its f frames, as VADER does for its image rewards.
    """

    def reward(frames, prompts):
        b, f = frames.shape[:2]
        scores = score_images(frames.flatten(0, 1))  # (B*f, 3, H, W) -> (B*f,)
        return scores.view(b, f).mean(dim=1)  # (B,)

    return reward


# Rec. 601 luma weights: Y = 0.299 R + 0.587 G + 0.114 B.
LUMA = (0.299, 0.587, 0.114)


def luma(images):
    """(..., 3, H, W) in [0, 1] -> (..., H, W) luma."""
    w = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
    return torch.einsum("...chw,c->...hw", images, w)


@register("brightness", "mean luma of the frames, 0..1 (weight-free; for the tiny model)")
def brightness(device="cpu", dtype=torch.float32):
    return per_frame(lambda img: luma(img).mean(dim=(-2, -1)))


@register("darkness", "1 - mean luma, 0..1 (weight-free; the opposite of brightness)")
def darkness(device="cpu", dtype=torch.float32):
    return per_frame(lambda img: 1 - luma(img).mean(dim=(-2, -1)))


@register("colorfulness", "Hasler-Suesstrunk colourfulness, ~0..1 (weight-free; for the tiny model)")
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


@register("compressibility", "negative total variation, a differentiable stand-in for JPEG size")
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


@register("smoothness", "negative mean change between consecutive decoded frames (needs 2+ frames)")
def smoothness(device="cpu", dtype=torch.float32):
    """Temporal smoothness: -mean |frame[i+1] - frame[i]| over the decoded frames, range -1..0.

    With frame subsampling the decoded frames are a sorted random subset, so "consecutive" means
    consecutive among those decoded; the reward still rewards less flicker and motion.
    """

    def reward(frames, prompts):  # frames (B, f, 3, H, W)
        if frames.shape[1] < 2:
            raise UserError("the smoothness reward compares frames: use --decode-frames 2 or more")
        return -(frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4))  # (B,)

    reward.min_frames = 2
    return reward


#### Toy-world rewards: what the one shape of a toy.py clip looks like
#
# A toy clip is one coloured shape on a plain dark-grey background, so toy.foreground (a soft,
# differentiable mask of the pixels that differ from that background) finds the shape, and a
# statistic of its pixels is something a person can name: its colour, its size, how much it
# stands out, how far it moves. On other videos they measure whatever is not dark grey.

MIN_AREA = 20.0  # pixels; the smallest toy shape, a small triangle, covers about 50
MAX_AREA = 300.0  # pixels; the biggest, a big square, covers 16 x 16 = 256


def _masked_mean(values, mask):
    """Mean of `values` (N, H, W) over the pixels of `mask` (N, H, W), weighted -> (N,)."""
    return (values * mask).sum(dim=(-2, -1)) / mask.sum(dim=(-2, -1)).clamp_min(1e-6)


@register("redness", "toy world: how red the shape's colour is, as a direction from the background, -1..1")
def redness(device="cpu", dtype=torch.float32):
    """Cosine between (pixel - background) and (red - background), over the shape's pixels.

    The toy palette scores red 0.99, yellow 0.78, green 0.21, blue 0.19; an empty frame -0.87.
    Three ways to game a colour reward are closed. Fading: a shape's edge pixels, and a shape
    fading out, are blends α·colour + (1 - α)·background, and the cosine does not depend on α,
    so growing dim earns nothing (with R - max(G, B), fading a green shape to the grey
    background raised its score, and alignment found that within 40 steps). Vanishing: the
    score falls towards -1 as the shape shrinks below MIN_AREA pixels (an empty frame stops at
    -0.87 because the soft mask leaks 0.25% of every background pixel). Flooding, only in part:
    red blobs anywhere raise a mean over the foreground, and 60 steps at lr 6e-4 painted the
    whole frame red; a foreground larger than MAX_AREA (the biggest toy shape) now costs 2 per
    frame covered, but red squiggles within that area still pay (seen at lr 1e-3 after 40 steps).
    """
    from toy import BACKGROUND, COLOURS, foreground

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


@register("size", "toy world: the shape's area as a fraction of the frame, 0..1")
def size(device="cpu", dtype=torch.float32):
    """A small toy shape covers about 0.03-0.05 of the frame, a big one 0.1-0.15."""
    from toy import foreground

    return per_frame(lambda img: foreground(img).mean(dim=(-2, -1)))


@register("contrast", "toy world: the shape's mean RGB distance from the background, 0..1")
def contrast(device="cpu", dtype=torch.float32):
    """Euclidean distance in RGB over sqrt(3) (white on black is 1), averaged over the shape."""
    from toy import BACKGROUND, foreground

    def score(img):  # (N, 3, H, W)
        bg = torch.tensor(BACKGROUND, device=img.device, dtype=img.dtype).view(3, 1, 1)
        distance = ((img - bg).pow(2).sum(dim=1) + 1e-8).sqrt() / 3**0.5  # (N, H, W)
        return _masked_mean(distance, foreground(img))  # (N,)

    return per_frame(score)


@register("motion", "toy world: centroid travel from first to last decoded frame / frame width, 0..1.4 (2+ frames)")
def motion(device="cpu", dtype=torch.float32):
    """How far the shape's centre of mass moves; a toy clip's full travel is 10.5/32 = 0.33.

    With frame subsampling the first and last decoded frames are random, so the reward is noisy
    from step to step but still points the gradient towards faster motion.
    """
    from toy import centroids, foreground

    def reward(frames, prompts):  # frames (B, f, 3, H, W)
        if frames.shape[1] < 2:
            raise UserError("the motion reward compares frames: use --decode-frames 2 or more")
        c = centroids(foreground(frames[:, [0, -1]]))  # (B, 2, 2): (first, last) x (x, y) in pixels
        return (c[:, 1] - c[:, 0]).norm(dim=-1) / frames.shape[-1]  # (B,)

    reward.min_frames = 2
    return reward


# The model-backed rewards register themselves on import. They come last because they import
# `register` and the helpers above from this module (a cycle Python resolves in this order).
import image_rewards  # noqa: E402,F401
import video_rewards  # noqa: E402,F401
