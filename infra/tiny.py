"""The built-in tiny models: small configs, fixed seeds, random weights, written in the diffusers layout.

`--model tiny` (ModelScope's family) and `--model tiny-wan` (Wan2.1's; tiny-wan22 and tiny-wan22-a14b
for Wan2.2's two forms) are built here into a
temporary folder and then loaded by models.py through the very `from_pretrained` code a hub id
takes, so the whole pipeline, loading included, runs on a CPU in seconds with nothing downloaded.
They draw noise, not content: the toy world (toy/) is the small model that has learned something.
"""
import contextlib
import functools
import json
import tempfile
from pathlib import Path

import torch

from infra.cli import UserError, quiet_libraries
from infra.files import first_line

# ModelScope's scheduler settings (its hub folder's scheduler/scheduler_config.json), so the tiny
# model samples like the real one.
MODELSCOPE_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
    clip_sample=False,
)
# Wan2.1's scheduler/ (UniPC on flow sigmas, shift 3 for 480p); sampler.FlowSchedule reads its flow_shift.
WAN_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
# scaling_factor 1: a random encoder's latents are not ~N(0, 1/0.18215²) like SD's.
TINY_VAE = dict(
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=1.0,
)
TINY_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=32,
)
# Wan2.1's family in miniature. The VAE keeps the real one's 4x temporal compression (two
# temporal downsamplings) with 4x spatial; its latent statistics are made-up values, not 0 and 1,
# so a test sees whether the per-channel normalisation is undone. Lists, not tuples: the VAE adds them to lists.
TINY_WAN_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                            out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
TINY_WAN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
                    latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0],
                    scale_factor_spatial=4, scale_factor_temporal=4)
# Wan2.2 TI2V-5B's VAE in miniature: residual, 2x2 pixel patches folded into 12 channels before two
# spatial downsamplings (8x in all, 16x for the real one's three), a decoder wider than its encoder,
# 4x in time; 8 latent channels with made-up statistics. Its transformer reads those 8 channels.
TINY_WAN22_VAE = dict(base_dim=8, decoder_base_dim=12, z_dim=8, dim_mult=[1, 1, 1], num_res_blocks=1,
                      temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                      patch_size=2, latents_mean=[0.1, -0.2, 0.3, 0.0, 0.2, -0.1, 0.0, 0.1],
                      latents_std=[1.5, 0.8, 1.2, 1.0, 0.9, 1.1, 1.3, 0.7], scale_factor_spatial=8, scale_factor_temporal=4)
TINY_WAN22_TRANSFORMER = dict(TINY_WAN_TRANSFORMER, in_channels=8, out_channels=8)
BOUNDARY_RATIO = 0.875  # Wan2.2 T2V-A14B's model_index.json: the high-noise expert takes t >= 875
# A UMT5 encoder 32 wide, on the CLIP vocabulary below (the real one reads UMT5's 256,384 tokens).
TINY_UMT5 = dict(vocab_size=49408, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8)


def write_clip_tokenizer(folder):
    """Save a transformers CLIPTokenizer built from the CLIP BPE vocabulary open_clip ships.

    The hub is out of reach in tests and on a fresh laptop, but open_clip bundles the same
    49,408-token vocabulary OpenAI's CLIP uses, so the tiny model gets a real tokenizer offline.
    open_clip spells the special tokens <start_of_text>, transformers <|startoftext|>.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    tok.save_pretrained(Path(folder) / "tokenizer")


def build_tiny_model(folder, seed=0):
    """Write the tiny model to `folder` in the diffusers layout (unet/, vae/, text_encoder/, ...).

    The same seed gives the same weights every time; the global RNG is left untouched.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    quiet_libraries()
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet3DConditionModel(**TINY_UNET).save_pretrained(folder / "unet")
        AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
        CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).save_pretrained(folder / "text_encoder")
    DDIMScheduler(**MODELSCOPE_SCHEDULER).save_pretrained(folder / "scheduler")
    write_clip_tokenizer(folder)


def build_tiny_wan(folder, seed=0, version="2.1"):
    """Write the tiny Wan to `folder` in the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or with
    version "2.2-5b" of Wan2.2-TI2V-5B-Diffusers, or "2.2-a14b" of Wan2.2-T2V-A14B-Diffusers.

    transformer/ (and A14B's transformer_2/), vae/, text_encoder/ (UMT5), tokenizer/, scheduler/
    (UniPC with the hub folder's flow shift) and model_index.json, which carries Wan2.2's
    pipeline settings: `expand_timesteps` for the 5B, `boundary_ratio` for A14B. The tokenizer is
    the CLIP vocabulary of `write_clip_tokenizer` (UMT5's SentencePiece model is not bundled by
    any installed package); prompts are padded to 512 tokens like the real one's.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    quiet_libraries()
    folder = Path(folder)
    wan22 = version != "2.1"
    experts = ["transformer", "transformer_2"] if version == "2.2-a14b" else ["transformer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in experts:
            WanTransformer3DModel(**(TINY_WAN22_TRANSFORMER if version == "2.2-5b" else TINY_WAN_TRANSFORMER)
                                  ).save_pretrained(folder / name)
        AutoencoderKLWan(**(TINY_WAN22_VAE if version == "2.2-5b" else TINY_WAN_VAE)).save_pretrained(folder / "vae")
        UMT5EncoderModel(UMT5Config(**TINY_UMT5)).save_pretrained(folder / "text_encoder")
    shift = {"2.1": 3.0, "2.2-5b": 5.0, "2.2-a14b": 12.0}[version]
    UniPCMultistepScheduler(**dict(WAN_SCHEDULER, flow_shift=shift)).save_pretrained(folder / "scheduler")
    write_clip_tokenizer(folder)
    index = {"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    if wan22:
        index.update(expand_timesteps=version == "2.2-5b", boundary_ratio=BOUNDARY_RATIO if len(experts) == 2 else None,
                     transformer_2=["diffusers", "WanTransformer3DModel"] if len(experts) == 2 else [None, None])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


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

    The tokenizer is byte-level BPE without merges: a byte a token, plus Qwen2-VL's special tokens.
    """
    from tokenizers import pre_tokenizers
    from transformers import (Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from reward_models.videoreward import REWARD_TOKENS

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
        qwen = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**TINY_QWEN2_VL))
        qwen.save_pretrained(folder)
        tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        qwen.resize_token_embeddings(len(tokenizer))  # the release's training did so: 3 new rows, initialised
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


TINY_BUILDERS = {"tiny": build_tiny_model, "tiny-wan": build_tiny_wan,
                 "tiny-wan22": functools.partial(build_tiny_wan, version="2.2-5b"),
                 "tiny-wan22-a14b": functools.partial(build_tiny_wan, version="2.2-a14b")}


@contextlib.contextmanager
def tiny_folder(name):
    """A temporary folder holding the tiny model `name`, removed when the block ends."""
    from safetensors import SafetensorError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            TINY_BUILDERS[name](tmp)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            raise UserError(f"could not write the tiny model to {tmp} ({first_line(e)}); free some space "
                            "in the temporary folder (or point TMPDIR elsewhere)") from None
        yield tmp


def tiny_videoreward(device="cpu", dtype=torch.float32, vq=1.0, mq=1.0, ta=1.0, normalized=True, max_pixels=200_704,
                     checkpointing=True):
    """VideoReward's structure and code path (reward_models/videoreward.py) at a tiny random size: for
    the CPU, the tests and the tiny video models. Its scores mean nothing; its gradients flow as the
    real one's. `max_pixels` is the release's budget, videoreward.MAX_PIXELS."""
    from reward_models.videoreward import videoreward

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_videoreward(tmp)
        return videoreward(device, dtype, base=tmp, weights=tmp, vq=vq, mq=mq, ta=ta, normalized=normalized,
                           max_pixels=max_pixels, checkpointing=checkpointing)
