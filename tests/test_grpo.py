"""GRPO: group-relative advantages, its policy gradient against one written by hand, the timestep window."""
from types import SimpleNamespace

import pytest
import torch

from baselines.ddpo import ppo_loss
from baselines.grpo import GRPOConfig, group_advantages, grpo_epoch, trained_steps
from lora import inject_lora
from rewards import load_reward
from vader import encode_prompts

GEN = SimpleNamespace(frames=2, height=32, width=32, num_steps=3, guidance=1.0, decode_frames=1)


def test_advantages_are_standardised_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5, -1.0, 4.0, 2.0, 7.0])  # 3 groups of 4
    adv = group_advantages(rewards, 4).view(3, 4)
    for g in (0, 2):
        assert adv[g].mean().abs() < 1e-6 and adv[g].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # all equal: nothing to learn, and no 0 / 0
    assert adv[0].argsort().tolist() == [0, 1, 2, 3]  # the order of the rewards is kept
    # Only the group counts: shifting one group's rewards leaves every advantage as it was.
    torch.testing.assert_close(group_advantages(rewards + torch.tensor([10.0] * 4 + [0.0] * 8), 4).view(3, 4), adv)


def test_the_loss_gradient_is_the_group_relative_policy_gradient():
    """A one-parameter Gaussian policy x ~ N(θ, σ²) and a reward r(x): at θ = θ_old the gradient of
    the clipped objective is -mean_i A_i ∇θ log π(x_i) = -mean_i A_i (x_i - θ) / σ² (the ratio is 1)."""
    theta, sigma = torch.tensor(0.3, requires_grad=True), 0.5
    x = 0.3 + sigma * torch.randn(8, generator=torch.Generator().manual_seed(0))  # 2 groups of G = 4
    rewards = -(x - 1.0) ** 2  # prefers x near 1
    adv = group_advantages(rewards, 4)
    logp = -((x - theta) ** 2) / (2 * sigma**2)  # log π up to a constant
    loss, ratio = ppo_loss(logp, logp.detach(), adv, clip_range=1e-4)
    loss.backward()
    by_hand = -(adv * (x - 0.3) / sigma**2).mean()
    assert torch.allclose(ratio, torch.ones(8)) and theta.grad.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert theta.grad.item() < 0  # descending the loss moves θ towards the rewarded x


def test_the_window_trains_only_the_steps_it_names(tiny_model):
    cfg = GRPOConfig(group_size=2, groups_per_epoch=1, updates_per_epoch=1, window=(1, 1))
    params = inject_lora(tiny_model.unet, rank=2)
    seen = []  # the timestep of every UNet call made while autograd records
    tiny_model.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(int(args[1])) if torch.is_grad_enabled() else None, with_kwargs=True)
    cond, uncond = encode_prompts(tiny_model, ["a cat", ""]).split(1)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    rewards, info = grpo_epoch(tiny_model, load_reward("brightness"), params, optimizer, ["a cat"], cond, uncond,
                               GEN, cfg, torch.Generator().manual_seed(0))
    timesteps = [t for t, _ in tiny_model.schedule.steps(GEN.num_steps)]
    assert info["steps"] == [1] and set(seen) == {timesteps[1]}
    assert rewards.shape == (2,) and any(not torch.equal(p, b) for p, b in zip(params, before))
    assert list(trained_steps(None, 3)) == [0, 1, 2]
    with pytest.raises(ValueError, match="does not fit"):
        trained_steps((2, 2), 3)


def test_shared_noise_starts_a_group_from_one_latent(tiny_model, monkeypatch):
    import baselines.grpo as grpo

    starts = []
    real = grpo.rollout

    def spy(model, reward_fn, prompts, cond, uncond, z_T, *rest):
        starts.append(z_T)
        return real(model, reward_fn, prompts, cond, uncond, z_T, *rest)

    monkeypatch.setattr(grpo, "rollout", spy)
    params = inject_lora(tiny_model.unet, rank=2)
    cond, uncond = encode_prompts(tiny_model, ["a cat", "a dog", ""]).split([2, 1])
    for share in (True, False):
        cfg = GRPOConfig(group_size=2, groups_per_epoch=2, updates_per_epoch=1, share_noise=share, window=(2, 1))
        grpo_epoch(tiny_model, load_reward("brightness"), params, torch.optim.AdamW(params), ["a cat", "a dog"],
                   cond, uncond, GEN, cfg, torch.Generator().manual_seed(0))
    shared, own = starts
    assert torch.equal(shared[0], shared[1]) and not torch.equal(shared[1], shared[2])
    assert not torch.equal(own[0], own[1])
