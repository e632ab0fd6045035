"""VideoReward in miniature: a random Qwen2-VL in the hub layout and a fine-tune in the release's format.

For the CPU, the tests and the tiny video models: `--reward tiny_videoreward` runs videoreward.py's
whole code path (the release file read, its LoRA merged, the processor rebuilt in torch) on it.
"""
import json
import tempfile
from pathlib import Path

import torch

from infra.cli import quiet_libraries
from infra.miniature import away_from_defaults
from reward_models.videoreward import MAX_PIXELS, REWARD_TOKENS, videoreward

# Qwen2-VL in miniature for the tiny VideoReward (reward_models/videoreward.py): the 2B's structure
# (vision tower, 2 x 2 merger, temporal patches of 2 frames, a Qwen2 language model with tied
# embeddings), 32 wide and 2 layers deep; the special tokens in Qwen2-VL's order after 256 bytes.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>")
TINY_QWEN2_VL = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=256 + len(QWEN_SPECIALS), pad_token_id=256,
                     rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
    vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
    vision_start_token_id=259, vision_end_token_id=260, image_token_id=261, video_token_id=262,
    tie_word_embeddings=True,
)
# Qwen2-VL-Instruct's chat template (its chat_template.json): a default system turn, then each
# message, a video as <|vision_start|><|video_pad|><|vision_end|>.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_videoreward(folder, seed=0, heads=3, lora_r=4):
    """Write a tiny VideoReward: a random Qwen2-VL in the layout of Qwen/Qwen2-VL-2B-Instruct (config,
    weights, tokenizer, processor) in `folder`, and a fine-tune of it as the release ships one,
    `folder`/checkpoint-1/model.pth: the reward tokens' embeddings, `rm_head` (`heads` outputs) and
    a LoRA of rank `lora_r` (alpha = 2 r, as the release's 64 / 128) on the language model's
    linears, under the PEFT and transformers 4.45 key names (reward_models.videoreward reads them).
    Every tensor of both is drawn away from its initial default (no zero bias, no unit norm), and
    every tensor of the fine-tune differs from the base's, so a mapping that drops, merges or
    transposes one cannot pass for right.

    The tokenizer is byte-level BPE without merges: a byte a token, plus Qwen2-VL's special tokens.
    """
    from tokenizers import pre_tokenizers
    from transformers import (Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    quiet_libraries()
    folder = Path(folder)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {s: 256 + i for i, s in enumerate(QWEN_SPECIALS)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    Qwen2VLProcessor(Qwen2VLImageProcessor(), tokenizer, Qwen2VLVideoProcessor(),
                     chat_template=QWEN2_VL_CHAT_TEMPLATE).save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        qwen = away_from_defaults(Qwen2VLForConditionalGeneration(Qwen2VLConfig(**TINY_QWEN2_VL)), seed)
        qwen.save_pretrained(folder)
        tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        qwen.resize_token_embeddings(len(tokenizer))  # the release's training did so: 3 new rows, initialised
        away_from_defaults(qwen, seed + 1)  # the fine-tune moved every tensor: none equals the base's
        hidden = qwen.config.text_config.hidden_size
        state = {}
        for key, value in qwen.state_dict().items():
            old = key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)  # 4.45's names
            if old.startswith("model.layers.") and old.endswith("proj.weight"):  # a LoRA-wrapped linear
                stem = old.removesuffix(".weight")
                state[f"{stem}.base_layer.weight"] = value
                state[f"{stem}.lora_A.default.weight"] = torch.randn(lora_r, value.shape[1]) / value.shape[1] ** 0.5
                state[f"{stem}.lora_B.default.weight"] = torch.randn(value.shape[0], lora_r) * 0.1
            elif old.startswith("model.layers.") and old.endswith("proj.bias"):
                state[old.replace(".bias", ".base_layer.bias")] = value
            else:
                state[old] = value
        state["rm_head.weight"] = torch.randn(heads, hidden) / hidden**0.5
    (folder / "checkpoint-1").mkdir(exist_ok=True)
    torch.save({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, folder / "checkpoint-1" / "model.pth")
    lora = dict(lora_r=lora_r, lora_alpha=2 * lora_r)
    (folder / "model_config.json").write_text(json.dumps({"peft_lora_config": lora}, indent=2) + "\n")


def tiny_videoreward(device="cpu", dtype=torch.float32, vq=1.0, mq=1.0, ta=1.0, normalized=True, max_pixels=MAX_PIXELS,
                     checkpointing=True):
    """VideoReward's structure and code path (videoreward.py) at a tiny random size. Its scores mean
    nothing; its gradients flow as the real one's."""
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_videoreward(tmp)
        return videoreward(device, dtype, base=tmp, weights=tmp, vq=vq, mq=mq, ta=ta, normalized=normalized,
                           max_pixels=max_pixels, checkpointing=checkpointing)
