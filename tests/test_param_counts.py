"""The real architectures, built on the meta device (nothing allocated), against the parameter counts
their authors publish: each figure to the precision its source gives it, or, where our count differs
from a round figure for a known reason, the exact relation that explains the difference.

`rounds_to(n, figure, step)`: n, written to the precision of the source (`step`), is `figure`; e.g.
"860M" is rounds_to(n, 860e6, 1e6), "1.3B" is rounds_to(n, 1.3e9, 0.1e9).
"""
import torch
from diffusers import UNet2DConditionModel
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, UMT5Config,
                          UMT5ForConditionalGeneration)

from benchmarks.architectures import (OPENCLIP_H_TEXT, QWEN2_VL_2B, SD15_UNET, UMT5_XXL, WAN_1_3B_TRANSFORMER,
                                      WAN_14B_TRANSFORMER, WAN22_5B_TRANSFORMER, build_architecture, build_videoreward)
from benchmarks.speed import CLIP_L14_CONFIG, random_aesthetic


def count(module, *names):
    """Parameters of `module` (each shared tensor once), or only those whose name contains one of `names`."""
    return sum(p.numel() for n, p in module.named_parameters() if not names or any(s in n for s in names))


def rounds_to(n, figure, step):
    return abs(n - figure) <= step / 2


#### ModelScope T2V 1.7B (unet3d family; Zeroscope has the same shapes)

def test_modelscope_t2v():
    unet, vae, text = build_architecture("unet3d")
    n_unet, n_vae, n_text = count(unet), count(vae), count(text)
    assert (n_unet, n_vae, n_text) == (1_411_233_860, 83_653_863, 340_387_840)
    # Model card (huggingface.co/ali-vilab/text-to-video-ms-1.7b, the card of
    # ali-vilab/modelscope-damo-text-to-video-synthesis): "consists of three sub-networks: text feature
    # extraction, text feature-to-video latent space diffusion model, and video latent space to video
    # visual space. The overall model parameters are about 1.7 billion." The report (arXiv 2308.06571,
    # abstract): "three components (i.e., VQGAN, a text encoder, and a denoising UNet), totally comprising
    # 1.7 billion parameters, in which 0.5 billion parameters are dedicated to temporal capabilities."
    # The three sub-networks sum to 1.835 B, 8 % over the "about 1.7 billion": the figure is loose (the
    # UNet alone ships as 5.65 GB float32 = 1.411 B, so it is not our UNet that is too big). No subset
    # rounds to 1.7 either: UNet + text encoder is 1.752 B, UNet + VAE 1.495 B.
    total = n_unet + n_vae + n_text
    assert total == 1_835_275_563 and abs(total / 1.7e9 - 1) < 0.1
    # "0.5 billion parameters are dedicated to temporal capabilities" (same abstract): the temporal
    # convolutions and attentions, and the input temporal transformer.
    temporal = count(unet, "temp_", "transformer_in")
    assert temporal == 545_323_136 and rounds_to(temporal, 0.5e9, 0.1e9)


def test_openclip_h_text_tower_is_modelscopes_text_encoder():
    text = build_architecture("unet3d")[2]
    # OpenCLIP's profile of ViT-H-14 (github.com/mlfoundations/open_clip, docs/model_profile.csv, row
    # "ViT-H-14": text_mparams 354.03): its 24-layer text tower with the text projection. ModelScope
    # reads the penultimate layer, so its encoder (the hub's text_encoder/config.json: 23 layers, a
    # CLIPTextModel without projection) is that tower less its last layer and the projection.
    with torch.device("meta"):
        tower = CLIPTextModelWithProjection(CLIPTextConfig(**dict(OPENCLIP_H_TEXT, num_hidden_layers=24)))
    assert count(tower) == 354_032_640 and rounds_to(count(tower), 354.03e6, 0.01e6)
    last_layer = count(tower.text_model.encoder.layers[-1])
    assert count(text) == count(tower) - last_layer - count(tower.text_projection)


#### Stable Diffusion 1.5 + AnimateDiff motion adapter v1-5-2

def test_animatediff_sd15_unet_text_encoder_and_motion_module():
    unet, vae, text = build_architecture("animatediff")
    with torch.device("meta"):
        sd15 = count(UNet2DConditionModel(**SD15_UNET))
    # Stable Diffusion v1 (github.com/CompVis/stable-diffusion README, and the SD v1 model cards on
    # huggingface.co): "With its 860M UNet and 123M text encoder, the model is relatively lightweight".
    assert sd15 == 859_520_964 and rounds_to(sd15, 860e6, 1e6)
    assert count(text) == 123_060_480 and rounds_to(count(text), 123e6, 1e6)
    # AnimateDiff README (github.com/guoyww/AnimateDiff, "AnimateDiff v2 Model Zoo"): mm_sd_v15_v2.ckpt,
    # "Motion Module | 453 M | 1.7 GB" -- the checkpoint diffusers converted to
    # guoyww/animatediff-motion-adapter-v1-5-2. UNetMotionModel is SD 1.5's UNet plus exactly those modules.
    motion = count(unet, "motion_modules")
    assert motion == 453_209_280 and rounds_to(motion, 453e6, 1e6)
    assert count(unet) == sd15 + motion


def test_sd_vae():
    vae = build_architecture("animatediff")[1]
    # No primary source states the KL-f8 VAE's count (the LDM paper, arXiv 2112.10752, and the SD cards
    # give none); the "~84M" in circulation agrees with the float32 file the hub serves,
    # huggingface.co/stabilityai/sd-vae-ft-mse diffusion_pytorch_model.safetensors, 335 MB (4 bytes a
    # parameter, the header a few kB).
    assert count(vae) == 83_653_863 and rounds_to(count(vae), 84e6, 1e6)
    assert rounds_to(4 * count(vae), 335e6, 1e6)


#### The aesthetic reward's CLIP ViT-L/14

def test_aesthetic_clip_vit_l14():
    clip, head = random_aesthetic(CLIP_L14_CONFIG, "meta", torch.float32)[1]
    with torch.device("meta"):
        full = CLIPModel(CLIPConfig(**CLIP_L14_CONFIG))
    # OpenCLIP's profile (github.com/mlfoundations/open_clip, docs/model_profile.csv, row "ViT-L-14",
    # OpenAI's architecture): mparams 427.62, image_mparams 303.97, text_mparams 123.65. The image figure
    # includes the visual projection, as our CLIPVisionModelWithProjection does; the text one includes
    # the text projection (SD's "123M text encoder" does not: 123.06 M + 0.59 M). openai/clip-vit-large-patch14
    # ships as a 1.71 GB float32 model.safetensors.
    assert count(full) == 427_616_513 and rounds_to(count(full), 427.62e6, 0.01e6)
    assert count(clip) == 303_966_208 and rounds_to(count(clip), 303.97e6, 0.01e6)
    assert rounds_to(count(full.text_model) + count(full.text_projection), 123.65e6, 0.01e6)
    assert count(full) == count(clip) + count(full.text_model) + count(full.text_projection) + 1  # + logit_scale
    # The aesthetic head: LAION's improved-aesthetic-predictor MLP 768-1024-128-64-16-1 (no published count).
    assert count(head) == 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1


#### Wan2.1

def test_wan21_transformers_vae_and_umt5():
    small, vae, text = build_architecture("wan")
    big = build_architecture("wan-14b")[0]
    # Wan2.1 README (github.com/Wan-Video/Wan2.1, "Video Diffusion DiT") and the report (arXiv 2503.20314)
    # name the two models 1.3B and 14B and give their shapes: dimension 1536 / 5120, FFN 8960 / 13824,
    # frequency dimension 256, 12 / 40 heads, 30 / 40 layers, 16 channels in and out.
    for cfg, dim, ffn, heads, layers in ((WAN_1_3B_TRANSFORMER, 1536, 8960, 12, 30),
                                         (WAN_14B_TRANSFORMER, 5120, 13824, 40, 40)):
        assert (cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["freq_dim"],
                cfg["num_attention_heads"], cfg["num_layers"], cfg["in_channels"], cfg["out_channels"]) == \
            (dim, ffn, 256, heads, layers, 16, 16)
    assert rounds_to(count(big), 14e9, 1e9) and count(big) == 14_288_491_584
    # "1.3B" is the model's name, not its count: those shapes hold 1.419 B parameters (the official
    # wan/modules/model.py WanModel builds to the same 1,418,996,800), 1.394 B of them in the 30 blocks.
    # The name undercounts by 0.12 B; our architecture is not bigger than Wan's.
    assert count(small) == 1_418_996_800 and rounds_to(count(small), 1.4e9, 0.1e9)
    assert rounds_to(count(small, "blocks."), 1.39e9, 0.01e9)
    # Wan-VAE: "127M" parameters (arXiv 2503.20314, the Wan-VAE section).
    assert count(vae) == 126_892_531 and rounds_to(count(vae), 127e6, 1e6)
    # umT5-XXL: google/umt5-xxl's card gives no count; XXL is mT5's 13B shape (mT5, arXiv 2010.11934:
    # "XXL (13B)"), encoder + decoder + an LM head, which the hub's config leaves untied
    # (tie_word_embeddings false). transformers 5 ties every T5 LM head to the shared embedding, so the
    # head is added back once. Wan uses the encoder only: the whole model less the decoder's own layers
    # and the LM head.
    with torch.device("meta"):
        tied = UMT5ForConditionalGeneration(UMT5Config(**UMT5_XXL))
    head = count(tied.shared)  # the untied head has the embedding's shape, 256,384 x 4096
    assert count(tied) + head == 12_972_531_712 and rounds_to(count(tied) + head, 13e9, 1e9)
    decoder_own = count(tied.decoder) - count(tied.shared)  # its embedding is the shared one
    assert count(text) == 5_680_910_336 == count(tied) - decoder_own
    assert rounds_to(count(text), 5.68e9, 0.01e9)  # the hub's "5.68B params" of encoder-only exports


#### Wan2.2

def test_wan22_ti2v_5b_and_t2v_a14b():
    dense, vae22, _ = build_architecture("wan22-5b")
    high, low, vae, _ = build_architecture("wan22-a14b")
    # Wan2.2 README (github.com/Wan-Video/Wan2.2): "a 5B dense model, i.e., TI2V-5B"; its config
    # (wan/configs/wan_ti2v_5B.py): dim 3072, FFN 14336, 24 heads, 30 layers, the 48-channel VAE.
    assert (WAN22_5B_TRANSFORMER["num_attention_heads"] * WAN22_5B_TRANSFORMER["attention_head_dim"],
            WAN22_5B_TRANSFORMER["ffn_dim"], WAN22_5B_TRANSFORMER["num_layers"]) == (3072, 14336, 30)
    assert count(dense) == 4_999_787_712 and rounds_to(count(dense), 5e9, 1e9)
    # Wan2.2 README, "Mixture-of-Experts (MoE) Architecture": "Each expert model has about 14B parameters,
    # resulting in a total of 27B parameters but only 14B active parameters per step". Each expert is
    # Wan2.1 14B's shape (wan/configs/wan_t2v_A14B.py: dim 5120, FFN 13824, 40 heads, 40 layers), so one
    # expert, the active part, is 14.29 B. The two share no tensor, so the total is 28.58 B: the README's
    # "27B" undercounts by 1.58 B (no component of that size is shared between the experts).
    assert count(high) == count(low) == 14_288_491_584 and rounds_to(count(low), 14e9, 1e9)
    assert count(high) + count(low) == 28_576_983_168 and rounds_to(count(high) + count(low), 29e9, 1e9)
    assert count(vae) == 126_892_531  # A14B decodes with the Wan2.1 VAE (wan_t2v_A14B.py: Wan2.1_VAE.pth)
    # Wan2.2-VAE: no count published. A bfloat16 export of it, huggingface.co/unsloth/Wan2.2-TI2V-5B-GGUF
    # VAE/Wan2.2_VAE.safetensors, is 1.31 GiB: 2 bytes a parameter.
    assert count(vae22) == 704_688_668 and rounds_to(2 * count(vae22) / 2**30, 1.31, 0.01)


#### VideoReward's Qwen2-VL-2B

def test_videoreward_qwen2_vl_2b():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    model = build_videoreward()
    vision, language = count(model.qwen.visual), count(model.qwen.language_model)
    assert (vision, language, count(model.rm_head)) == (665_271_296, 1_543_290_368, 1536 * 3)
    # Qwen2-VL report (arXiv 2409.12191, Table 1): Qwen2-VL-2B, "Vision Encoder 675M, LLM 1.5B" (675M for
    # all three sizes). 675 M is the 7B's vision tower, whose merger projects to 3584 (the 7B's width);
    # the 2B's projects to 1536, 2048 x 5120 weights and 2048 biases fewer: 665.3 M.
    with torch.device("meta"):
        seven = Qwen2VisionTransformerPretrainedModel(
            type(model.qwen.config.vision_config)(**dict(QWEN2_VL_2B["vision_config"], hidden_size=3584)))
    assert count(seven) == 675_759_104 and abs(count(seven) - 675e6) < 1e6
    assert vision == count(seven) - (3584 - 1536) * (5120 + 1)
    # The LLM: VideoReward cuts the embeddings to its tokenizer's 151,660 rows; Qwen2-VL-2B has 151,936
    # (config.json vocab_size), tied to the LM head. Either way it is "1.5B"; without the embeddings it is
    # 1.31 B, as huggingface.co/Qwen/Qwen2.5-1.5B's card gives for the same 1536-wide, 28-layer shape
    # ("Number of Parameters: 1.54B", "(Non-Embedding): 1.31B").
    hub_language = language + (151_936 - 151_660) * 1536
    assert rounds_to(language, 1.5e9, 0.1e9) and rounds_to(hub_language, 1.5e9, 0.1e9)
    assert rounds_to(language - count(model.qwen.language_model.embed_tokens), 1.31e9, 0.01e9)
    # The whole checkpoint: huggingface.co/Qwen/Qwen2-VL-2B-Instruct, "Model size 2.21B params" (the
    # hub's count of its safetensors; tied embeddings, so no separate LM head).
    assert rounds_to(vision + hub_language, 2.21e9, 0.01e9)
