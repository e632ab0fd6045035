"""Wan2.2: the tiny TI2V-5B and the tiny two-expert A14B against diffusers' own WanPipeline, the new
VAE's exact prefix, the expert switch, LoRA files in the right expert, real sizes, the scripts.

The tiny models are written in their hub folders' layouts (model_index.json included) and loaded
as local folders, the code path `Wan-AI/Wan2.2-*-Diffusers` takes.
"""
import csv

import pytest
import torch
from safetensors.torch import load_file

import train
from benchmarks.architectures import build_architecture
from infra.cli import run_cli
from lora import inject_lora, lora_layers, merge_lora, save_lora
from models import MODELS, load_video_model, spec_of
from sampler import sample as run_sampler
from wan import WanFlowSchedule
from vader import encode_prompts, generate

FAST = ["--reward", "brightness", "--prompts", "animals.txt", "--num-steps", "4", "--frames", "5",
        "--decode-frames", "2", "--num-videos", "1", "--eval-videos", "2", "--eval-prompts", "animals_heldout.txt"]


def pipeline(model, shift, **kwargs):
    """WanPipeline over our loaded parts, with diffusers' Euler scheduler at the model's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), **kwargs)


def randomised_lora(transformer, seed=1):
    params = inject_lora(transformer, rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return params


def transformer_out(transformer, channels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, 3, 8, 8, generator=g)  # (B, C, F_lat, h, w)
    text = torch.randn(1, 512, 32, generator=g)
    with torch.no_grad():
        return transformer(x, torch.tensor([300.0]), encoder_hidden_states=text).sample


@pytest.fixture()
def wan22(wan22_folder):
    return load_video_model(str(wan22_folder))


@pytest.fixture()
def a14b(a14b_folder):
    return load_video_model(str(a14b_folder))


def test_a_wan_folder_takes_the_defaults_of_its_generation(tmp_path):
    """Read off the configs alone (no weights): two experts -> A14B, a residual VAE -> TI2V-5B,
    40 blocks -> Wan2.1 14B, else Wan2.1 1.3B."""
    import json

    def folder(name, blocks=30, residual=False, boundary=None):
        root = tmp_path / name
        for sub, config in (("transformer", {"_class_name": "WanTransformer3DModel", "num_layers": blocks}),
                            ("vae", {"_class_name": "AutoencoderKLWan", "is_residual": residual})):
            (root / sub).mkdir(parents=True)
            (root / sub / "config.json").write_text(json.dumps(config))
        if boundary is not None:
            (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": boundary}))
        return str(root)

    cases = {folder("a14b", 40, boundary=0.875): "wan22-a14b", folder("5b", residual=True): "wan22-5b",
             folder("14b", 40): "wan-14b", folder("1.3b"): "wan"}
    for source, entry in cases.items():
        spec = spec_of(source)
        assert (spec.source, spec.frames, spec.num_steps, spec.guidance) == \
            (source, MODELS[entry].frames, MODELS[entry].num_steps, MODELS[entry].guidance), entry


#### TI2V-5B: the residual VAE and per-token timesteps

def test_a_ti2v_5b_folder_loads_with_its_defaults(wan22, wan22_folder):
    assert wan22.spec == spec_of(str(wan22_folder)) and wan22.spec.frames == MODELS["wan22-5b"].frames == 121
    assert (wan22.spec.height, wan22.spec.width, wan22.schedule.shift) == (704, 1280, 5.0)
    # 2x2 pixel patches, then two spatial downsamplings: 8 pixels a latent cell, 16 a token; 4 frames a latent frame.
    assert (wan22.vae_factor, wan22.size_multiple, wan22.temporal_factor, wan22.latent_channels) == (8, 16, 4, 8)
    assert wan22.denoiser is wan22.unet


def test_ti2v_5b_matches_wan_pipeline_with_per_token_timesteps(wan22):
    """One timestep per video gives the video diffusers' expand_timesteps (one per token) gives."""
    z_T = torch.randn(1, 8, 3, 4, 4, generator=torch.Generator().manual_seed(3))  # (B, C, F_lat, h, w): 9 x 32 x 32
    cond, uncond = encode_prompts(wan22, ["a cat", ""]).split(1)
    z0 = run_sampler(wan22.unet, z_T, cond, uncond, wan22.schedule, 4, guidance=5.0)
    ours = wan22.decode_frames(z0, torch.arange(9))  # (1, 9, 3, 32, 32)
    pipe = pipeline(wan22, 5.0, transformer=wan22.unet, expand_timesteps=True)
    theirs = pipe("a cat", height=32, width=32, num_frames=9, num_inference_steps=4, guidance_scale=5.0,
                  latents=z_T.clone(), output_type="pt").frames  # (1, 9, 3, 32, 32)
    assert ours.shape == theirs.shape == (1, 9, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_the_residual_vae_decodes_a_prefix_exactly(wan22):
    z0 = torch.randn(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # 3 latent frames: 9 pixel frames
    full = wan22.decode_frames(z0, torch.arange(9))  # (2, 9, 3, 32, 32)
    assert [wan22.prefix_frames(121, f) for f in (1, 2, 5, 6)] == [1, 5, 5, 9]
    for m, idx in ((1, [0]), (2, [0, 3, 4]), (2, [2])):
        part = wan22.decode_frames(z0[:, :, :m], torch.tensor(idx))  # (2, f, 3, 32, 32)
        torch.testing.assert_close(part, full[:, idx], rtol=0, atol=1e-6)
    alone = wan22.decode_frames(z0[:, :, 1:2], torch.tensor([0]))  # latent frame 1 decoded as if it were first
    assert (alone - full[:, [1]]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-wan22"])
def test_checkpointing_each_causal_unit_changes_no_frame_and_no_gradient(name):
    """The decoder's resnets and resamplers as checkpoints of their own (wan_vae.checkpoint_with_cache):
    the same frames and latent gradients, bit for bit, as the decode without them, through 3 latent
    frames of feature cache; each unit runs again in backward; the cache is empty afterwards."""
    from wan_vae import CAUSAL_UNITS

    model = load_video_model(name)
    units = [m for m in model.vae.decoder.modules() if type(m).__name__ in CAUSAL_UNITS]
    calls = []
    resnet = [u for u in units if hasattr(u, "norm1")][-1]
    resnet.norm1.register_forward_pre_hook(lambda m, args: calls.append(1))  # inside the unit's own forward
    z = torch.randn(2, model.latent_channels, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # (B, C, 3, h, w)

    def decode():
        z_ = z.clone().requires_grad_(True)
        x = model.decode_frames(z_, torch.tensor([0, 3, 6, 8]))  # (2, 4, 3, H, W)
        (x * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        return x.detach(), z_.grad

    frames, grad = decode()
    per_decode = len(calls)
    for unit in units:
        unit.__dict__.pop("forward")  # back to diffusers' own forwards
    calls.clear()
    plain_frames, plain_grad = decode()
    assert per_decode > len(calls)  # recomputed unit by unit in backward
    assert torch.equal(frames, plain_frames) and torch.equal(grad, plain_grad) and grad.abs().max() > 0
    assert not [f for f in model.vae._feat_map if torch.is_tensor(f)]


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-wan22"])
def test_a_checkpoint_per_latent_frame_decodes_exactly(name):
    """--low-memory's causal decode, one checkpoint a latent frame carrying the feature cache
    (wan_vae.decode_by_latent_frame): the frames of the one-checkpoint decode bit for bit, and its latent
    gradients to float32 rounding (the reentrant checkpoints add the cache's gradients in another
    order), for a video of 3 latent frames; and the decoder recomputes one latent frame at a time."""
    model = load_video_model(name)
    z = torch.randn(1, model.latent_channels, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # (1, C, 3, h, w)
    calls = []
    model.vae.decoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[2]))

    def decode(per_latent_frame):
        z_ = z.clone().requires_grad_(True)
        x = model.decode_frames(z_, torch.tensor([0, 4, 7]), one_at_a_time=per_latent_frame)  # (1, 3, 3, H, W)
        (x * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        return x.detach(), z_.grad

    whole, whole_grad = decode(False)
    calls.clear()
    chunked, chunked_grad = decode(True)
    assert torch.equal(chunked, whole) and whole_grad.abs().max() > 0
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-5, atol=1e-6)
    assert calls == [1] * 6  # 3 latent frames decoded, then each recomputed once in backward
    assert not [f for f in model.vae._feat_map if torch.is_tensor(f)]


def test_wan_pipeline_loads_a_ti2v_5b_lora(wan22, wan22_folder, tmp_path):
    from diffusers import WanTransformer3DModel

    randomised_lora(wan22.unet)
    save_lora(wan22.unet, tmp_path / "lora.safetensors", prefix=wan22.lora_prefix)
    fresh = load_video_model(str(wan22_folder))
    pipe = pipeline(fresh, 5.0, transformer=fresh.unet, expand_timesteps=True)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    merged = transformer_out(merge_lora(wan22.unet), 8)
    base = transformer_out(WanTransformer3DModel.from_pretrained(wan22_folder / "transformer"), 8)
    assert (merged - base).abs().max() > 1e-4
    torch.testing.assert_close(transformer_out(pipe.transformer, 8), merged, rtol=1e-4, atol=1e-5)


#### A14B: two experts, one of them trained

def test_an_a14b_folder_loads_both_experts(a14b, a14b_folder):
    assert a14b.spec == spec_of(str(a14b_folder)) and a14b.spec.guidance_high == 4.0 and a14b.spec.guidance == 3.0
    assert a14b.denoiser.boundary == 875.0 and a14b.schedule.shift == 12.0
    assert a14b.denoiser.high is not a14b.unet and a14b.denoiser.low is a14b.unet
    assert not any(p.requires_grad for p in a14b.high_expert.parameters())
    # The official 40 steps at shift 12: the last 15 are the low-noise expert's.
    assert 40 - a14b.denoiser.steps(a14b.schedule, 40) == 15


def test_an_a14b_folder_without_its_model_index_is_refused(a14b_folder, tmp_path):
    import shutil
    from dataclasses import replace

    from infra.cli import UserError
    from models import _load

    shutil.copytree(a14b_folder, tmp_path / "a14b")
    (tmp_path / "a14b" / "model_index.json").unlink()  # which transformer is which is no longer known
    with pytest.raises(UserError, match="no model_index.json naming a transformer_2 and a boundary_ratio"):
        _load(str(tmp_path / "a14b"), replace(MODELS["wan22-a14b"], source=str(tmp_path / "a14b")), "cpu",
              torch.float32)


def count_experts(model):
    """Record which expert each denoiser call ran, "high" or "low", and its timestep (a (B,) tensor by then)."""
    calls = []
    for name, expert in (("high", model.high_expert), ("low", model.unet)):
        expert.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, float(args[1][0]))))
    return calls


def test_each_step_runs_the_expert_that_owns_its_timestep(a14b):
    calls = count_experts(a14b)
    cond, uncond = encode_prompts(a14b, ["a cat", ""]).split(1)
    z_T = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run_sampler(a14b.denoiser, z_T, cond, uncond, a14b.schedule, 10, guidance=3.0)
    steps = [t for t, _ in a14b.schedule.steps(10)]
    assert [t for _, t in calls] == pytest.approx(steps)  # one batched guidance call a step without gradients
    assert [name for name, _ in calls] == ["high" if t >= 875 else "low" for t in steps]
    assert 0 < sum(name == "high" for name, _ in calls) < 10


def test_a14b_matches_wan_pipeline_with_two_experts(a14b):
    z_T = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3))  # (B, C, F_lat, h, w)
    cond, uncond = encode_prompts(a14b, ["a cat", ""]).split(1)
    ours = generate(a14b, cond, uncond, 9, 32, 32, 6, 3.0, seed=5)  # guidance 4 (high), 3 (low)
    pipe = pipeline(a14b, 12.0, transformer=a14b.high_expert, transformer_2=a14b.unet, boundary_ratio=0.875)
    z_T = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(5))  # generate's noise for seed 5
    theirs = pipe("a cat", height=32, width=32, num_frames=9, num_inference_steps=6, guidance_scale=4.0,
                  guidance_scale_2=3.0, latents=z_T, output_type="pt").frames
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    swapped = pipe("a cat", height=32, width=32, num_frames=9, num_inference_steps=6, guidance_scale=3.0,
                   guidance_scale_2=4.0, latents=z_T, output_type="pt").frames
    assert (ours - swapped).abs().max() > 1e-4  # the test tells the two guidances apart


def test_gradients_reach_only_the_low_noise_expert(a14b):
    params = randomised_lora(a14b.unet)
    cond, uncond = encode_prompts(a14b, ["a cat", ""]).split(1)
    z_T = torch.randn(1, 4, 3, 8, 8)
    z0 = run_sampler(a14b.denoiser, z_T, cond, uncond, a14b.schedule, 10, 3.0, grad_steps=3)
    a14b.decode_frames(z0, torch.tensor([0, 4])).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert not lora_layers(a14b.high_expert)
    low = 10 - a14b.denoiser.steps(a14b.schedule, 10)
    with pytest.raises(ValueError, match="reaches into the high-noise expert"):
        run_sampler(a14b.denoiser, z_T, cond, uncond, a14b.schedule, 10, 3.0, grad_steps=low + 1)


def test_the_gradient_through_both_experts_is_the_derivative_of_the_reward(a14b):
    """With K covering every low-noise step, backprop's directional derivative of the reward in the
    LoRA equals a central finite difference of the whole sampled-and-decoded video's reward."""
    params = randomised_lora(a14b.unet)
    cond, uncond = encode_prompts(a14b, ["a cat", ""]).split(1)
    z_T = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(2))  # 5 frames
    low = 6 - a14b.denoiser.steps(a14b.schedule, 6)

    def reward(grad_steps):
        z0 = run_sampler(a14b.denoiser, z_T, cond, uncond, a14b.schedule, 6, 3.0, grad_steps=grad_steps)
        return a14b.decode_frames(z0, torch.tensor([0, 3])).mean()  # the brightness reward of 2 frames

    reward(low).backward()
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    eps = 1e-2  # float32: a smaller step drowns the difference in rounding
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        up = reward(0).item()
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        down = reward(0).item()
    assert abs(analytic) > 1e-4
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-2)


def test_wan_pipeline_loads_the_lora_into_the_low_noise_expert(a14b, a14b_folder, tmp_path):
    from diffusers import WanTransformer3DModel

    randomised_lora(a14b.unet)
    save_lora(a14b.unet, tmp_path / "lora.safetensors", prefix=a14b.lora_prefix)
    fresh = load_video_model(str(a14b_folder))
    pipe = pipeline(fresh, 12.0, transformer=fresh.high_expert, transformer_2=fresh.unet, boundary_ratio=0.875)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"), load_into_transformer_2=True)
    merged = transformer_out(merge_lora(a14b.unet), 4)
    torch.testing.assert_close(transformer_out(pipe.transformer_2, 4), merged, rtol=1e-4, atol=1e-5)
    high = WanTransformer3DModel.from_pretrained(a14b_folder / "transformer")
    torch.testing.assert_close(transformer_out(pipe.transformer, 4), transformer_out(high, 4))  # untouched


class Placed(torch.nn.Module):
    """A module that records where it is sent (no GPU here to send it to), with one weight in CPU memory."""

    def __init__(self, where):
        super().__init__()
        self.where, self.weight = where, torch.nn.Parameter(torch.zeros(1))

    def to(self, device):
        self.where = device
        return self


def test_one_expert_at_a_time_on_the_gpu_and_no_denoiser_while_a_whole_video_decodes(monkeypatch):
    from infra.offload import denoiser_in_cpu_memory
    from wan import WanModel

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, 80 * 2**30))  # a card with no room to spare
    low, high = Placed("cuda"), Placed("cpu")
    model = WanModel(low, Placed("cuda"), Placed("cpu"), None, WanFlowSchedule(shift=12.0), MODELS["wan22-a14b"],
                     "cuda", high_expert=high, boundary_ratio=0.875)
    assert model.denoiser.boundary == 875.0 and model.denoiser.guidance == 4.0
    with model.high_expert_on_device():
        assert (high.where, low.where) == ("cuda", "cpu")
    assert (high.where, low.where) == ("cpu", "cuda")
    with denoiser_in_cpu_memory(model):
        assert low.where == "cpu"
    assert low.where == "cuda"
    with denoiser_in_cpu_memory(model, enabled=False):
        assert low.where == "cuda"


def test_a_card_with_room_for_both_experts_keeps_the_high_noise_one(monkeypatch):
    from wan import WanModel

    low, high = Placed("cuda"), Placed("cpu")  # Placed's weight stays in CPU memory: each visit asks again
    model = WanModel(low, Placed("cuda"), Placed("cpu"), None, WanFlowSchedule(shift=12.0), MODELS["wan22-a14b"],
                     "cuda", high_expert=high, boundary_ratio=0.875)
    size = sum(p.nbytes for p in high.parameters())
    for free, low_during in ((2 * size, "cuda"), (2 * size - 1, "cpu")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 10 * size))
        high.where = "cpu"
        with model.high_expert_on_device():
            assert (high.where, low.where) == ("cuda", low_during)
        assert low.where == "cuda"


#### Real sizes, on the meta device

def test_real_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    transformer, vae, text = build_architecture("wan22-5b")
    assert count(transformer) == 4_999_787_712 and count(text) == 5_680_910_336
    assert vae.config.z_dim == 48 and vae.config.scale_factor_spatial == 16
    assert count(vae) == 704_688_668 and count(vae.decoder) + count(vae.post_quant_conv) == 555_051_580
    high, low, _, _ = build_architecture("wan22-a14b")
    assert count(high) == count(low) == count(build_architecture("wan-14b")[0]) == 14_288_491_584
    lora = inject_lora(low, rank=16, targets=MODELS["wan22-a14b"].lora_targets)
    assert len(lora_layers(low)) == 320 and not lora_layers(high)
    assert sum(p.numel() for p in lora) == 320 * 16 * (5120 + 5120)  # 52.4 M, on the low-noise expert alone


#### The scripts

def test_train_raises_the_ti2v_5b_reward(tmp_path):
    run_cli(train.main, ["--model", "tiny-wan22", *FAST, "--max-steps", "2", "--eval-every", "2",
                         "--output-dir", str(tmp_path)])
    with open(tmp_path / "metrics.csv") as f:
        held_out = [float(r["eval_reward"]) for r in csv.DictReader(f) if r["eval_reward"]]
    assert len(held_out) == 2 and held_out[1] > held_out[0]  # steps 0 and 2, fixed seeds
    assert all(k.startswith("transformer.blocks.") for k in load_file(tmp_path / "lora.safetensors"))
    assert (tmp_path / "videos" / "after.gif").stat().st_size > 0


def test_train_a14b_resumes_exactly(tmp_path, capsys):
    """Two experts through the script: the LoRA file holds the low-noise expert's keys under
    `transformer.` (diffusers' `load_into_transformer_2=True` reads them), and a resumed run ends
    bit for bit where an uncut one does. (The tiny A14B's reward barely depends on its LoRA, ~2e-3
    along a unit direction, so its gradient is checked against finite differences above instead.)"""
    straight, split = tmp_path / "straight", tmp_path / "split"
    tiny = ["--model", "tiny-wan22-a14b", *FAST, "--eval-every", "0"]
    run_cli(train.main, [*tiny, "--max-steps", "2", "--output-dir", str(straight)])
    assert "load_into_transformer_2=True" in capsys.readouterr().out  # how diffusers reads it, said at the end
    run_cli(train.main, [*tiny, "--max-steps", "1", "--output-dir", str(split)])
    run_cli(train.main, ["--resume", str(split), "--max-steps", "2"])
    resumed, reference = load_file(split / "lora.safetensors"), load_file(straight / "lora.safetensors")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert all(k.startswith("transformer.blocks.") for k in reference) and len(reference) == 2 * 2 * 2 * 4


def test_a_k_above_the_boundary_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, ["--model", "tiny-wan22-a14b", *FAST, "--num-steps", "10", "--grad-steps", "9",
                             "--max-steps", "1", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0
    assert "--grad-steps 9 reaches into the high-noise expert's steps" in err and "or less" in err
