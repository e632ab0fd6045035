"""Real model families on tiny folders; real sizes on the meta device; fitting the GPU; getting the LoRA out.

Every family loads from a tiny folder in its real layout through the code path its hub id takes.
"""
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import sample
from lora import TARGETS, inject_lora, load_lora, lora_layers, save_lora
from benchmarks.architectures import build_architecture
from infra.tiny import MODELSCOPE_SCHEDULER, build_tiny_model
from models import MODELS, checkpoint_blocks, load_video_model
from rewards import load_reward
from infra.setup import batch_drawer
from train import train_step
from vader import loss_scaler

# A tiny SD 1.5-style image UNet and a motion adapter that fits it (same blocks, layers a block).
TINY_SD_UNET = dict(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_ADAPTER = dict(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                    motion_norm_num_groups=8)
CFG = SimpleNamespace(frames=2, height=32, width=32, num_steps=2, guidance=3.0, decode_frames=2, grad_accum=1,
                      grad_clip=1.0, low_memory=False, batch_size=1)


@pytest.fixture(scope="module")
def animatediff_folder(tmp_path_factory):
    """SD 1.5's layout (unet/ is a UNet2DConditionModel) plus motion_adapter/, AnimateDiff's pipeline layout."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("animatediff")
    build_tiny_model(folder)  # vae/, text_encoder/, tokenizer/, scheduler/ (ModelScope's; the spec overrides it)
    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_SD_UNET).save_pretrained(folder / "unet")  # replaces the UNet3D
    MotionAdapter(**TINY_ADAPTER).save_pretrained(folder / "motion_adapter")
    return folder


def unet_out(unet, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, frames, 16, 16, generator=g)  # (B, C, F, h, w); F != C, so a layout mix-up fails
    text = torch.randn(1, 77, 32, generator=g)
    return unet(x.to(unet.dtype), 500, encoder_hidden_states=text.to(unet.dtype)).sample  # (B, C, F, h, w)


def replace_ns(ns, **changes):
    return SimpleNamespace(**{**vars(ns), **changes})


def randomise(params, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def train_a_few_steps(model, steps=2):
    """train.train_step with AdamW: returns the LoRA parameters and their values before training."""
    params = inject_lora(model.unet, rank=4, targets=model.spec.lora_targets)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    cond, uncond = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    for _ in range(steps):
        g = torch.Generator()
        train_step(model, load_reward("brightness"), params, opt, loss_scaler(torch.float32, "cpu"),
                   batch_drawer(model, CFG, ["a"], cond, g), uncond, CFG, g, 1)
    return params, before


#### Real sizes, counted on the meta device (nothing allocated)

def count(module, where=""):
    return sum(p.numel() for n, p in module.named_parameters() if where in n)


def test_real_sizes_match_real_models_md():
    unet, vae, text = build_architecture("unet3d")
    assert count(unet) == pytest.approx(1.411e9, rel=1e-3)
    temporal = count(unet, "temp_") + count(unet, "transformer_in")
    assert temporal == pytest.approx(545e6, rel=2e-3)
    assert count(vae) == pytest.approx(84e6, rel=5e-3) and count(text) == pytest.approx(340e6, rel=2e-3)
    params = inject_lora(unet, rank=16)
    assert len(lora_layers(unet)) == 264 and sum(p.numel() for p in params) == pytest.approx(6.65e6, rel=1e-3)
    assert sum(1 for n in lora_layers(unet) if "temp_attentions" in n or n.startswith("transformer_in")) == 136
    unet, vae, text = build_architecture("animatediff")
    assert count(unet) == pytest.approx(859.5e6 + 453.2e6, rel=1e-3)  # SD 1.5's UNet + the motion modules
    assert count(text) == pytest.approx(123e6, rel=2e-3)
    assert text.config.hidden_size == unet.config.cross_attention_dim == 768  # CLIP ViT-L's text width


#### Each family loads through its hub id's code path, trains, and its LoRA round-trips

def test_modelscope_family_from_a_local_folder(tiny_folder, monkeypatch, tmp_path):
    hub = tmp_path / "hub"  # as the hub repository ships it: the UNet and VAE also as an fp16 variant
    shutil.copytree(tiny_folder, hub)
    for part in ("unet", "vae"):
        (hub / part / "diffusion_pytorch_model.safetensors").rename(hub / part / "diffusion_pytorch_model.fp16.safetensors")
    monkeypatch.setitem(MODELS, "modelscope", replace(MODELS["modelscope"], source=str(hub)))
    model = load_video_model("modelscope")  # exactly what --model modelscope does, but offline
    assert MODELS["modelscope"].variant == "fp16"  # so only the half-size files were read (there are no others)
    assert type(model.unet).__name__ == "UNet3DConditionModel" and model.spec.height == 256
    params, before = train_a_few_steps(model)
    assert all(p.dtype == torch.float32 for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    save_lora(model.unet, tmp_path / "lora.safetensors")
    fresh = load_video_model(str(tiny_folder))
    load_lora(fresh.unet, tmp_path / "lora.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(unet_out(fresh.unet), unet_out(model.unet))


def test_animatediff_family_from_a_local_folder(animatediff_folder, monkeypatch, tmp_path):
    adapter = str(animatediff_folder / "motion_adapter")
    monkeypatch.setitem(MODELS, "animatediff", replace(MODELS["animatediff"], source=str(animatediff_folder),
                                                       adapter=adapter, variant=""))
    model = load_video_model("animatediff")  # SD 1.5 UNet + MotionAdapter -> UNetMotionModel, as from the hub
    assert type(model.unet).__name__ == "UNetMotionModel" and model.text_encoder.config.hidden_size == 32
    # The registry's scheduler settings win over the folder's (AnimateDiff's docs: linear, linspace).
    assert (model.schedule.beta_schedule, model.schedule.timestep_spacing, model.schedule.steps_offset) == \
        ("linear", "linspace", 1)
    with torch.no_grad():
        assert unet_out(model.unet).shape == (1, 4, 3, 16, 16)  # (B, C, F, h, w) in and out, as UNet3D
    params, before = train_a_few_steps(model)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    assert any(".motion_modules." in n for n in lora_layers(model.unet))  # temporal layers adapt too
    save_lora(model.unet, tmp_path / "lora.safetensors")
    monkeypatch.undo()  # the real registry again: now the folder is just a folder
    fresh = load_video_model(str(animatediff_folder))  # the family is read off unet/'s config
    assert fresh.spec.family == "animatediff" and fresh.spec.height == 32
    load_lora(fresh.unet, tmp_path / "lora.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(unet_out(fresh.unet), unet_out(model.unet))
    # UNetMotionModel has diffusers' PEFT integration: it reads our file as it is (alpha = r here).
    plain = load_video_model(str(animatediff_folder)).unet
    plain.load_lora_adapter(str(tmp_path / "lora.safetensors"), prefix="unet")
    with torch.no_grad():
        torch.testing.assert_close(unet_out(plain), unet_out(model.unet))


#### Fitting the GPU: checkpointing, mixed precision, --low-memory

def test_unet_checkpointing_changes_memory_not_results(tiny_model):
    params = inject_lora(tiny_model.unet, rank=4)
    randomise(params)
    recomputed = []
    inner = tiny_model.unet.down_blocks[0].resnets[0].conv1  # inside a checkpointed unit: runs again in backward
    inner.register_forward_hook(lambda *a: recomputed.append(1))

    def forward_backward(enabled):
        checkpoint_blocks(tiny_model.unet, enabled)
        recomputed.clear()
        for p in params:
            p.grad = None
        out = unet_out(tiny_model.unet)
        out.square().mean().backward()
        return out.detach(), [p.grad for p in params], len(recomputed)

    plain_out, plain_grads, plain_calls = forward_backward(False)
    out, grads, calls = forward_backward(True)
    assert (plain_calls, calls) == (1, 2)  # the unit ran again during backward
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for g, h in zip(grads, plain_grads):
        torch.testing.assert_close(g, h)


def test_low_memory_gives_the_same_gradients(tiny_model):
    params = inject_lora(tiny_model.unet, rank=4)
    randomise(params)
    cond, uncond = torch.randn(1, 77, 32), torch.randn(1, 77, 32)

    def grads(low_memory):
        """One train_step at lr 0 (the LoRA stays put): its loss and the (clipped) gradients it left."""
        g, cfg = torch.Generator().manual_seed(0), replace_ns(CFG, low_memory=low_memory)
        loss, *_ = train_step(tiny_model, load_reward("brightness"), params, torch.optim.SGD(params, lr=0.0),
                              loss_scaler(torch.float32, "cpu"), batch_drawer(tiny_model, cfg, ["a"], cond, g), uncond,
                              cfg, g, 2)
        return loss, [p.grad.clone() for p in params]

    (a, ga), (b, gb) = grads(False), grads(True)
    torch.testing.assert_close(a, b)
    for g, h in zip(ga, gb):
        torch.testing.assert_close(g, h)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_keeps_lora_in_float32(tiny_folder, dtype):
    model = load_video_model(str(tiny_folder), dtype=dtype)
    params = inject_lora(model.unet, rank=4)
    randomise(params)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = loss_scaler(dtype, "cpu")  # fp16: dynamic loss scaling; bf16: a pass-through
    assert scaler.is_enabled() == (dtype == torch.float16)
    cond, uncond = torch.randn(1, 77, 32, dtype=dtype), torch.randn(1, 77, 32, dtype=dtype)
    g = torch.Generator()
    *_, finite = train_step(model, load_reward("brightness"), params, opt, scaler, batch_drawer(model, CFG, ["a"], cond, g),
                            uncond, CFG, g, 1)  # scale, backward, unscale, clip, step
    assert finite
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in params)
    assert all(p.dtype == dtype and p.grad is None for p in model.unet.parameters() if not p.requires_grad)
    assert all(torch.isfinite(p.grad).all() for p in params) and any(p.grad.abs().sum() > 0 for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


#### Using the LoRA outside the project

def test_lora_file_loads_with_peft(tiny_model, tiny_folder, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    randomise(inject_lora(tiny_model.unet, rank=4, alpha=8))
    save_lora(tiny_model.unet, tmp_path / "lora.safetensors")
    unet = load_video_model(str(tiny_folder)).unet
    unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)), unet)
    state = {k.removeprefix("unet."): v for k, v in load_file(tmp_path / "lora.safetensors").items()}
    result = set_peft_model_state_dict(unet, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    with torch.no_grad():
        torch.testing.assert_close(unet_out(unet), unet_out(tiny_model.unet))


def test_export_merged_loads_in_plain_diffusers(tiny_model, tiny_folder, tmp_path):
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    randomise(inject_lora(tiny_model.unet, rank=4))
    save_lora(tiny_model.unet, tmp_path / "lora.safetensors")
    sample.main(["--model", str(tiny_folder), "--lora", str(tmp_path / "lora.safetensors"),
                 "--export-merged", str(tmp_path / "merged"), "--device", "cpu"])
    unet = UNet3DConditionModel.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(unet_out(unet), unet_out(tiny_model.unet), rtol=1e-4, atol=1e-5)
    pipe = TextToVideoSDPipeline(vae=tiny_model.vae, text_encoder=tiny_model.text_encoder,
                                 tokenizer=tiny_model.tokenizer, unet=unet,
                                 scheduler=DDIMScheduler(**MODELSCOPE_SCHEDULER))
    video = pipe("a cat", num_inference_steps=2, height=32, width=32, num_frames=3, output_type="pt").frames
    assert video.shape == (1, 3, 3, 32, 32) and torch.isfinite(video).all()  # (B, F, 3, H, W)
