"""Real-size architectures with random weights, built from their public configs: nothing downloaded.

bench.py measures them (random weights cost exactly the memory and time trained ones do) and
the tests count their parameters on the meta device, where nothing is allocated.
"""
import torch

from infra.cli import quiet_libraries
from models import per_frame_text

# Stable Diffusion's VAE, shared by both families (~84 M parameters).
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, scaling_factor=0.18215)
# ModelScope's text encoder: OpenCLIP-H's text tower without its last layer (~340 M). Vocabulary
# (49,408) and length (77) are CLIPTextConfig's defaults.
OPENCLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                       hidden_act="gelu", projection_dim=1024)
# SD 1.5's text encoder: OpenAI CLIP ViT-L/14's text tower (~123 M), quick_gelu as CLIPTextConfig's default.
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768)
# SD 1.5's UNet: UNet2DConditionModel's defaults are SD 1.x's, but for the 768-d text and 64x64 latents.
SD15_UNET = dict(cross_attention_dim=768, sample_size=64)
# Wan2.1 T2V 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json, as diffusers'
# scripts/convert_wan_to_diffusers.py writes it): 1,418,996,800 parameters.
WAN_1_3B_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
# Wan2.1 T2V 14B (Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json): 40 blocks 5120 wide (40 heads
# of 128), FFN 13824; the rest as the 1.3B's.
WAN_14B_TRANSFORMER = dict(WAN_1_3B_TRANSFORMER, num_attention_heads=40, ffn_dim=13824, num_layers=40)
# Its VAE: AutoencoderKLWan's constructor defaults are the Wan2.1 VAE's config (base_dim 96, z_dim 16,
# dim_mult 1-2-4-4, temporal downsampling in the last two levels, the latent statistics): 126,892,531.
WAN_VAE = dict()
# Wan2.2 TI2V-5B (Wan-AI/Wan2.2-TI2V-5B-Diffusers, transformer/config.json): 30 blocks 3072 wide (24 heads
# of 128), FFN 14336, reading the new VAE's 48 channels.
WAN22_5B_TRANSFORMER = dict(WAN_1_3B_TRANSFORMER, num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48)
# Its VAE (vae/config.json): residual, 2x2 pixel patches (12 channels in and out), encoder 160 and decoder
# 256 wide, 48 latent channels, 16x in space, 4x in time. The latent statistics are left at 0 and 1
# (the hub's config carries the trained ones; the cost does not depend on them).
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48,
                 latents_std=[1.0] * 48)
# Its text encoder: the encoder of google/umt5-xxl (text_encoder/config.json): 5,680,910,336 parameters.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")


def build_architecture(family, device="meta", dtype=torch.float32):
    """(unet, vae, text_encoder) of a family at real size with random weights: nothing downloaded.

    On the meta device nothing is allocated, so counting 1.4 B parameters takes a second; on a
    GPU they cost the same memory and time as trained weights. The MotionAdapter's constructor
    defaults (blocks 320-1280, 2 motion layers a block, 8 heads, 32 positions, a mid block) are
    taken to be the v1-5-2 checkpoint's config.
    """
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    quiet_libraries()
    if family in WAN_FAMILIES:
        return build_wan(device, dtype, *WAN_FAMILIES[family])
    with torch.device(device):
        if family == "unet3d":
            unet = UNet3DConditionModel()  # its constructor defaults are ModelScope's config
            text = CLIPTextModel(CLIPTextConfig(**OPENCLIP_H_TEXT))
        else:
            unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(**SD15_UNET), MotionAdapter(), load_weights=False)
            per_frame_text(unet)
            text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        vae = AutoencoderKL(**SD_VAE)
    return [m.to(dtype).eval().requires_grad_(False) for m in (unet, vae, text)]


# family -> (transformer config, VAE config, experts): Wan2.2 A14B's two experts are Wan2.1 14B's shape.
WAN_FAMILIES = {"wan": (WAN_1_3B_TRANSFORMER, WAN_VAE, 1), "wan-14b": (WAN_14B_TRANSFORMER, WAN_VAE, 1),
                "wan22-5b": (WAN22_5B_TRANSFORMER, WAN22_VAE, 1), "wan22-a14b": (WAN_14B_TRANSFORMER, WAN_VAE, 2)}


def build_wan(device="meta", dtype=torch.float32, config=WAN_1_3B_TRANSFORMER, vae_config=WAN_VAE, experts=1):
    """A Wan's (transformer, VAE, UMT5 encoder) at real size with random weights (`WAN_FAMILIES`);
    with two experts (Wan2.2 A14B), (high-noise transformer, low-noise transformer, VAE, UMT5).

    As `from_pretrained` does, the transformer's `_keep_in_fp32_modules` (norms, time embedding,
    modulation tables: 3.1 M parameters) stay float32 whatever `dtype` is.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device(device):
        transformers = [WanTransformer3DModel(**config) for _ in range(experts)]
        vae = AutoencoderKLWan(**vae_config)
        text = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    models = [m.to(dtype).eval().requires_grad_(False) for m in (*transformers, vae, text)]
    for transformer in transformers:
        keep = transformer._keep_in_fp32_modules
        for name, p in transformer.named_parameters():
            if any(k in name.split(".") for k in keep):
                p.data = p.data.float()
    return models


# Qwen2-VL-2B-Instruct (Qwen/Qwen2-VL-2B-Instruct, config.json), VideoReward's base: a 32-block vision
# tower 1280 wide whose merger hands 1536-wide tokens to a 28-layer Qwen2 language model (12 heads,
# 2 key-value heads, FFN 8960) with tied embeddings. VideoReward adds three tokens and cuts the
# embeddings to its tokenizer's 151,660 rows.
QWEN2_VL_2B = dict(
    text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151_660, rms_norm_eps=1e-6,
                     rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
    tie_word_embeddings=True,
)


def word_tokenizer():
    """A stand-in for Qwen2's tokenizer, offline: each word and each run of punctuation of VideoReward's
    instruction is a token (about what a BPE of 151 k tokens makes of English), and the chat's
    special tokens are single tokens, as in the real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from reward_models.tiny_videoreward import QWEN_SPECIALS
    from reward_models.videoreward import PROMPT, REWARD_TOKENS, SYSTEM

    words = pre_tokenizers.Whitespace().pre_tokenize_str(SYSTEM + PROMPT + " user assistant")
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(dict.fromkeys(w for w, _ in words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": [*QWEN_SPECIALS[1:], *REWARD_TOKENS]})
    return fast


def build_videoreward(device="meta", dtype=torch.float32, checkpointing=True):
    """VideoReward's model (reward_models.videoreward.VideoRewardModel) at Qwen2-VL-2B's size with random
    weights: the vision tower and language model without the language-model head, `rm_head` with
    three outputs, and `word_tokenizer`'s tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    from reward_models.videoreward import VideoRewardModel

    quiet_libraries()
    tokenizer = word_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                            "<|video_pad|>")}
    config = Qwen2VLConfig(**QWEN2_VL_2B, vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"])
    with torch.device(device):
        qwen = Qwen2VLModel(config)
        head = torch.nn.Linear(config.text_config.hidden_size, 3, bias=False)
    return VideoRewardModel(qwen, head, tokenizer).checkpoint(checkpointing).to(dtype).eval().requires_grad_(False)
