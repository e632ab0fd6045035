"""VideoReward: a reward that watches the whole clip (VideoAlign: Liu et al., arXiv 2501.13918).

A vision-language model, Qwen2-VL-2B-Instruct, fine-tuned on human preferences between pairs of
generated videos. It reads the video (frames at 2 fps) and a long instruction that contains the
prompt and three added tokens, <|VQ_reward|>, <|MQ_reward|> and <|TA_reward|>; a linear head
`rm_head` on the last hidden state at each of them gives the three scores: visual quality,
motion quality and text alignment. Unlike a per-frame image reward it sees the frames together,
so motion can raise or lower it.

The pieces, in the order a score is computed:
1. `video_inputs`: frames (B, f, 3, H, W) in [0, 1] -> Qwen2-VL's `pixel_values_videos` and
   grid, in torch so the gradient reaches the frames (the official processor rounds to uint8).
2. `chat_text`: the prompt in the training instruction, the chat template around it, and one
   <|video_pad|> per merged video token.
3. `VideoRewardModel`: the vision tower's tokens replace the placeholders, the language model
   runs, the head reads the three reward tokens.
The official weights ship as one PEFT state dict (`convert_checkpoint` merges its LoRA).
"""
import glob
import json
import math
from pathlib import Path

import torch
from torch import nn

from infra.cli import UserError
from reward_models.common import freeze, from_pretrained, weights_file
from rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize

BASE = "Qwen/Qwen2-VL-2B-Instruct"
REPO, CHECKPOINT = "KwaiVGI/VideoReward", "checkpoint-11352/model.pth"
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")  # in the order they appear in the prompt
# The training set's mean and standard deviation of each raw score (the release's inference config):
# normalised, the three are on one scale and can be summed.
NORMS = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
FPS = 2  # frames a second the model was trained to read
MAX_PIXELS, MIN_PIXELS = 200_704, 128 * 28 * 28  # per frame, as the release reads videos
LORA_R, LORA_ALPHA = 64, 128  # the release's LoRA on the language model's linears
# The instruction the reward was trained with ("detailed_special"), kept verbatim: the head reads
# hidden states that depend on every token of it.
PROMPT = (Path(__file__).with_name("videoreward_prompt.txt")).read_text()
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # Qwen2-VL's chat template adds it


#### 1. Frames -> Qwen2-VL's video input, differentiably

def smart_resize(height, width, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """Qwen2-VL's frame size: multiples of `factor` (a 14-pixel patch, merged 2 x 2), near the aspect
    ratio, scaled down (or up) to within [min_pixels, max_pixels]. 480 x 832 -> 336 x 588."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def video_inputs(frames, max_pixels=MAX_PIXELS, patch=14, merge=2, temporal=2):
    """(B, f, 3, H, W) in [0, 1] -> (pixel_values_videos (B t gh gw, 3 * 2 * 14 * 14), grid (t, gh, gw)).

    Each frame is resized (bicubic, antialiased, as the release's reader) to `smart_resize`'s size
    and normalised with CLIP's statistics. An odd frame count repeats the last frame. Then
    every 2 frames x 14 x 14 pixels become one patch vector, t = f / 2 of them in time and
    gh x gw in space, ordered so that each 2 x 2 block of neighbouring patches is contiguous: the
    vision tower's merger folds such a block into one token for the language model.
    """
    b, f, c, height, width = frames.shape
    h, w = smart_resize(height, width, patch * merge, max_pixels=max_pixels)
    x = frames.flatten(0, 1)  # (B f, 3, H, W)
    if (h, w) != (height, width):
        x = resize(x, (h, w), "bicubic")
    x = normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).view(b, f, c, h, w)
    if f % temporal:
        x = torch.cat([x, x[:, -1:].expand(-1, temporal - f % temporal, -1, -1, -1)], dim=1)
    t, gh, gw = x.shape[1] // temporal, h // patch, w // patch
    x = x.reshape(b, t, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # (B, t, gh/2, gw/2, 2, 2, C, 2, 14, 14)
    return x.reshape(b * t * gh * gw, c * temporal * patch * patch), (t, gh, gw)


#### 2. The text around the video

def chat_text(prompt, video_tokens):
    """Qwen2-VL's chat template around one user turn (the video, then the instruction with the prompt),
    ready for the assistant's answer, with the video placeholder repeated once per video token."""
    return (f"{SYSTEM}<|im_start|>user\n<|vision_start|>{'<|video_pad|>' * video_tokens}<|vision_end|>"
            f"{PROMPT.format(text_prompt=prompt)}<|im_end|>\n<|im_start|>assistant\n")


#### 3. The model

class VideoRewardModel(nn.Module):
    """Qwen2-VL without its language-model head (never used for a score), plus `rm_head`."""

    def __init__(self, qwen, head, tokenizer):
        super().__init__()
        self.qwen, self.rm_head, self.tokenizer = qwen, head, tokenizer  # qwen: a Qwen2VLModel
        self.reward_ids = tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        self.video_id = qwen.config.video_token_id
        vision = qwen.config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size

    def forward(self, frames, prompts, max_pixels=MAX_PIXELS):
        """(B, f, 3, H, W) in [0, 1], B prompts -> raw scores (B, 3): VQ, MQ, TA."""
        pixels, (t, gh, gw) = video_inputs(frames, max_pixels, self.patch, self.merge, self.temporal)
        n = t * gh * gw // self.merge**2  # language-model tokens per video
        ids = self.tokenizer([chat_text(p, n) for p in prompts], padding=True, padding_side="right").input_ids
        start = ids[0].index(self.video_id)  # the video's n placeholders: the same place in every row
        reward_at = [[row.index(i) for i in self.reward_ids] for row in ids]  # (B, 3) positions
        device = self.rm_head.weight.device
        ids = torch.tensor(ids, device=device)  # (B, L), right-padded
        mask = (ids != self.tokenizer.pad_token_id).long()
        grid = torch.tensor([[t, gh, gw]] * len(prompts), device=device)
        video = self.qwen.visual(pixels.to(self.rm_head.weight.dtype), grid_thw=grid).pooler_output  # (B n, D)
        embeds = self.qwen.get_input_embeddings()(ids)  # (B, L, D)
        embeds = torch.cat([embeds[:, :start], video.view(len(prompts), n, -1).to(embeds.dtype), embeds[:, start + n:]],
                           dim=1)  # the placeholders' embeddings replaced by the video's tokens
        # Positions 0, 1, 2, ... for every token: the release ran the language model without Qwen2-VL's
        # 3-D rotary positions (its forward passed no position ids, and then the text model counts up),
        # so the head was trained on hidden states computed that way.
        hidden = self.qwen.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        at = hidden[torch.arange(len(prompts), device=device)[:, None], torch.tensor(reward_at, device=device)]  # (B, 3, D)
        out = self.rm_head(at).float()  # (B, 3, 1) or (B, 3, 3): one output, or one per dimension
        return out[..., 0] if out.shape[-1] == 1 else out.diagonal(dim1=1, dim2=2)  # (B, 3)

    def checkpoint(self, enabled=True):
        """Backward recomputes one vision block or one decoder layer at a time (transformers' own
        checkpointing acts only in training mode, and a frozen judge stays in eval mode)."""
        from vader import checkpoint_units

        checkpoint_units([*self.qwen.visual.blocks, *self.qwen.language_model.layers], enabled=enabled)
        return self


def convert_checkpoint(state, scale):
    """The release's state dict (a PEFT model of transformers 4.45's Qwen2-VL) -> this module's keys.

    PEFT names a wrapped linear's weight `<name>.base_layer.weight` (its bias `.base_layer.bias`)
    and adds `<name>.lora_A.default.weight` and `.lora_B.default.weight`; the merged weight is
    W + scale * B A (scale = alpha / r), and the bias stays as it is. A module PEFT trains whole is
    `<name>.modules_to_save.default`, beside a frozen copy `.original_module.` that is dropped.
    transformers 5 moved the language model from `model.*` to `model.language_model.*` and the
    vision tower from `visual.*` to `model.visual.*`. A LoRA tensor without its partner or its base
    weight is an error naming it: nothing of the release is silently dropped.
    """
    state = {k.removeprefix("base_model.model."): v for k, v in state.items() if ".original_module." not in k}
    state = {k.replace(".modules_to_save.default.", ".").replace(".base_layer.", "."): v for k, v in state.items()}
    lora = {k for k in state if ".lora_" in k}
    out, merged = {}, set()
    for key, value in state.items():
        if key in lora:
            continue
        pair = [key.removesuffix(".weight") + f".lora_{x}.default.weight" for x in "AB"] if key.endswith(".weight") else []
        if pair and any(p in lora for p in pair):  # a LoRA-wrapped weight; a bias never is
            if not all(p in lora for p in pair):
                raise UserError(f"the VideoReward weights hold half of the LoRA pair {pair}; use an intact model.pth")
            a, b = (state[p] for p in pair)
            value = (value.float() + scale * b.float() @ a.float()).to(value.dtype)
            merged.update(pair)
        if key.startswith("visual."):
            key = "qwen." + key
        elif key.startswith("model."):
            key = "qwen.language_model." + key.removeprefix("model.")
        out[key] = value
    if lora - merged:
        raise UserError(f"the VideoReward weights hold LoRA tensors with no base weight: {sorted(lora - merged)[:3]}; "
                        "use an intact model.pth")
    return out


def load_model(base, weights, device, dtype, checkpointing=True):
    """The frozen VideoReward model: Qwen2-VL from `base` (hub id or folder), its tokenizer with the
    three reward tokens added (and the embeddings cut to the tokenizer's length, as in training),
    then the release's weights from `weights` (a model.pth)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    from infra.files import read_tensor_state

    def load(source):
        tokenizer = AutoTokenizer.from_pretrained(source)
        qwen = Qwen2VLForConditionalGeneration.from_pretrained(source, torch_dtype=dtype)
        return tokenizer, qwen

    config = _release_config(weights)
    state = convert_checkpoint(
        read_tensor_state(weights, "VideoReward weights (weights=)", "point weights= at the downloaded model.pth"),
        config.get("lora_alpha", LORA_ALPHA) / config.get("lora_r", LORA_R))
    state.pop("lm_head.weight", None)  # the language-model head stays behind
    if "rm_head.weight" not in state:
        raise UserError(f"weights={str(weights)!r} has no rm_head.weight: is it VideoReward's model.pth?")
    tokenizer, qwen = from_pretrained(load, base, "base")
    tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    qwen.resize_token_embeddings(len(tokenizer))
    out_features, hidden = state["rm_head.weight"].shape
    model = VideoRewardModel(qwen.model, nn.Linear(hidden, out_features, bias=False), tokenizer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"weights={str(weights)!r} does not fit {base!r} (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); pass the VideoReward model.pth and its base Qwen2-VL")
    return freeze(model.checkpoint(checkpointing), device, dtype)


def _release_config(weights):
    """The LoRA settings of model_config.json beside the checkpoint folder, when it is there."""
    path = Path(weights).parent.parent / "model_config.json"
    if not path.is_file():
        return {}
    lora = json.loads(path.read_text()).get("peft_lora_config", {})
    return {k: lora[k] for k in ("lora_r", "lora_alpha") if k in lora}


def videoreward(device="cpu", dtype=torch.float32, base=BASE, weights=None, vq=1.0, mq=1.0, ta=1.0,
                normalized=True, max_pixels=MAX_PIXELS, checkpointing=True):
    """VideoReward's weighted sum of visual quality, motion quality and text alignment; by default
    each normalised (about 0 +- 1) and summed with weight 1, the release's "Overall".

    base: hub id or folder of Qwen2-VL-2B-Instruct; weights: the release's model.pth (default:
    downloaded from KwaiVGI/VideoReward), or a folder holding checkpoint-*/model.pth; vq, mq, ta:
    the weight of each score (0 drops it); normalized=false: raw scores; max_pixels: the pixel budget
    of a frame; checkpointing=false: keep the reward model's activations for backward instead
    of recomputing them. Frames should span the clip at about 2 fps (train.py picks them so).
    """
    for name, value in (("vq", vq), ("mq", mq), ("ta", ta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"videoreward: {name}={value!r} is not a number; give each score's weight, e.g. vq=1,mq=2,ta=0")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 28 * 28:
        raise UserError(f"videoreward: max_pixels={max_pixels!r} must be a whole number of at least 784 (one merged patch)")
    if weights is not None and Path(weights).expanduser().is_dir():
        found = sorted(glob.glob(str(Path(weights).expanduser() / "checkpoint-*" / "model.pth")),
                       key=lambda p: int(Path(p).parent.name.split("-")[-1]))
        if not found:
            raise UserError(f"weights={weights!r} holds no checkpoint-*/model.pth")
        weights = found[-1]
    path = weights_file(weights, REPO, CHECKPOINT, "weights")
    return reward_from(load_model(base, path, device, dtype, checkpointing), vq, mq, ta, normalized, max_pixels)


def reward_from(model, vq=1.0, mq=1.0, ta=1.0, normalized=True, max_pixels=MAX_PIXELS):
    """The reward function (the rewards.py contract) of a VideoRewardModel, with `videoreward`'s options."""
    mean = [m if normalized else 0.0 for m, _ in NORMS.values()]
    std = [s if normalized else 1.0 for _, s in NORMS.values()]

    def scores(frames, prompts):  # (B, 3): VQ, MQ, TA, each normalised unless normalized=false
        raw = model(frames, prompts, max_pixels)
        return (raw - raw.new_tensor(mean)) / raw.new_tensor(std)

    def reward(frames, prompts):
        s = scores(frames, prompts)
        return (s * s.new_tensor([vq, mq, ta])).sum(dim=1)  # (B,)

    def parts(frames, prompts):  # as an evaluation reward: one column of metrics.csv per score, and the sum
        s = scores(frames, prompts)
        return {**{k: s[:, i].mean().item() for i, k in enumerate(NORMS)},
                "sum": (s * s.new_tensor([vq, mq, ta])).sum(1).mean().item()}

    reward.min_frames, reward.fps, reward.scores, reward.parts, reward.modules = 2, FPS, scores, parts, [model]
    return reward
