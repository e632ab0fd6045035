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
from infra.miniature import away_from_defaults

# ModelScope's scheduler settings (its hub folder's scheduler/scheduler_config.json), so the tiny
# model samples like the real one.
MODELSCOPE_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
    clip_sample=False,
)
# Wan2.1's scheduler/ (UniPC on flow sigmas, shift 3 for 480p); wan.WanFlowSchedule reads its flow_shift.
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


def build_tiny_model(folder, seed=0, release=False):
    """Write the tiny model to `folder` in the diffusers layout (unet/, vae/, text_encoder/, ...).

    The same seed gives the same weights every time; the global RNG is left untouched. With
    `release`, a miniature of a released model: every tensor drawn away from its initial default
    (infra/miniature.py), as training leaves them, so a parity test can see a mapping mistake.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    quiet_libraries()
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trained = away_from_defaults if release else lambda module, seed: module
        trained(UNet3DConditionModel(**TINY_UNET), seed).save_pretrained(folder / "unet")
        trained(AutoencoderKL(**TINY_VAE), seed + 1).save_pretrained(folder / "vae")
        trained(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), seed + 2).save_pretrained(folder / "text_encoder")
    DDIMScheduler(**MODELSCOPE_SCHEDULER).save_pretrained(folder / "scheduler")
    write_clip_tokenizer(folder)


def build_tiny_wan(folder, seed=0, version="2.1", release=False):
    """Write the tiny Wan to `folder` in the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or with
    version "2.2-5b" of Wan2.2-TI2V-5B-Diffusers, or "2.2-a14b" of Wan2.2-T2V-A14B-Diffusers.

    transformer/ (and A14B's transformer_2/), vae/, text_encoder/ (UMT5), tokenizer/, scheduler/
    (UniPC with the hub folder's flow shift) and model_index.json, which carries Wan2.2's
    pipeline settings: `expand_timesteps` for the 5B, `boundary_ratio` for A14B. The tokenizer is
    the CLIP vocabulary of `write_clip_tokenizer` (UMT5's SentencePiece model is not bundled by
    any installed package); prompts are padded to 512 tokens like the real one's. `release` as
    for `build_tiny_model`.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    quiet_libraries()
    folder = Path(folder)
    wan22 = version != "2.1"
    experts = ["transformer", "transformer_2"] if version == "2.2-a14b" else ["transformer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trained = away_from_defaults if release else lambda module, seed: module
        for i, name in enumerate(experts):
            trained(WanTransformer3DModel(**(TINY_WAN22_TRANSFORMER if version == "2.2-5b" else TINY_WAN_TRANSFORMER)),
                    seed + i).save_pretrained(folder / name)
        trained(AutoencoderKLWan(**(TINY_WAN22_VAE if version == "2.2-5b" else TINY_WAN_VAE)), seed + 2
                ).save_pretrained(folder / "vae")
        trained(UMT5EncoderModel(UMT5Config(**TINY_UMT5)), seed + 3).save_pretrained(folder / "text_encoder")
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
