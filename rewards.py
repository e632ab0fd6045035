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
`train.py` checks `--decode-frames` against it before any work starts. A measure with no
gradient (the toy world's detector) carries `differentiable = False`: it cannot be trained on,
only watched with `--eval-rewards`, and may report `parts(frames, prompts) -> {name: value}`,
each logged as its own column.

The rewards in this file need no weights, so the built-in tiny model has something real to
optimise on a laptop CPU. The others are named in `_ELSEWHERE` by module path: the model-backed
rewards in reward_models/ (aesthetic, hps, pickscore, clip, aesthetic_hps in image.py; actpred,
object, video_text, temporal in video.py) and the toy world's in toy/rewards.py. Their module is
imported only when one of their rewards is built, and their libraries and weights are loaded
only then too.
"""
import importlib
import inspect

import torch

from infra.cli import UserError

REWARDS: dict[str, str] = {}  # name -> one-line description, shown by --help and in errors
_FACTORIES = {}  # name -> factory(device, dtype, **options) -> reward function, or "module:function"

# Rewards defined in other modules: name -> ("module:function", description).
_ELSEWHERE = {
    "aesthetic": ("reward_models.image:aesthetic",
                  "LAION aesthetic predictor v2 on CLIP ViT-L/14 frames, ~1..10 (trl-lib/ddpo-aesthetic-predictor)"),
    "hps": ("reward_models.image:hps",
            "HPSv2.1 human preference: cosine of OpenCLIP ViT-H-14 frame and prompt, ~0.2..0.35 (xswu/HPSv2)"),
    "pickscore": ("reward_models.image:pickscore",
                  "PickScore v1: logit scale x cosine of CLIP-H frame and prompt, ~20 (yuvalkirstain/PickScore_v1)"),
    "clip": ("reward_models.image:clip",
             "CLIP ViT-L/14 cosine of frame and prompt embeddings, ~0.2..0.35 (openai/clip-vit-large-patch14)"),
    "aesthetic_hps": ("reward_models.image:aesthetic_hps",
                      "VADER's mix aesthetic:0.075,hps:0.5 (their aesthetic_hps loss, negated)"),
    "actpred": ("reward_models.video:actpred",
                "VideoMAE Kinetics-400 probability of the prompt's action, 0..1 (MCG-NJU/videomae-base-finetuned-kinetics)"),
    "object": ("reward_models.video:object_presence",
               "OWLv2 presence of the object query=, 0..1; remove=True: 1 - presence (google/owlv2-base-patch16-ensemble)"),
    "video_text": ("reward_models.video:video_text",
                   "X-CLIP video-prompt similarity, logit scale x cosine (microsoft/xclip-base-patch32)"),
    "temporal": ("reward_models.video:temporal",
                 "V-JEPA 2 predictability of the clip's second half from its first, ~-1..0 (facebook/vjepa2-vitl-fpc64-256)"),
    "redness": ("toy.rewards:redness", "toy world: how red the shape's colour is, as a direction from the background, -1..1"),
    "size": ("toy.rewards:size", "toy world: the shape's area as a fraction of the frame, 0..1"),
    "contrast": ("toy.rewards:contrast", "toy world: the shape's mean RGB distance from the background, 0..1"),
    "motion": ("toy.rewards:motion",
               "toy world: centroid travel from first to last decoded frame / frame width, 0..1.4 (2+ frames)"),
    "toy_judge": ("toy.judge:toy_judge",
                  "toy world: mean log-probability the learned toy judge gives the caption's attributes, -inf..0"),
    "detector": ("toy.rewards:detector",
                 "toy world, evaluation only: the weight-free detector's accuracy on the caption's attributes, 0..1"),
}


def register(name, description):
    """Decorator: add a reward factory to the registry under `name`."""

    def add(factory):
        REWARDS[name] = description
        _FACTORIES[name] = factory
        return factory

    return add


REWARDS.update({name: description for name, (_, description) in _ELSEWHERE.items()})
_FACTORIES.update({name: path for name, (path, _) in _ELSEWHERE.items()})


def _factory(name):
    """The factory of a registered reward, importing its module the first time it is asked for."""
    factory = _FACTORIES[name]
    if isinstance(factory, str):
        module, _, function = factory.partition(":")
        factory = _FACTORIES[name] = getattr(importlib.import_module(module), function)
    return factory


def known_rewards():
    """The registered names, for error messages."""
    return ", ".join(sorted(REWARDS))


def _options_of(name):
    """The option names a reward's factory takes, or None when it passes **options through."""
    params = inspect.signature(_factory(name)).parameters
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
    fn = _factory(name)(device=device, dtype=dtype, **options)
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
    for n, (_, fn) in zip(names, fns):
        if not getattr(fn, "differentiable", True):
            raise UserError(f"the {n} reward has no gradient, so it cannot be trained on; watch it with --eval-rewards {n}")
    if len(fns) == 1 and fns[0][0] == 1.0:
        return fns[0][1]

    def weighted_sum(frames, prompts):
        return sum(w * fn(frames, prompts) for w, fn in fns)  # (B,)

    weighted_sum.min_frames = max(fn.min_frames for _, fn in fns)
    return weighted_sum


def load_eval_rewards(spec, device="cpu", dtype=torch.float32, build=True):
    """--eval-rewards 'hps,dynamics' -> {name: reward}: second opinions on the held-out videos, which
    show what the trained reward cannot (a learned reward gamed while another judge disagrees,
    motion lost to an image reward). Every name is checked; with `build=False` none is loaded."""
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    for n in names:
        if n not in _FACTORIES:
            raise UserError(f"--eval-rewards: unknown reward {n!r}; known rewards: {known_rewards()}")
    return {n: _build(n, device, dtype, {}) for n in names} if build else {}


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


def frame_change(name, sign):
    """sign * mean |frame[i+1] - frame[i]| over the decoded frames: a reward of 2+ frames."""

    def reward(frames, prompts):  # frames (B, f, 3, H, W)
        if frames.shape[1] < 2:
            raise UserError(f"the {name} reward compares frames: use --decode-frames 2 or more")
        return sign * (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4))  # (B,)

    reward.min_frames = 2
    return reward


@register("smoothness", "negative mean change between consecutive decoded frames (needs 2+ frames)")
def smoothness(device="cpu", dtype=torch.float32):
    """Temporal smoothness: -mean |frame[i+1] - frame[i]| over the decoded frames, range -1..0.

    With frame subsampling the decoded frames are a sorted random subset, so "consecutive" means
    consecutive among those decoded; the reward still rewards less flicker and motion.
    """
    return frame_change("smoothness", -1)


@register("dynamics", "mean change between consecutive frames, 0..1: how much moves (needs 2+ frames)")
def dynamics(device="cpu", dtype=torch.float32):
    """The opposite of smoothness, as a measure to watch: image rewards scored frame by frame are
    known to lower a video's motion, and a fall of this number on the held-out videos shows it."""
    return frame_change("dynamics", 1)
