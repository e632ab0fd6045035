"""GRPO, the gradient-free rival of today: group-relative policy gradients on the same sampler.

GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300, Section 4.1) drops PPO's value network: for
a prompt c it samples a *group* of G outputs together, and each output's advantage is its reward
measured against its own group,

    A_i = (r_i - mean(r_1, ..., r_G)) / std(r_1, ..., r_G)        (outcome supervision, Sec. 4.1.2)

DanceGRPO (Xue et al. 2505.07818) and Flow-GRPO (Liu et al. 2505.05470) carry it to image and
video diffusion, where the policy is the stochastic sampler: each denoising step is a Gaussian
transition whose log-probability is known. Here the policy is DDPO's η-DDIM (baselines/ddpo.py:
the same rollout through sampler.sample, the same log-probabilities, PPO's clipped ratio), and
only two things change against DDPO:
- the advantage: the group replaces DDPO's running per-prompt statistics (`group_advantages`).
  A group whose rewards are all equal teaches nothing, and gets A = 0;
- the timesteps trained: all N, or a window of them (`window`), as MixGRPO (Li et al.
  2507.21802) and Flow-GRPO-Fast train only a few steps of the chain to save compute.
There is no KL penalty to the frozen model: it costs a second forward per transition, and
nothing in this setting has shown it helps. `share_noise` starts a group's samples from one
z_T, as DanceGRPO's shared initial noise does, so the group differs only by the policy's own
per-step noise.

Symbols in the code: `group_size` is G; `advantages` is A; `clip_range` is PPO's ε.
"""
from dataclasses import dataclass

import torch

from baselines.ddpo import clip_fraction, ppo_updates, rollout
from vader import initial_noise


@dataclass
class GRPOConfig:
    """GRPO's settings. The learning rate is not here: bench.py passes the optimizer in."""

    group_size: int = 4  # G, samples of one prompt scored together (the papers use larger groups; 4 suits a CPU)
    groups_per_epoch: int = 2  # prompts per epoch: G * groups videos sampled and scored
    updates_per_epoch: int = 2  # optimizer steps per epoch, each on a disjoint share of the samples
    inner_epochs: int = 1  # passes over one epoch's samples
    clip_range: float = 1e-4  # PPO's ε on log-probabilities averaged over latent entries, as DDPO's
    eta: float = 1.0  # η of the DDIM policy; > 0, or the transitions have no density
    window: tuple = None  # (first step, number of steps) trained; None: all N (GRPO, DDPO)
    share_noise: bool = False  # one z_T per group (DanceGRPO) instead of one per sample
    grad_clip: float = 1.0  # global norm clip of the LoRA gradients

    @property
    def samples_per_epoch(self):
        return self.group_size * self.groups_per_epoch


def group_advantages(rewards, group_size, eps=1e-6):
    """A_i = (r_i - mean of its group) / std of its group; rewards (B,) in consecutive groups of G -> (B,).

    The population std (GRPO's), plus `eps` so that an all-equal group, whose numerators are all
    zero, gives A = 0 instead of 0 / 0.
    """
    r = rewards.view(-1, group_size)  # (groups, G)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.flatten()  # (B,)


def trained_steps(window, num_steps):
    """The indices of the timesteps GRPO trains: range(first, first + n) of the N, or all of them."""
    if window is None:
        return range(num_steps)
    first, n = window
    if not (0 <= first and n >= 1 and first + n <= num_steps):
        raise ValueError(f"the timestep window {window} does not fit {num_steps} steps")
    return range(first, first + n)


def grpo_epoch(model, reward_fn, params, optimizer, prompts, cond, uncond, gen, cfg, generator):
    """One GRPO epoch: `cfg.groups_per_epoch` prompts, G videos each, one reward query a video, PPO steps.

    cond: (P, L, D) embeddings of `prompts`; uncond: (1, L, D); `gen` as for `ddpo.ddpo_epoch`.
    Returns (rewards (B,), info) with info["clip_fraction"] and info["steps"], the trained timesteps.
    """
    device, G = cond.device, cfg.group_size
    idx = torch.randint(len(prompts), (cfg.groups_per_epoch,), generator=generator).repeat_interleave(G)
    batch_prompts, batch_cond = [prompts[i] for i in idx], cond[idx.to(device)]  # B strings, (B, L, D)
    starts = cfg.groups_per_epoch if cfg.share_noise else len(idx)
    z_T = initial_noise(model, starts, gen.frames, gen.height, gen.width, generator, device)  # (starts, C, F, h, w)
    if cfg.share_noise:
        z_T = z_T.repeat_interleave(G, dim=0)  # (B, C, F, h, w): one start per group
    xs, old_logp, rewards = rollout(model, reward_fn, batch_prompts, batch_cond, uncond, z_T, gen, cfg.eta, generator)
    advantages = group_advantages(rewards, G).to(device)  # (B,)
    steps = trained_steps(cfg.window, gen.num_steps)
    ratios = ppo_updates(model, params, optimizer, xs, old_logp, batch_cond, uncond, advantages, steps, gen, cfg,
                         generator)
    return rewards, dict(clip_fraction=clip_fraction(ratios, cfg.clip_range), steps=list(steps))
