"""Video reward models: actpred, object, video_text, temporal.

Same contract as every reward (see rewards.py): reward(frames (B, f, 3, H, W) in [0, 1], prompts)
-> (B,), differentiable in `frames`, models frozen. The video models (VideoMAE, X-CLIP, V-JEPA 2)
see the decoded frames together as one clip; the detector (OWLv2) scores frame by frame.

The preprocessing is the official processor's, rebuilt from tensor ops (see rewards.py).
Where it deviates: the official processors round the resized frames to uint8 and we keep floats;
for OWLv2 see `owl_pixels`. The tests bound the differences.

transformers is imported inside the factories, so `import rewards` stays fast.
"""
import difflib
import re

import torch
import torch.nn.functional as F

from infra.cli import UserError
from reward_models.common import IMAGENET_MEAN, IMAGENET_STD, freeze, from_pretrained, load_pretrained, resample_frames
from rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, center_crop, normalize, per_frame, resize, resize_short_side

VIDEOMAE_K400 = "MCG-NJU/videomae-base-finetuned-kinetics"
OWLV2 = "google/owlv2-base-patch16-ensemble"
XCLIP = "microsoft/xclip-base-patch32"
VJEPA2 = "facebook/vjepa2-vitl-fpc64-256"
OWL_PAD = 0.5  # the grey that OWLv2 pads with (as did older transformers' Owlv2ImageProcessor)


#### Preprocessing


def video_pixels(frames, short_side, crop, dtype):
    """VideoMAE / X-CLIP / V-JEPA 2 processors, per frame: short side -> short_side (bilinear),
    centre crop, ImageNet mean/std. (B, f, 3, H, W) -> (B, f, 3, crop, crop)."""
    b, f = frames.shape[:2]
    x = resize_short_side(frames.flatten(0, 1), short_side, "bilinear")  # (B*f, 3, h', w')
    x = normalize(center_crop(x, crop), IMAGENET_MEAN, IMAGENET_STD)  # (B*f, 3, crop, crop)
    return x.unflatten(0, (b, f)).to(dtype)  # (B, f, 3, crop, crop)


def owl_pixels(images, size, pad_value=OWL_PAD):
    """Owlv2ImageProcessor: pad bottom and right to a square, resize to size x size (bilinear),
    OpenAI mean/std. (N, 3, H, W) -> (N, 3, size, size).

    Deviations: recent transformers pads with black (0.0) where OWLv2 and older transformers
    used grey 0.5 (we keep the grey); when shrinking (frames above 960 px) the processor blurs with a
    Gaussian before a plain bilinear resize, where we use the antialiased bilinear filter.
    """
    h, w = images.shape[-2:]
    side = max(h, w)
    x = F.pad(images, (0, side - w, 0, side - h), value=pad_value)  # (N, 3, side, side)
    return normalize(resize(x, (size, size), "bilinear"), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def check_frames(frames, need, name):
    """A clear UserError when a video reward gets fewer decoded frames than it needs."""
    if frames.shape[1] < need:
        raise UserError(f"the {name} reward needs {need}+ decoded frames, got {frames.shape[1]}; "
                        f"use --decode-frames {need} or more")


#### Action recognition


def _words(text):
    """Lower-case words with parenthesised parts dropped: 'Skiing (not slalom)' -> 'skiing'."""
    return " ".join(re.findall(r"[a-z0-9']+", re.sub(r"\(.*?\)", " ", text.lower())))


def find_action(prompt, labels):
    """The id of the longest label (id -> name) whose words appear in the prompt, or None."""
    text = f" {_words(prompt)} "
    hits = [(len(_words(name)), i) for i, name in labels.items() if f" {_words(name)} " in text]
    return max(hits)[1] if hits else None


def actpred(device="cpu", dtype=torch.float32, model=VIDEOMAE_K400, label=None, log_prob=False,
            num_frames=None):
    """Action recognition as a reward (VADER's "actpred"): the probability that VideoMAE
    (Tong et al. 2203.12602) assigns to the video's action.

    The action is the Kinetics-400 label named in each prompt ("a man playing guitar" ->
    "playing guitar"; the longest label whose words appear in the prompt), or `label=` for all
    videos. log_prob=True returns log p instead (VADER minimises the cross-entropy, -log p).
    The decoded frames are resampled to `num_frames` (default: the model's 16) by repeating or
    thinning; VADER instead loads the model for its decoded count (8 alternate frames, which is
    num_frames=8; the positional table is sinusoidal, so any multiple of the tubelet size works).
    Preprocessing: the checkpoint's processor (short side 224 bilinear, centre crop, ImageNet).
    """
    from transformers import VideoMAEForVideoClassification

    extra = {} if num_frames is None else {"num_frames": int(num_frames)}  # overrides the config
    net = freeze(load_pretrained(VideoMAEForVideoClassification, model, "model", **extra), device, dtype)
    cfg = net.config
    labels = {int(i): name for i, name in cfg.id2label.items()}
    fixed = None
    if label is not None:
        fixed = next((i for i, name in labels.items() if name.lower() == str(label).lower()), None)
        if fixed is None:
            close = difflib.get_close_matches(str(label), list(labels.values()), n=3)
            raise UserError(f"label={label!r} is not a label of this model; "
                            f"close ones: {', '.join(close) or 'none'}")

    def label_of(prompt):
        found = fixed if fixed is not None else find_action(prompt, labels)
        if found is None:
            raise UserError(f"prompt {prompt!r} names no Kinetics-400 action: add one "
                            f"(e.g. 'playing guitar') or pass label=<a Kinetics-400 label>")
        return found

    def reward(frames, prompts):
        check_frames(frames, cfg.tubelet_size, "actpred")
        target = torch.tensor([label_of(p) for p in prompts], device=frames.device)  # (B,)
        clip = resample_frames(frames, cfg.num_frames)  # (B, 16, 3, H, W)
        x = video_pixels(clip, cfg.image_size, cfg.image_size, dtype)  # (B, 16, 3, 224, 224)
        logp = net(pixel_values=x).logits.float().log_softmax(dim=-1)  # (B, 400)
        picked = logp.gather(1, target[:, None]).squeeze(1)  # (B,): log p(action of video i)
        return picked if log_prob else picked.exp()

    reward.min_frames = cfg.tubelet_size  # one tubelet (2 frames): the least that holds motion
    return reward


#### Open-vocabulary detection


def object_presence(device="cpu", dtype=torch.float32, query=None, remove=False, model=OWLV2):
    """How surely OWLv2 (Minderer et al. 2306.09683) finds `query` ("a cat") in each frame:
    sigmoid of the query's class logit, max over the predicted boxes (one per patch), averaged
    over frames. remove=True rewards its absence instead (1 - presence), as in VADER's
    object-removal experiment. The query is fixed for the run; prompts are not used.
    """
    if not query or not str(query).strip():
        raise UserError('the object reward needs a text query: pass query="a cat" '
                        "(the object to reward, or to remove with remove=True)")
    from transformers import AutoTokenizer, Owlv2ForObjectDetection

    net = freeze(load_pretrained(Owlv2ForObjectDetection, model, "model"), device, dtype)
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, model, "model")
    max_tokens = net.config.text_config.max_position_embeddings  # OWL text queries are 16 tokens
    tokens = tokenizer([str(query)], padding="max_length", truncation=True, max_length=max_tokens,
                       return_tensors="pt").to(device)  # input_ids (1, 16)
    size = net.config.vision_config.image_size  # 960

    def score(images):  # (N, 3, H, W) -> (N,)
        n = images.shape[0]
        out = net(input_ids=tokens.input_ids.expand(n, -1), attention_mask=tokens.attention_mask.expand(n, -1),
                  pixel_values=owl_pixels(images, size).to(dtype))  # .logits (N, patches, 1 query)
        present = out.logits[..., 0].float().sigmoid().amax(dim=1)  # (N,): the most confident box
        return 1 - present if remove else present

    return per_frame(score)


#### Video-text alignment


def video_text(device="cpu", dtype=torch.float32, model=XCLIP):
    """X-CLIP (Ni et al. 2208.02816) scores the whole clip against its prompt: logits_per_video,
    i.e. logit_scale * cosine of the video embedding and the video-conditioned text embedding.

    X-CLIP's clip length is fixed by its config (8 frames); the decoded frames are resampled to
    it. Preprocessing: the checkpoint's processor (short side 224 bilinear, centre crop, ImageNet).
    """
    from transformers import AutoTokenizer, XCLIPModel

    net = freeze(load_pretrained(XCLIPModel, model, "model"), device, dtype)
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, model, "model")
    n, size = net.config.vision_config.num_frames, net.config.vision_config.image_size  # 8, 224
    max_tokens = net.config.text_config.max_position_embeddings

    def reward(frames, prompts):
        x = video_pixels(resample_frames(frames, n), size, size, dtype)  # (B, 8, 3, 224, 224)
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_tokens,
                           return_tensors="pt")
        logits = net(pixel_values=x, **tokens.to(device)).logits_per_video  # (B, B): every pair
        return logits.diagonal().float()  # (B,): video i with its own prompt i

    return reward


#### Temporal consistency


def temporal(device="cpu", dtype=torch.float32, model=VJEPA2):
    """Temporal consistency as V-JEPA 2 sees it. Project-defined: VADER advertised a V-JEPA
    reward but published no code.

    The clip's tubelet time steps (2 frames each) are split in two halves. The encoder embeds the
    first half alone (the context: it never sees the future); the predictor, given those
    embeddings and the space-time positions of the second half, predicts the second half's
    embeddings. The target is the encoder's embedding of the whole clip at those positions,
    layer-normalised, and the reward is minus the L1 error, the feature-prediction loss of
    V-JEPA (Bardes et al. 2404.08471) and V-JEPA 2 (Assran et al. 2506.09985):

        r = -mean | P(E(x_first_half), positions of second half) - LN(E(x))[second half] |

    A clip whose second half follows from its first (steady motion, stable objects, no flicker
    or morphing) scores higher. A frozen clip is the most predictable, so pair this reward with
    a text or image term (e.g. "temporal:1,hps:1") rather than use it alone. Unlike V-JEPA's
    training, the target is not detached: it is part of the video being judged. The predictor
    was trained on random space-time block masks; "the whole future" is a harder mask of the
    same kind (positions reach it through 3-D rotary embeddings), not a new task.
    Preprocessing: VJEPA2VideoProcessor (short side crop*256/224 bilinear, centre crop, ImageNet).
    """
    from transformers import VJEPA2Model

    net = freeze(load_pretrained(VJEPA2Model, model, "model"), device, dtype)
    cfg = net.config
    tubelet, crop = cfg.tubelet_size, cfg.crop_size  # 2, 256
    per_step = (crop // cfg.patch_size) ** 2  # tokens per tubelet time step (16 x 16)

    def reward(frames, prompts):
        check_frames(frames, 2 * tubelet, "temporal")
        b, steps = frames.shape[0], frames.shape[1] // tubelet
        first = steps // 2  # context time steps; the rest are predicted
        clip = frames[:, : steps * tubelet]  # (B, T, 3, H, W), T = steps * tubelet
        x = video_pixels(clip, int(crop * 256 / 224), crop, dtype)  # (B, T, 3, 256, 256)
        whole = net.get_vision_features(x)  # (B, steps * per_step, D): sees the whole clip
        context = net.get_vision_features(x[:, : first * tubelet])  # (B, first * per_step, D)
        ids = torch.arange(steps * per_step, device=x.device).expand(b, -1)  # (B, N), time-major
        cut = first * per_step
        pred = net.predictor(encoder_hidden_states=context, context_mask=[ids[:, :cut]],
                             target_mask=[ids[:, cut:]]).last_hidden_state  # (B, N - cut, D)
        target = F.layer_norm(whole[:, cut:].float(), whole.shape[-1:])  # (B, N - cut, D)
        return -(pred.float() - target).abs().mean(dim=(1, 2))  # (B,)

    reward.min_frames = 2 * tubelet  # one context and one target time step
    return reward
