"""Rewards: the contract, one reward written out (aesthetic), and the registry.

Every reward is made by a small factory picked by name (the ddpo-pytorch pattern) and has the
signature

    reward(frames, prompts) -> Tensor (B,)      higher is better

where `frames` is a float tensor (B, f, 3, H, W) in [0, 1] (the f decoded frames of each of the
B videos) and `prompts` a list of B strings. The reward must be differentiable with respect to
`frames`: VADER's whole point is that the reward's gradient flows back through the VAE decoder
and the last denoising steps into the LoRA weights. Reward models are frozen
(`requires_grad_(False)`, `eval()`), so only the video model learns. A reward may carry
`min_frames` (train.py checks --decode-frames against it); a measure with no gradient (the toy
world's detector) carries `differentiable = False` and can only be watched (--eval-rewards).

The reward of the headline command, `aesthetic`, is written out below: CLIP ViT-L/14's vision
tower and LAION's aesthetic MLP, with the preprocessing rebuilt in torch. The other rewards live
below this file (reward_models/ for the model-backed and weight-free ones, toy/ for the toy
world's) and are imported only when asked for.
"""
import importlib

import torch
import torch.nn.functional as F
from torch import nn

from infra.cli import UserError
from reward_models.common import freeze, from_pretrained, load_checkpoint, load_pretrained, weights_file
from reward_models.options import parse_options, parse_reward_spec, reward_terms
from reward_models.registry import ELSEWHERE

__all__ = ["REWARDS", "load_reward", "load_eval_rewards", "parse_options", "parse_reward_spec", "per_frame", "register"]

CLIP_L14 = "openai/clip-vit-large-patch14"  # the backbone of the aesthetic head (and of the `clip` reward)
AESTHETIC_REPO, AESTHETIC_FILE = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"


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


#### Differentiable preprocessing
#
# The official image processors (CLIPImageProcessor and its kin) convert frames to uint8 PIL
# images or arrays, resize them, and round again: the rounding has no gradient, so a reward
# computed through them would hand VADER zeros. The same resize / crop / normalise is written here
# with float tensor ops, so d(reward)/d(pixels) exists. One deliberate difference: the official
# path clamps the resized image to [0, 255]; we keep floats, so the bicubic filter's small
# overshoot at sharp edges survives (clamping would zero those pixels' gradient).
# tests/test_reward_models.py bounds the difference against the official processors.

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP, OpenCLIP ViT-H-14, OWLv2
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images, mean, std):
    """(N, 3, H, W) in [0, 1] -> (x - mean) / std per channel."""
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(3, 1, 1)
    return (images - mean) / std


def resize(images, size, mode):
    """(N, 3, H, W) -> (N, 3, h, w) with an antialiased filter (as PIL and torchvision do)."""
    return F.interpolate(images, size=tuple(size), mode=mode, antialias=True, align_corners=False)


def resize_short_side(images, size, mode):
    """Resize so the short side is `size`; the long side is int(size * long / short), the rule
    of torchvision's Resize(int) and transformers' {"shortest_edge": size}."""
    h, w = images.shape[-2:]
    new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    return resize(images, new, mode)  # (N, 3, h', w')


def center_crop(images, size):
    """(N, 3, H, W) -> (N, 3, size, size), offsets rounded as in torchvision's center_crop."""
    h, w = images.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def clip_pixels(images, size):
    """CLIPImageProcessor: short side -> size (bicubic), centre crop, OpenAI mean/std.

    (N, 3, H, W) in [0, 1] -> (N, 3, size, size). VADER squashes frames to size x size instead;
    for square frames the two agree.
    """
    x = center_crop(resize_short_side(images, size, "bicubic"), size)  # (N, 3, size, size)
    return normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


#### The aesthetic reward

class AestheticHead(nn.Module):
    """LAION aesthetic predictor v2 ("sac+logos+ava1-l14-linearMSE"): a purely linear MLP
    768 -> 1024 -> 128 -> 64 -> 16 -> 1 on unit-norm CLIP ViT-L/14 image embeddings. The dropouts
    do nothing in eval mode but keep the indices, so the keys match layers.{0,2,4,6,7}.*."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embeds):  # (N, 768) -> (N,)
        return self.layers(embeds).squeeze(-1)


def aesthetic(device="cpu", dtype=torch.float32, weights=None, clip_model=CLIP_L14):
    """The aesthetic score VADER (and DDPO, AlignProp) maximise, per frame, range about 1..10.

    weights: path to aesthetic-model.pth (default: downloaded from trl-lib/ddpo-aesthetic-predictor,
    the LAION file under another name); clip_model: hub id or folder of the CLIP backbone.
    Only CLIP's vision tower and projection are loaded (304 M of ViT-L/14's 428 M parameters):
    the head never reads the text tower, whose weights would sit on the GPU for nothing.
    `CLIPVisionModelWithProjection` reads them from the whole CLIP checkpoint (refusing one that
    lacks any), and its `image_embeds` are `CLIPModel.get_image_features`.
    """
    from transformers import CLIPConfig, CLIPVisionModelWithProjection

    def vision_config(source):
        config = CLIPConfig.from_pretrained(source)
        config.vision_config.projection_dim = config.projection_dim  # kept at the top level of a CLIP config
        return config.vision_config

    path = weights_file(weights, AESTHETIC_REPO, AESTHETIC_FILE, "weights")  # fail fast, before CLIP
    config = from_pretrained(vision_config, clip_model, "clip_model")
    text_tower = ("text_model.", "text_projection.", "logit_scale")  # in the checkpoint, skipped on purpose
    clip = load_pretrained(CLIPVisionModelWithProjection, clip_model, "clip_model", unused=text_tower, config=config)
    clip = freeze(clip, device, dtype)
    head = AestheticHead(clip.config.projection_dim)
    load_checkpoint(head, path, "weights", "aesthetic head")
    head = freeze(head, device, dtype)
    size = clip.config.image_size  # 224

    def score(images):  # (N, 3, H, W) -> (N,)
        embeds = clip(pixel_values=clip_pixels(images, size).to(dtype)).image_embeds  # (N, 768)
        return head(F.normalize(embeds, dim=-1)).float()  # the head was trained on unit-norm embeds

    return per_frame(score)


#### The registry

REWARDS: dict[str, str] = {"aesthetic": "LAION aesthetic predictor v2 on CLIP ViT-L/14 frames, ~1..10 "
                                        "(trl-lib/ddpo-aesthetic-predictor)"}  # name -> one line, for --help and errors
_FACTORIES = {"aesthetic": aesthetic}  # name -> factory(device, dtype, **options), or "module:function"

# The other rewards live below this file (reward_models/registry.py) and are imported when built.
REWARDS.update({name: description for name, (_, description) in ELSEWHERE.items()})
_FACTORIES.update({name: path for name, (path, _) in ELSEWHERE.items()})


def register(name, description):
    """Decorator: add a reward factory to the registry under `name`."""

    def add(factory):
        REWARDS[name] = description
        _FACTORIES[name] = factory
        return factory

    return add


def _factory(name):
    """The factory of a registered reward, importing its module the first time it is asked for."""
    if name not in _FACTORIES:
        raise UserError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    factory = _FACTORIES[name]
    if isinstance(factory, str):
        module, _, function = factory.partition(":")
        factory = _FACTORIES[name] = getattr(importlib.import_module(module), function)
    return factory


def _build(name, device, dtype, options):
    fn = _factory(name)(device=device, dtype=dtype, **options)
    fn.min_frames = getattr(fn, "min_frames", 1)
    return fn


def load_reward(name, device="cpu", dtype=torch.float32, **options):
    """Build the reward `name` on `device`; `options` go to its factory (reward_models.options).

    `name` may be one registered reward ("hps") or a weighted sum ("aesthetic:1.0,hps:2.0"),
    whose reward is sum_i w_i * r_i(frames, prompts).
    """
    terms = reward_terms(name, options, _factory)  # each name known and its options checked, before any is built
    fns = [(w, _build(n, device, dtype, opts)) for n, w, opts in terms]
    for (n, *_), (_, fn) in zip(terms, fns):
        if not getattr(fn, "differentiable", True):
            raise UserError(f"the {n} reward has no gradient, so it cannot be trained on; watch it with --eval-rewards {n}")
    if len(fns) == 1 and fns[0][0] == 1.0:
        return fns[0][1]

    def weighted_sum(frames, prompts):
        return sum(w * fn(frames, prompts) for w, fn in fns)  # (B,)

    weighted_sum.min_frames = max(fn.min_frames for _, fn in fns)
    weighted_sum.fps = next((fn.fps for _, fn in fns if getattr(fn, "fps", None)), None)  # vader.reads_whole_clip
    return weighted_sum


def load_eval_rewards(spec, device="cpu", dtype=torch.float32, build=True):
    """--eval-rewards 'hps,dynamics' -> {name: reward}: second opinions on the held-out videos, which
    show what the trained reward cannot (a learned reward gamed while another judge disagrees,
    motion lost to an image reward). Every name is checked; with `build=False` none is loaded."""
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    for n in names:
        if n not in _FACTORIES:
            raise UserError(f"--eval-rewards: unknown reward {n!r}; known rewards: {', '.join(sorted(REWARDS))}")
    return {n: _build(n, device, dtype, {}) for n in names} if build else {}
