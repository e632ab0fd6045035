"""Image reward models, scored frame by frame: hps, pickscore, clip, aesthetic_hps (aesthetic: rewards.py).

Each factory loads a frozen model by its public id (or from a local path given as an option) and
returns reward(frames (B, f, 3, H, W) in [0, 1], prompts) -> (B,), differentiable in `frames`.
Every frame is scored on its own and the scores are averaged over f, as VADER does for image
rewards. Text-image rewards pair row-wise: frame j of video i meets prompt i, never another.

The preprocessing is the official processor's, rebuilt from tensor ops (see rewards.py).
Where it deviates: the official processors round the resized image to uint8 and clamp it to
[0, 255]; we keep floats, so the bicubic filter's small overshoot at sharp edges survives
(clamping would zero the gradient of those pixels). The tests bound the difference.

transformers and open_clip are imported inside the factories, so `import rewards` stays fast.
"""
import torch
import torch.nn.functional as F

from infra.cli import UserError
from reward_models.common import freeze, from_pretrained, load_checkpoint, load_pretrained, weights_file
from rewards import CLIP_L14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_pixels, load_reward, normalize, resize

HPS_REPO, HPS_FILES = "xswu/HPSv2", {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore ships no tokenizer


#### Preprocessing and shared pieces


def hps_pixels(images, size):
    """HPSv2's transform (open_clip resize_mode "longest"): long side -> size (bicubic), then
    zero-pad (black) to size x size, centred; OpenAI mean/std. (N, 3, H, W) -> (N, 3, size, size).
    """
    h, w = images.shape[-2:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    x = resize(images, (nh, nw), "bicubic")  # (N, 3, nh, nw)
    top, left = (size - nh) // 2, (size - nw) // 2
    x = F.pad(x, (left, size - nw - left, top, size - nh - top))  # (N, 3, size, size)
    return normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def pooled(output):
    """The embedding from `get_image_features`/`get_text_features`: a tensor in transformers v4,
    an output object whose `.pooler_output` holds the projected embedding in v5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def frame_text_reward(embed_images, embed_texts, scale=1.0):
    """Row-wise text-image reward: scale * cos(frame j of video i, prompt i), mean over j.

    embed_images: (N, 3, H, W) -> (N, D); embed_texts: B prompts -> (B, D).
    """

    def reward(frames, prompts):
        b, f = frames.shape[:2]
        img = F.normalize(embed_images(frames.flatten(0, 1)).float(), dim=-1)  # (B*f, D)
        txt = F.normalize(embed_texts(list(prompts)).float(), dim=-1)  # (B, D)
        cos = torch.einsum("bfd,bd->bf", img.view(b, f, -1), txt)  # (B, f): video i vs prompt i
        return scale * cos.mean(dim=1)  # (B,)

    return reward


def load_clip(source, tokenizer_source, tokenizer_option, device, dtype):
    """A frozen transformers CLIPModel (from option `model`) and its two embedders: frames
    (N, 3, H, W) -> (N, D), and prompts -> (B, D) with the tokenizer from `tokenizer_source`."""
    from transformers import AutoTokenizer, CLIPModel

    model = freeze(load_pretrained(CLIPModel, source, "model"), device, dtype)
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, tokenizer_source, tokenizer_option)
    size = model.config.vision_config.image_size  # 224
    max_tokens = model.config.text_config.max_position_embeddings  # 77

    def embed_images(images):
        return pooled(model.get_image_features(pixel_values=clip_pixels(images, size).to(dtype)))

    def embed_texts(prompts):
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        return pooled(model.get_text_features(**tokens.to(device)))

    return model, embed_images, embed_texts


#### The rewards


def hps(device="cpu", dtype=torch.float32, version="v2.1", weights=None, arch="ViT-H-14"):
    """Human Preference Score v2 (Wu et al. 2306.09341): an OpenCLIP ViT-H-14 fine-tuned on human
    choices; the score is the plain cosine of image and text embeddings (no logit scale).

    version: "v2.1" (default) or "v2.0"; weights: path to the HPS .pt file (default: downloaded
    from xswu/HPSv2; the tensors are under "state_dict"); arch: the open_clip architecture name.
    """
    import open_clip

    version = f"v{str(version).removeprefix('v')}"  # "v2.1", "2.1" and 2.1 all name v2.1
    if version not in HPS_FILES:
        raise UserError(f"hps version={version!r} is unknown; use one of {', '.join(HPS_FILES)}")
    if arch not in open_clip.list_models():
        raise UserError(f"arch={arch!r} is not an open_clip architecture; HPSv2 uses ViT-H-14")
    path = weights_file(weights, HPS_REPO, HPS_FILES[version], "weights")
    model = open_clip.create_model(arch, pretrained=None)  # the architecture; weights follow
    load_checkpoint(model, path, "weights", f"HPS {version}", key="state_dict")
    model = freeze(model, device, dtype)
    tokenizer = open_clip.get_tokenizer(arch)  # OpenAI's BPE, bundled with open_clip
    size = model.visual.image_size[0]  # 224

    return frame_text_reward(
        lambda images: model.encode_image(hps_pixels(images, size).to(dtype)),
        lambda prompts: model.encode_text(tokenizer(prompts).to(device)),
    )


def pickscore(device="cpu", dtype=torch.float32, model=PICKSCORE, tokenizer=PICKSCORE_TOKENIZER):
    """PickScore (Kirstain et al. 2305.01569): a CLIP-H fine-tuned on Pick-a-Pic preferences;
    score = logit_scale.exp() * cosine(image, text), about 20 for a good match.

    model: hub id or folder of the CLIPModel; tokenizer: where its tokenizer lives (PickScore uses
    the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K: short side 224 bicubic, centre crop).
    Pairing is row-wise. VADER's PickScore loss compares every video with prompt 0 (it takes row 0
    of the text-image score matrix), a batch bug for batches with different prompts.
    """
    net, embed_images, embed_texts = load_clip(model, tokenizer, "tokenizer", device, dtype)
    return frame_text_reward(embed_images, embed_texts, scale=net.logit_scale.exp().item())


def clip(device="cpu", dtype=torch.float32, model=CLIP_L14):
    """A cheap text-alignment reward: the cosine of OpenAI CLIP ViT-L/14 frame and prompt
    embeddings (the backbone the aesthetic head already loads). model: hub id or local folder."""
    _, embed_images, embed_texts = load_clip(model, model, "model", device, dtype)
    return frame_text_reward(embed_images, embed_texts)


# VADER's aesthetic_hps_loss_fn (aesthetic_target 10, grad_scale 0.1) is
#     loss = (1.5 * 0.1 * |aes - 10| + |1 - hps|) / 2.
# While aes < 10 and hps < 1 (always, in practice) that is const - (0.075 * aes + 0.5 * hps), so
# this weighted sum has exactly VADER's gradient.
AESTHETIC_HPS = "aesthetic:0.075,hps:0.5"


def aesthetic_hps(device="cpu", dtype=torch.float32, **options):
    """VADER's combined reward. Options reach the terms as in `load_reward`: "hps.version",
    "aesthetic.weights", "hps.weights"; a plain option goes to every term that takes it."""
    return load_reward(AESTHETIC_HPS, device=device, dtype=dtype, **options)
