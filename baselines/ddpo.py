"""DDPO, the gradient-free baseline VADER is measured against: policy gradients on a sampler.

Black et al., "Training Diffusion Models with Reinforcement Learning" (arXiv 2305.13301) treat
denoising as a T-step Markov decision process. DDIM with η > 0 (Song et al. 2010.02502) draws
each x_{t-1} from a Gaussian, so the sampler *is* a stochastic policy whose log-probabilities
can be written down:

    π_θ(x_{t-1} | x_t, c) = N( μ_θ(x_t, t, c), σ_t² I )        the policy of DDPO's multi-step MDP
    μ_θ  the η-DDIM mean, Eq. (12) of 2010.02502 without its noise term (`ddim_step`, noise 0)
    σ_t  η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1}), Eq. (16) of 2010.02502

The reward r(x_0, c) is only *queried*: no gradient flows out of it. Learning comes from the
likelihood ratio of the transitions that led to high or low rewards (DDPO's importance-sampled
estimator, DDPO_IS) with PPO's clipped surrogate (Schulman et al. 1707.06347, Eq. 7):

    L(θ) = E_t E_samples[ max( -A ρ_t, -A clip(ρ_t, 1 - ε, 1 + ε) ) ],
    ρ_t = π_θ(x_{t-1} | x_t, c) / π_θold(x_{t-1} | x_t, c),    A = normalised reward

Symbols in the code: `xs[:, j]` is x_t at the j-th visited step (j = 0 is z_T); `old_logp`
is log π_θold, recorded while sampling; `advantages` is A; `clip_range` is ε.

This is a baseline, not a second product: it reuses the sampler (sampler.py), the LoRA
parameters (lora.py), the rewards (rewards.py) and the decoding (vader.py) that VADER uses,
so `python bench.py efficiency` compares the two learning signals and nothing else.
"""
import math
from collections import defaultdict, deque
from dataclasses import dataclass

import torch

from sampler import ddim_sigma, ddim_step, guided_output
from vader import choose_frames, initial_noise


@dataclass
class DDPOConfig:
    """DDPO's settings; defaults are ddpo-pytorch's `config/base.py` unless a comment says otherwise.

    The learning rate is not here: bench.py passes the optimizer in, tuned for the toy setting.
    """

    eta: float = 1.0  # η of DDIM, Eq. (16): the policy's stochasticity. 0 would make log π undefined.
    samples_per_epoch: int = 8  # videos sampled and scored per epoch (ddpo-pytorch: 2 per GPU; 8 gives A some signal)
    updates_per_epoch: int = 2  # optimizer steps per epoch, each on a disjoint share of the samples (ddpo-pytorch: 2)
    inner_epochs: int = 1  # passes over one epoch's samples (DDPO: 1)
    clip_range: float = 1e-4  # PPO's ε (DDPO: 1e-4, on log-probabilities averaged over latent entries)
    adv_clip_max: float = 5.0  # advantages are clipped to [-5, 5] (DDPO)
    buffer_size: int = 16  # rewards remembered per prompt for its mean and std (DDPO: 16)
    min_count: int = 16  # below this many, a prompt is normalised with the batch's statistics (DDPO: 16)
    grad_clip: float = 1.0  # global norm clip of the LoRA gradients (DDPO and VADER: 1.0)


#### The policy: DDIM with η > 0 and its log-probabilities

def ddim_logprob(x_prev, x_t, model_output, alpha_bar_t, alpha_bar_prev, eta, prediction_type="epsilon"):
    """log π(x_prev | x_t): the Gaussian log-density of one η-DDIM transition, averaged over entries -> (B,).

    The mean is `ddim_step` with its noise set to zero, so the policy and the sampler can never
    disagree. Averaging over the C·F·h·w latent entries instead of summing is DDPO's convention
    (ddpo-pytorch, ddim_with_logprob.py): it divides log ρ by the number of entries, which is
    the scale its clip range ε = 1e-4 was tuned for.
    """
    mean = ddim_step(x_t, model_output, alpha_bar_t, alpha_bar_prev, eta,
                     torch.zeros_like(x_t), prediction_type)  # (B, C, F, h, w)
    sigma = torch.as_tensor(ddim_sigma(alpha_bar_t, alpha_bar_prev, eta), dtype=x_t.dtype, device=x_t.device)
    # log N(x; μ, σ²) = -(x - μ)² / (2σ²) - log σ - log sqrt(2π), entry by entry.
    logp = -((x_prev - mean) ** 2) / (2 * sigma**2) - sigma.log() - math.log(math.sqrt(2 * math.pi))
    return logp.mean(dim=tuple(range(1, logp.ndim)))  # (B,)


@torch.no_grad()
def sample_with_logprobs(unet, z_T, cond, uncond, schedule, num_steps, guidance, eta, generator=None):
    """Roll out the policy: N η-DDIM steps from z_T, keeping every state and its log-probability.

    z_T: (B, C, F, h, w). Returns xs (B, N+1, C, F, h, w), the chain z_T ... z_0, and
    old_logp (B, N), log π_θold of each transition. No graph: DDPO needs none while sampling.
    The steps are sampler.sample's loop without gradients, the same draws in the same order
    (tests/test_ddpo.py checks that the two end at the same z_0), with every state kept.
    """
    steps = schedule.steps(num_steps)
    if any(ddim_sigma(*coeffs, eta) <= 0 for _, coeffs in steps):
        raise ValueError("DDPO needs σ_t > 0 at every step: eta > 0, and a schedule with set_alpha_to_one False")
    xs, logps = [z_T], []
    for t, coeffs in steps:
        x_t = xs[-1]
        noise = torch.randn(x_t.shape, generator=generator).to(x_t.device, x_t.dtype)
        eps = guided_output(unet, x_t, t, cond, uncond, guidance)  # (B, C, F, h, w): the guided model output
        xs.append(schedule.update(x_t, eps, coeffs, eta, noise))
        logps.append(ddim_logprob(xs[-1], x_t, eps, *coeffs, eta, schedule.prediction_type))
    return torch.stack(xs, dim=1), torch.stack(logps, dim=1)  # (B, N+1, C, F, h, w), (B, N)


def policy_logprob(model, xs, j, cond, uncond, gen, eta):
    """log π_θ of the stored transition xs[:, j] -> xs[:, j+1] under the *current* LoRA weights (B,), with grad."""
    t, coeffs = model.schedule.steps(gen.num_steps)[j]
    eps = guided_output(model.unet, xs[:, j], t, cond, uncond, gen.guidance)  # (B, C, F, h, w)
    return ddim_logprob(xs[:, j + 1], xs[:, j], eps, *coeffs, eta, model.schedule.prediction_type)


#### The learning signal: normalised rewards and PPO's clipped objective

class PromptStats:
    """DDPO's per-prompt stat tracking: A = (r - mean_prompt) / std_prompt.

    Normalising per prompt removes how easy a prompt is from the signal, so A says only whether
    this sample did better than the policy usually does on that prompt. Until a prompt has
    `min_count` rewards, the whole batch's mean and std stand in (DDPO's fallback).
    """

    def __init__(self, buffer_size=16, min_count=16):
        self.buffers = defaultdict(lambda: deque(maxlen=buffer_size))
        self.min_count = min_count

    def advantages(self, prompts, rewards):
        """rewards (B,) for prompts (B strings) -> advantages (B,); remembers the rewards."""
        adv = torch.empty_like(rewards)
        for p in set(prompts):
            mine = torch.tensor([q == p for q in prompts])
            self.buffers[p].extend(rewards[mine].tolist())
            ref = torch.tensor(list(self.buffers[p])) if len(self.buffers[p]) >= self.min_count else rewards
            adv[mine] = (rewards[mine] - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
        return adv


def ppo_loss(logp, old_logp, advantages, clip_range):
    """PPO's clipped surrogate, Eq. (7) of Schulman et al. 1707.06347, as a loss to minimise.

    logp, old_logp, advantages: (B,). Taking the max of the two losses (the min of the two
    objectives) makes the bound pessimistic: once ρ leaves [1 - ε, 1 + ε] in the direction A
    favours, the clipped term is the larger loss and is constant, so its gradient is zero.
    Returns (loss, ρ (B,) detached).
    """
    ratio = torch.exp(logp - old_logp)  # ρ_t
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio.detach()


#### One epoch: sample, score, update

def rollout(model, reward_fn, batch_prompts, batch_cond, uncond, z_T, gen, eta, generator):
    """Sample the policy θ_old from z_T (B, C, F, h, w), no gradients, one reward query per video.

    Returns xs (B, N+1, C, F, h, w), old_logp (B, N) and the rewards (B,). The videos are scored on
    `gen.decode_frames` random frames, exactly as VADER's are.
    """
    xs, old_logp = sample_with_logprobs(model.unet, z_T, batch_cond, uncond, model.schedule, gen.num_steps,
                                        gen.guidance, eta, generator)  # (B, N+1, C, F, h, w), (B, N)
    frame_idx = choose_frames(gen.frames, gen.decode_frames, generator).to(z_T.device)
    with torch.no_grad():
        rewards = reward_fn(model.decode_frames(xs[:, -1], frame_idx), batch_prompts).float()  # (B,)
    return xs, old_logp, rewards


def ppo_updates(model, params, optimizer, xs, old_logp, batch_cond, uncond, advantages, steps, gen, cfg, generator):
    """PPO on the stored transitions of the timesteps `steps` (indices into the N steps).

    `cfg.updates_per_epoch` optimizer steps per pass, each on a disjoint share of the samples,
    `cfg.inner_epochs` passes. The objective averages over the trained timesteps. Returns one
    (b, len(steps)) tensor of ρ per optimizer step.
    """
    ratios = []
    for _ in range(cfg.inner_epochs):
        for share in torch.randperm(len(xs), generator=generator).to(xs.device).chunk(cfg.updates_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            step_ratios = []
            for j in steps:
                logp = policy_logprob(model, xs[share], j, batch_cond[share], uncond, gen, cfg.eta)  # (b,)
                loss, ratio = ppo_loss(logp, old_logp[share, j], advantages[share], cfg.clip_range)
                (loss / len(steps)).backward()
                step_ratios.append(ratio)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            ratios.append(torch.stack(step_ratios, dim=1))  # (b, len(steps))
    return ratios


def clip_fraction(ratios, clip_range):
    """The share of all trained transitions whose ρ left [1 - ε, 1 + ε]."""
    return torch.cat([((r - 1).abs() > clip_range).flatten() for r in ratios]).float().mean().item()


def ddpo_epoch(model, reward_fn, params, optimizer, stats, prompts, cond, uncond, gen, cfg, generator):
    """One DDPO epoch: sample `cfg.samples_per_epoch` videos, query the reward once each, take PPO steps.

    cond: (P, L, D) embeddings of `prompts`; uncond: (1, L, D). `gen` supplies frames, height,
    width, num_steps, guidance, decode_frames (as for `train.train_step`).
    Returns (rewards (B,), info): info["first_ratio"] is ρ (b, N) of the first optimizer step's
    samples and timesteps (1 up to rounding: θ = θ_old until the first update), and
    info["clip_fraction"] the share of all transitions whose ρ left [1 - ε, 1 + ε].
    """
    device, B = cond.device, cfg.samples_per_epoch
    idx = torch.randint(len(prompts), (B,), generator=generator)
    batch_prompts, batch_cond = [prompts[i] for i in idx], cond[idx.to(device)]  # B strings, (B, L, D)
    z_T = initial_noise(model, B, gen.frames, gen.height, gen.width, generator, device)  # (B, C, F, h, w)
    xs, old_logp, rewards = rollout(model, reward_fn, batch_prompts, batch_cond, uncond, z_T, gen, cfg.eta, generator)
    advantages = stats.advantages(batch_prompts, rewards.cpu()).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
    # Training: PPO on every transition of every sample (ddpo-pytorch's timestep_fraction = 1).
    ratios = ppo_updates(model, params, optimizer, xs, old_logp, batch_cond, uncond, advantages.to(device),
                         range(gen.num_steps), gen, cfg, generator)
    return rewards, dict(first_ratio=ratios[0], clip_fraction=clip_fraction(ratios, cfg.clip_range))
