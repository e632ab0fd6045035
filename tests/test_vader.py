"""Frame-subsampled decoding, model loading, prompts, and the VADER loss on the tiny model."""
import pytest
import torch

from infra.cli import UserError
from rewards import load_reward
from infra.files import read_prompts
from models import load_video_model
from vader import choose_frames


def test_decodes_only_the_chosen_frames_and_grads_reach_only_them(tiny_model):
    calls = []
    decode = tiny_model.vae.decode
    tiny_model.vae.decode = lambda z: calls.append(z.shape) or decode(z)
    z0 = torch.randn(2, 4, 6, 8, 8, requires_grad=True)  # (B, C, F, h, w)
    idx = torch.tensor([1, 4])
    frames = tiny_model.decode_frames(z0, idx)  # (B, f, 3, H, W)
    assert frames.shape == (2, 2, 3, 16, 16)
    assert calls == [(4, 4, 8, 8)]  # one call, B * f = 4 latents, not B * F = 12
    # Each decoded frame equals decoding that frame on its own.
    alone = tiny_model.decode_frames(z0[:, :, 4:5].detach(), torch.tensor([0]))
    torch.testing.assert_close(frames[:, 1:2].detach(), alone, rtol=1e-4, atol=1e-5)

    load_reward("brightness")(frames, ["a", "b"]).sum().backward()
    per_frame = z0.grad.abs().sum(dim=(0, 1, 3, 4))  # (F,)
    assert (per_frame[idx] > 0).all()
    assert per_frame[[0, 2, 3, 5]].eq(0).all()
    assert torch.isfinite(z0.grad).all()


def test_choose_frames_random_and_sorted():
    g = torch.Generator().manual_seed(0)
    picks = {tuple(choose_frames(16, 3, g).tolist()) for _ in range(20)}
    assert len(picks) > 1 and all(list(p) == sorted(set(p)) and len(p) == 3 for p in picks)


def test_tiny_model_is_the_same_every_time(tiny_model):
    again = load_video_model("tiny")
    for a, b in zip(tiny_model.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert again.spec.height == 32 and again.vae_factor == 2


def test_local_folder_takes_its_size_from_the_configs(tiny_model):
    assert (tiny_model.spec.height, tiny_model.spec.width) == (32, 32)
    assert tiny_model.schedule.steps_offset == 1 and tiny_model.schedule.beta_schedule == "scaled_linear"


def test_bad_model_names_and_folders(tmp_path):
    with pytest.raises(UserError, match="unknown model 'nope'; known models: tiny"):
        load_video_model("nope")
    with pytest.raises(UserError, match="could not load the video model"):
        load_video_model(str(tmp_path))  # an empty folder


def test_read_prompts(tmp_path):
    assert len(read_prompts("animals.txt")) == 50
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\na cat\n a dog\n")
    assert read_prompts(str(f)) == ["a cat", "a dog"]
    f.write_text("# nothing\n\n")
    with pytest.raises(UserError, match="has no prompts"):
        read_prompts(str(f))
    with pytest.raises(UserError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))
