"""The video families on miniatures of their releases, against diffusers' own pipelines.

Each miniature is a folder in its hub repository's layout (ModelScope's and Zeroscope's
UNet3D, SD 1.5 with AnimateDiff's motion adapter, Wan2.1, Wan2.2 TI2V-5B and T2V-A14B), with every
tensor drawn away from its initial default (infra/miniature.py): a zero-initialised temporal
layer, bias or norm would hide a mapping mistake. The reference is the installed diffusers'
pipeline loading the same folder's parts: from the same noise, with the scheduler the project
samples with, its video must be ours within 1e-4 (the Wan families' parity tests are in
test_wan.py and test_wan22.py, on the miniatures of conftest.py).
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_models import TINY_ADAPTER, TINY_SD_UNET

from infra.miniature import away_from_defaults, defaults_left
from infra.tiny import MODELSCOPE_SCHEDULER, build_tiny_model
from models import ANIMATEDIFF_SCHEDULER, load_video_model
from vader import encode_prompts, generate


@pytest.fixture(scope="module")
def modelscope_folder(tmp_path_factory):
    """ModelScope T2V (and Zeroscope, the same architecture) in miniature."""
    folder = tmp_path_factory.mktemp("modelscope")
    build_tiny_model(folder, seed=3, release=True)
    return folder


@pytest.fixture(scope="module")
def animatediff_release(tmp_path_factory):
    """SD 1.5's layout (a UNet2DConditionModel in unet/) with AnimateDiff's motion_adapter/, in miniature."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("animatediff")
    build_tiny_model(folder, seed=4, release=True)
    torch.manual_seed(0)
    away_from_defaults(UNet2DConditionModel(**TINY_SD_UNET), 5).save_pretrained(folder / "unet")
    away_from_defaults(MotionAdapter(**TINY_ADAPTER), 6).save_pretrained(folder / "motion_adapter")
    return folder


def tensors_of(folder):
    """{file/key: tensor} of every safetensors file under a model folder."""
    return {f"{p.relative_to(folder)}/{k}": v for p in sorted(Path(folder).rglob("*.safetensors"))
            for k, v in load_file(p).items()}


def test_no_miniature_keeps_a_tensor_at_its_default(modelscope_folder, animatediff_release, wan_folder, wan22_folder,
                                                    a14b_folder):
    for folder in (modelscope_folder, animatediff_release, wan_folder, wan22_folder, a14b_folder):
        tensors = tensors_of(folder)
        assert len(tensors) > 20 and defaults_left(tensors) == [], folder


def test_the_check_finds_a_fresh_model_s_defaults(tmp_path):
    """The check itself: a folder as the tiny builder writes it without `release` keeps zero biases,
    unit norms and UNet3D's zero-initialised temporal layers, and is caught."""
    build_tiny_model(tmp_path)
    left = defaults_left(tensors_of(tmp_path))
    assert any(k.endswith("norm.weight") for k in left) and any(k.endswith(".bias") for k in left)
    assert any("temp_convs" in k or "transformer_in.proj_out" in k for k in left)


def ours(model, prompt, frames, size, steps, guidance):
    """Our generation of one video, seed 0: (F, 3, H, W) in [0, 1], and its initial noise."""
    cond, uncond = encode_prompts(model, [prompt, ""]).split(1)
    video = generate(model, cond, uncond, frames, size[0], size[1], steps, guidance, seed=0)[0]
    from vader import initial_noise

    z_T = initial_noise(model, 1, frames, size[0], size[1], torch.Generator().manual_seed(0), "cpu")
    return video, z_T


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])  # ModelScope's square; Zeroscope's widescreen
def test_modelscope_and_zeroscope_match_text_to_video_sd_pipeline(modelscope_folder, size):
    from diffusers import DDIMScheduler, TextToVideoSDPipeline

    model = load_video_model(str(modelscope_folder))
    video, z_T = ours(model, "a cat", 3, size, 4, 9.0)
    pipe = TextToVideoSDPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                 unet=model.unet, scheduler=DDIMScheduler(**MODELSCOPE_SCHEDULER))
    ref = pipe("a cat", num_inference_steps=4, guidance_scale=9.0, height=size[0], width=size[1], num_frames=3,
               latents=z_T, output_type="pt").frames[0]  # (F, 3, H, W)
    torch.testing.assert_close(video, ref, rtol=1e-4, atol=1e-4)
    assert video.std() > 0.01  # a video, not a constant the two could share by accident


def test_animatediff_matches_animatediff_pipeline(animatediff_release):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    model = load_video_model(str(animatediff_release))
    assert type(model.unet).__name__ == "UNetMotionModel"
    video, z_T = ours(model, "a cat", 3, (32, 32), 4, 7.5)
    scheduler = DDIMScheduler.from_pretrained(animatediff_release, subfolder="scheduler", **ANIMATEDIFF_SCHEDULER)
    pipe = AnimateDiffPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                               unet=UNet2DConditionModel.from_pretrained(animatediff_release, subfolder="unet"),
                               motion_adapter=MotionAdapter.from_pretrained(animatediff_release / "motion_adapter"),
                               scheduler=scheduler)
    ref = pipe("a cat", num_inference_steps=4, guidance_scale=7.5, height=32, width=32, num_frames=3, latents=z_T,
               output_type="pt").frames[0]  # (F, 3, H, W)
    torch.testing.assert_close(video, ref, rtol=1e-4, atol=1e-4)
    assert video.std() > 0.01


@pytest.mark.parametrize("release", [True, False])
def test_a_dropped_temporal_layer_is_seen_only_on_a_release_miniature(modelscope_folder, tmp_path, release):
    """A planted mapping mistake: the last convolution of a temporal conv layer dropped, as a loader
    that skips a key would leave it (at its initial zeros). On the miniature it moves the video far
    outside the parity test's 1e-4; on a freshly initialised folder, where diffusers initialises
    that convolution to zero so that the temporal layer starts as the identity, it changes nothing
    at all: the reason the miniatures are drawn away from their defaults."""
    folder = modelscope_folder if release else tmp_path
    if not release:
        build_tiny_model(tmp_path)
    right, wrong = load_video_model(str(folder)), load_video_model(str(folder))
    last = wrong.unet.down_blocks[0].temp_convs[0].conv4[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    a, _ = ours(right, "a cat", 3, (32, 32), 4, 9.0)
    b, _ = ours(wrong, "a cat", 3, (32, 32), 4, 9.0)
    change = (a - b).abs().max().item()
    print(f"release={release}: max |frame change| {change:.2e}")
    assert change > 1e-3 if release else change == 0.0


@pytest.mark.parametrize("family", ["modelscope", "wan"])
def test_a_folder_missing_a_tensor_or_holding_a_stranger_is_refused_by_name(family, modelscope_folder, wan_folder,
                                                                         tmp_path, capsys):
    """from_pretrained would load it with the missing tensor at random (its warning silenced): the
    model loader refuses it in one line naming both tensors (infra/loading.py)."""
    import shutil

    from safetensors.torch import save_file

    from infra.cli import run_cli

    shutil.copytree(modelscope_folder if family == "modelscope" else wan_folder, tmp_path / "m")
    part = tmp_path / "m" / ("unet" if family == "modelscope" else "transformer") / "diffusion_pytorch_model.safetensors"
    tensors = load_file(part)
    gone = sorted(tensors)[3]
    tensors["stranger.weight"] = tensors.pop(gone)
    save_file(tensors, part, metadata={"format": "pt"})
    with pytest.raises(SystemExit) as stop:
        run_cli(load_video_model, str(tmp_path / "m"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert f"missing {gone}" in err and "unexpected stranger.weight" in err
