"""Wan2.1: the tiny Wan against diffusers' own WanPipeline, the causal VAE, the LoRA's way out, real sizes, scripts.

The tiny Wan is written in the hub folder's layout and loaded as a local folder, the code path
`Wan-AI/Wan2.1-T2V-1.3B-Diffusers` takes.
"""
import csv
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import sample
import train
from benchmarks.architectures import build_architecture
from infra.cli import run_cli
from lora import inject_lora, lora_layers, merge_lora, save_lora
from models import MODELS, VideoModel, load_video_model
from rewards import load_reward
from sampler import sample as run_sampler
from infra.setup import batch_drawer
from train import train_step
from vader import decode_f_frames, encode_prompts, initial_noise, loss_scaler
from wan import WanFlowSchedule, WanModel

FAST = ["--model", "tiny-wan", "--reward", "brightness", "--prompts", "animals.txt", "--num-steps", "3",
        "--frames", "5", "--decode-frames", "5", "--num-videos", "1", "--eval-videos", "2",
        "--eval-prompts", "animals_heldout.txt"]


@pytest.fixture()
def wan(wan_folder):
    return load_video_model(str(wan_folder))


def pipeline(model, scheduler=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, transformer=model.unet,
                       vae=model.vae, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0))


def transformer_out(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)  # (B, C, F_lat, h, w)
    text = torch.randn(1, 512, 32, generator=g)
    with torch.no_grad():
        return transformer(x, torch.tensor([700.0]), encoder_hidden_states=text).sample


def randomised_lora(model, rank=4, alpha=8):
    params = inject_lora(model.unet, rank=rank, alpha=alpha, targets=model.spec.lora_targets)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return params


#### Loading, and parity with WanPipeline

def test_a_folder_in_wan_layout_loads_as_wan(wan, wan_folder):
    assert wan.spec.family == "wan" and wan.spec.source == str(wan_folder)
    assert (wan.spec.height, wan.spec.width, wan.spec.frames) == (480, 832, 33)  # the registry's defaults
    assert isinstance(wan.schedule, WanFlowSchedule) and wan.schedule.shift == 3.0  # read from UniPC's flow_shift
    assert wan.unet.gradient_checkpointing and wan.lora_prefix == "transformer."
    assert (wan.vae_factor, wan.size_multiple, wan.temporal_factor, wan.latent_frames(9)) == (4, 8, 4, 3)


def test_prompts_are_encoded_as_wan_pipeline_encodes_them(wan):
    prompts = ["a cat", "a dog running on a beach at sunset"]
    ours = encode_prompts(wan, prompts)  # (2, 512, 32)
    theirs, _ = pipeline(wan).encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    assert ours.shape == (2, 512, 32)
    torch.testing.assert_close(ours, theirs)
    assert ours[0, 10:].abs().max() == 0  # the padding's embeddings are zeroed


def test_sampling_and_decoding_match_wan_pipeline(wan):
    """Our flow sampler, guidance and causal decode against WanPipeline with diffusers' Euler scheduler."""
    z_T = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3))  # (B, C, F_lat, h, w)
    cond, uncond = encode_prompts(wan, ["a cat", ""]).split(1)
    z0 = run_sampler(wan.unet, z_T, cond, uncond, wan.schedule, 4, guidance=5.0)
    ours = wan.decode_frames(z0, torch.arange(9))  # (1, 9, 3, 32, 32)
    theirs = pipeline(wan)("a cat", height=32, width=32, num_frames=9, num_inference_steps=4, guidance_scale=5.0,
                           latents=z_T.clone(), output_type="pt").frames  # (1, 9, 3, 32, 32)
    assert ours.shape == theirs.shape == (1, 9, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


#### The causal VAE

def test_prefix_frames_is_the_shortest_prefix_holding_f_frames(wan):
    assert [wan.prefix_frames(33, f) for f in (1, 2, 5, 6, 33)] == [1, 5, 5, 9, 33]
    assert VideoModel.prefix_frames(16, 3) == 16  # SD's VAE: any frame


def test_decoding_a_prefix_gives_the_full_decode_s_frames(wan):
    z0 = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # 3 latent frames: 9 pixel frames
    full = wan.decode_frames(z0, torch.arange(9))  # (2, 9, 3, 32, 32)
    for m, idx in ((1, [0]), (2, [0, 3, 4]), (2, [2])):
        part = wan.decode_frames(z0[:, :, :m], torch.tensor(idx))  # (2, f, 3, 32, 32)
        assert part.shape == (2, len(idx), 3, 32, 32)
        torch.testing.assert_close(part, full[:, idx], rtol=0, atol=1e-6)
    # Decoding latent frame 1 alone (as if it were first) is not the same video: why a prefix is needed.
    alone = wan.decode_frames(z0[:, :, 1:2], torch.tensor([0]))
    assert (alone - full[:, [1]]).abs().max() > 1e-2


def test_the_vae_cache_holds_nothing_after_backward(wan):
    """The trap: a checkpoint's early stop skips the decode's last clear_cache(), and the causal
    cache then pins the recomputed decoder activations through the rest of backward."""
    z0 = torch.randn(1, 4, 2, 8, 8, requires_grad=True)

    def cached_after_backward():
        wan.decode_frames(z0, torch.tensor([0, 3])).mean().backward()
        return [f for f in wan.vae._feat_map if torch.is_tensor(f)]

    assert cached_after_backward() == [] and z0.grad.abs().sum() > 0
    with torch.utils.checkpoint.set_checkpoint_early_stop(True):  # overrides our early_stop=False
        assert len(cached_after_backward()) > 0


class Placed(torch.nn.Module):
    """A module that only records where it is sent (no GPU here to send it to)."""

    def __init__(self, where):
        super().__init__()
        self.where = where

    def to(self, device):
        self.where = device
        return self


def test_the_text_encoder_visits_the_device_alone():
    model = WanModel(Placed("cuda"), Placed("cuda"), Placed("cpu"), None, WanFlowSchedule(), MODELS["wan"], "cuda")
    places = lambda: (model.text_encoder.where, model.unet.where, model.vae.where)  # noqa: E731
    with model.text_encoder_on_device():
        assert places() == ("cuda", "cpu", "cpu")
    assert places() == ("cpu", "cuda", "cuda")


def test_a_transformer_waiting_in_cpu_memory_to_be_sharded_stays_there():
    unet = Placed("cpu")
    unet.weight = torch.nn.Parameter(torch.zeros(1))  # in CPU memory, as train.py loads it under --shard
    model = WanModel(unet, Placed("cuda"), Placed("cpu"), None, WanFlowSchedule(), MODELS["wan"], "cuda")
    with model.text_encoder_on_device():
        assert (model.text_encoder.where, unet.where, model.vae.where) == ("cuda", "cpu", "cpu")
    assert (model.text_encoder.where, unet.where, model.vae.where) == ("cpu", "cpu", "cuda")


#### Gradients, and the LoRA outside the project

def test_gradients_reach_the_lora_through_flow_steps_and_the_decoder(wan):
    inject_lora(wan.unet, rank=4)
    layers = lora_layers(wan.unet)
    assert len(layers) == 2 * 2 * 4  # 2 blocks x (attn1, attn2) x (q, k, v, out)
    cfg = SimpleNamespace(frames=9, height=32, width=32, num_steps=3, guidance=5.0, decode_frames=2, grad_accum=1,
                          grad_clip=1e9, low_memory=False, batch_size=1)
    cond, uncond = encode_prompts(wan, ["a cat", ""]).split(1)
    first = layers["blocks.0.attn1.to_q"]
    first.lora_B.weight.data.normal_(std=0.01)  # with B = 0, A gets no gradient (B is zero-initialised)
    params = [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    g = torch.Generator()
    train_step(wan, load_reward("brightness"), params, torch.optim.SGD(params, lr=0.0),
               loss_scaler(torch.float32, "cpu"), batch_drawer(wan, cfg, ["a cat"], cond, g), uncond, cfg, g, 1)
    z0 = torch.randn(1, 4, 3, 8, 8)  # 3 latent frames: 9 pixel frames
    assert decode_f_frames(wan, z0, 9, 2, torch.Generator()).shape == (1, 2, 3, 32, 32)  # 2 of the first 5
    assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in layers.values())
    assert first.lora_A.weight.grad.abs().sum() > 0


def test_wan_pipeline_loads_our_lora_file(wan, wan_folder, tmp_path):
    """diffusers' WanPipeline.load_lora_weights reads the file as the merged LoRA computes, alpha != r included."""
    randomised_lora(wan, rank=4, alpha=8)
    save_lora(wan.unet, tmp_path / "lora.safetensors", prefix=wan.lora_prefix)
    pipe = pipeline(load_video_model(str(wan_folder)))
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    merged = transformer_out(merge_lora(wan.unet))
    assert (merged - transformer_out(pipe.transformer.__class__.from_pretrained(wan_folder / "transformer"))).abs().max() > 1e-4
    torch.testing.assert_close(transformer_out(pipe.transformer), merged, rtol=1e-4, atol=1e-5)


def test_export_merged_writes_a_wan_transformer(wan, wan_folder, tmp_path):
    from diffusers import WanTransformer3DModel

    randomised_lora(wan)
    save_lora(wan.unet, tmp_path / "lora.safetensors", prefix=wan.lora_prefix)
    sample.main(["--model", str(wan_folder), "--lora", str(tmp_path / "lora.safetensors"),
                 "--export-merged", str(tmp_path / "merged"), "--device", "cpu"])
    exported = WanTransformer3DModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(transformer_out(exported), transformer_out(merge_lora(wan.unet)), rtol=1e-4, atol=1e-5)


#### Real sizes, on the meta device

def test_real_sizes():
    transformer, vae, text = build_architecture("wan")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(transformer) == 1_418_996_800
    assert count(vae) == 126_892_531 and count(vae.decoder) + count(vae.post_quant_conv) == 73_295_603
    assert count(text) == 5_680_910_336
    lora = inject_lora(transformer, rank=16, targets=MODELS["wan"].lora_targets)
    assert len(lora_layers(transformer)) == 240 and sum(p.numel() for p in lora) == 11_796_480


#### The scripts

def metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_raises_the_reward_resumes_exactly_and_samples(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(train.main, [*FAST, "--max-steps", "3", "--eval-every", "3", "--output-dir", str(straight)])
    run_cli(train.main, [*FAST, "--max-steps", "1", "--eval-every", "3", "--output-dir", str(split)])
    run_cli(train.main, ["--resume", str(split), "--max-steps", "3"])
    resumed, reference = load_file(split / "lora.safetensors"), load_file(straight / "lora.safetensors")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    held_out = [float(r["eval_reward"]) for r in metrics(straight) if r["eval_reward"]]
    assert len(held_out) == 2 and held_out[1] > held_out[0]  # steps 0 and 3, fixed seeds
    for name in ("videos/before.gif", "videos/after.gif", "reward_curve.png"):
        assert (straight / name).stat().st_size > 0

    from safetensors import safe_open

    with safe_open(straight / "lora.safetensors", "pt") as f:
        assert all(k.startswith("transformer.blocks.") for k in f.keys())
    run_cli(sample.main, ["--model", "tiny-wan", "--lora", str(straight / "lora.safetensors"), "--num-prompts", "1",
                          "--frames", "5", "--num-steps", "3", "--output-dir", str(tmp_path / "samples"),
                          "--side-by-side"])
    assert len(list((tmp_path / "samples").glob("*.gif"))) == 1


def test_wan_trains_with_whole_step_checkpointing_unless_told_not_to(wan_folder, tmp_path):
    from benchmarks.speed import low_memory_for

    assert train.parse_config(["--model", "wan"])[0].low_memory is True
    assert train.parse_config(["--model", "wan", "--no-low-memory"])[0].low_memory is False
    assert train.parse_config(["--model", "modelscope"])[0].low_memory is False
    for flags, expected in (([], True), (["--no-low-memory"], False)):  # a folder: its family's recipe, from its configs
        cfg, _ = train.parse_config(["--model", str(wan_folder), "--reward", "brightness", "--frames", "5",
                                     "--height", "32", "--width", "32", "--output-dir", str(tmp_path), *flags])
        assert cfg.low_memory is expected
    assert low_memory_for("wan-480-81", None) is True and low_memory_for("wan-480-81", False) is False
    assert low_memory_for("modelscope-256", None) is False


def test_frames_that_do_not_fit_the_causal_vae_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, [*FAST, "--frames", "8", "--max-steps", "1", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0
    assert "--frames must be 1 + 4k" in err and "try 5 or 9" in err
    assert not (tmp_path / "r").exists()
