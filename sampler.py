"""DDIM and flow-matching sampling, written from the equations, with truncated backpropagation.

Symbols (Song et al., "Denoising Diffusion Implicit Models", arXiv 2010.02502):
    alpha_bar_t  ᾱ_t, the cumulative product of (1 - β_s) for s <= t  (the paper writes α_t)
    x_t          the noisy latent at timestep t
    eps          ε_θ(x_t, t), the model's noise prediction
    x0_pred      the predicted clean latent, "predicted x_0" in Eq. (12)
    sigma_t      σ_t(η), the step's noise scale, Eq. (16); η = 0 is deterministic DDIM

VADER (arXiv 2407.08737) backpropagates a reward through the sampling chain. Keeping the graph
for all N steps costs N UNet activations; VADER, like AlignProp (2310.03739) and DRaFT
(2309.17400), keeps gradients only for the last K steps ("truncated backpropagation"): the first
N - K steps run under `torch.no_grad()`, and only the last K build an autograd graph.

Two samplers share the loop: DDIM for the UNet models (ModelScope, AnimateDiff), and the Euler
solver of a flow-matching ODE (`FlowSchedule`, at the end; Wan's σ schedule is in wan.py). Each
schedule gives `steps(N)`, the N (timestep, coefficients) pairs to visit, and
`update(x, model_output, coeffs)`, one step; `sample` runs either.
"""
import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta):
    """σ_t(η) = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev), Eq. (16) of 2010.02502:
    the noise scale of one DDIM step (η = 1 is DDPM's posterior variance, η = 0 deterministic)."""
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5


def ddim_step(x_t, model_output, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None,
              prediction_type="epsilon"):
    """One DDIM update x_t -> x_{t-1}; Eq. (12) of Song et al. 2010.02502. No clipping of x0.

    `alpha_bar_*` are ᾱ at this timestep and the previous (less noisy) one, floats or tensors
    broadcastable to `x_t`. `prediction_type` is "epsilon" (the model predicts ε) or
    "v_prediction" (it predicts v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0, Salimans & Ho 2202.00512).
    With eta > 0, `noise` is the standard normal sample to add (drawn here if None).
    """
    a_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device)
    a_prev = torch.as_tensor(alpha_bar_prev, dtype=x_t.dtype, device=x_t.device)
    if prediction_type == "epsilon":
        eps = model_output
        x0_pred = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif prediction_type == "v_prediction":
        x0_pred = a_t.sqrt() * x_t - (1 - a_t).sqrt() * model_output
        eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * x_t
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    sigma = ddim_sigma(a_t, a_prev, eta)
    # Eq. (12): x_prev = sqrt(ᾱ_prev) x0_pred + sqrt(1 - ᾱ_prev - σ²) ε + σ z.
    x_prev = a_prev.sqrt() * x0_pred + (1 - a_prev - sigma**2).sqrt() * eps
    if eta > 0:
        noise = torch.randn_like(x_t) if noise is None else noise
        x_prev = x_prev + sigma * noise
    return x_prev


@dataclass
class Schedule:
    """The noise schedule and timestep rule of a model, read from its scheduler config.

    The fields mirror diffusers' DDIMScheduler config names, so a model's
    `scheduler/scheduler_config.json` fills them directly.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "linear" or "scaled_linear" (linear in sqrt(β))
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"  # "leading", "linspace" or "trailing"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # ᾱ after the last step: 1, or ᾱ_0 if False

    @classmethod
    def from_config(cls, config):
        """Build from a scheduler config dict, ignoring fields DDIM sampling does not use."""
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in dict(config).items() if k in fields})

    def alphas_cumprod(self):
        """ᾱ_t for t = 0..T-1, in float32 as diffusers computes it (so the two agree bit for bit)."""
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":  # the latent-diffusion schedule
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}")
        return torch.cumprod(1.0 - betas, dim=0)

    def timesteps(self, num_steps):
        """The N timesteps to visit, most noisy first.

        The three spacings of Table 2 in Lin et al., "Common Diffusion Noise Schedules and
        Sample Steps are Flawed" (2305.08891), written as diffusers does them.
        """
        T, N = self.num_train_timesteps, num_steps
        if self.timestep_spacing == "linspace":
            t = np.linspace(0, T - 1, N).round()[::-1]
        elif self.timestep_spacing == "leading":
            t = (np.arange(0, N) * (T // N)).round()[::-1] + self.steps_offset
        elif self.timestep_spacing == "trailing":
            t = np.round(np.arange(T, 0, -T / N)) - 1
        else:
            raise ValueError(f"unsupported timestep_spacing {self.timestep_spacing!r}")
        return [int(x) for x in t]

    def steps(self, num_steps):
        """[(t, (ᾱ_t, ᾱ_prev))] for every step of an N-step DDIM run.

        Quirk kept for parity with diffusers: the previous timestep is always t - T // N, even
        when the spacing ("linspace", "trailing") puts the next visited timestep elsewhere.
        """
        ac = self.alphas_cumprod()
        final = torch.tensor(1.0) if self.set_alpha_to_one else ac[0]
        prev = [t - self.num_train_timesteps // num_steps for t in self.timesteps(num_steps)]
        return [(t, (ac[t], ac[p] if p >= 0 else final)) for t, p in zip(self.timesteps(num_steps), prev)]

    def update(self, x_t, model_output, coeffs, eta=0.0, noise=None):
        """One DDIM step with this schedule's prediction type."""
        return ddim_step(x_t, model_output, *coeffs, eta, noise, self.prediction_type)


def guided_output(unet, x, t, cond, uncond, guidance):
    """Classifier-free guidance (Ho & Salimans, 2207.12598): out_u + w (out_c - out_u).

    The same linear combination serves every output a denoiser predicts: ε, v, or a flow
    model's velocity (diffusers' flow pipelines guide the velocity exactly so); the names below say ε.

    unet: a denoiser called as diffusers' models are, `unet(x, t, encoder_hidden_states=text)`,
    its prediction in `.sample`. x: latents (B, C, F, h, w), float32; cond: text embeddings
    (B, L, D); uncond: (B, L, D) or the empty prompt's (1, L, D), broadcast. Guidance 1 skips the
    unconditional pass. Without gradients both passes run as one batch of 2B; in a grad step as
    two calls of B, so backward holds one pass's activations at a time, not both. Only the denoiser runs in the base dtype
    (the embeddings'): the DDIM update subtracts nearly equal numbers when ᾱ is near 1, which
    bf16's 8 significant bits would wreck, so the latents stay float32.
    """
    x_in = x.to(cond.dtype)
    if guidance == 1.0:
        return unet(x_in, t, encoder_hidden_states=cond).sample.to(x.dtype)
    uncond = uncond.expand_as(cond)  # (B, L, D)
    if torch.is_grad_enabled():
        eps_u = unet(x_in, t, encoder_hidden_states=uncond).sample.to(x.dtype)  # (B, C, F, h, w)
        eps_c = unet(x_in, t, encoder_hidden_states=cond).sample.to(x.dtype)
    else:
        both = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample  # (2B, ...)
        eps_u, eps_c = both.to(x.dtype).chunk(2)  # each (B, C, F, h, w)
    return eps_u + guidance * (eps_c - eps_u)


def pick_grad_steps(num_steps, grad_steps, random_k=False, generator=None):
    """How many final steps keep gradients this training step.

    Fixed mode returns K. Random mode draws K uniformly from 1..K afresh every training step,
    so over training every depth of the chain up to K is trained, at the mean cost of
    (K + 1) / 2 grad steps (AlignProp's randomised truncation, 2310.03739). With K = 1 both
    modes return 1.
    """
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in 0..{num_steps}, got {grad_steps}")
    if random_k and grad_steps > 0:
        return int(torch.randint(1, grad_steps + 1, (1,), generator=generator))
    return grad_steps


def sample(denoiser, z_T, cond, uncond, schedule, num_steps, guidance=1.0, grad_steps=0, eta=0.0,
           generator=None, checkpoint_steps=False):
    """Run N steps of `schedule`'s sampler from z_T; gradients flow only through the last `grad_steps` (K).

    z_T: (B, C, F, h, w) initial noise. cond/uncond: (B, L, D) text embeddings (uncond may be
    None when guidance is 1). Returns z_0, (B, C, F, h, w). `denoiser` maps (x_t, t, text) to a
    prediction of x_t's shape: the model's UNet or transformer (models.py).
    The first N - K steps run without a graph: to the optimiser their output is a constant. With
    `checkpoint_steps` each denoiser call of the last K steps is a checkpoint of its own: only its
    inputs (x_t and the text) are stored and the call runs again in backward, so memory stays flat
    in K, and the two guidance passes of a step are recomputed one after the other, so backward
    holds one pass's activations, never both. With eta > 0 the noise is drawn on the CPU from
    `generator`, so a seed gives the same chain on any device.
    """
    x = z_T
    for i, (t, coeffs) in enumerate(schedule.steps(num_steps)):
        keep_grad = i >= num_steps - grad_steps  # truncated backprop: a graph for the last K steps only
        noise = None
        if eta > 0:  # drawn outside the checkpoint so the recomputation sees the same noise
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)

        # The default arguments bind this step's t, coefficients and noise now. A closure would
        # read them when called, and a checkpoint calls it again during backward, after the loop
        # has moved on: every recomputation would then use the last step's t.
        def step(x_t, t=t, coeffs=coeffs, noise=noise, net=denoiser):
            out = guided_output(net, x_t, t, cond, uncond, guidance)
            return schedule.update(x_t, out, coeffs, eta, noise)

        if not keep_grad:
            with torch.no_grad():
                x = step(x)
        elif checkpoint_steps:
            x = step(x, net=functools.partial(checkpoint, denoiser, use_reentrant=False))
        else:
            x = step(x)
    return x


#### Flow matching: the Euler solver of a rectified-flow ODE (Wan, SD3, FLUX)
#
# A flow model is trained on the straight path between data and noise,
#     x_σ = (1 - σ) x0 + σ ε,        σ from 1 (pure noise) down to 0 (data),
# the conditional optimal-transport path of Lipman et al. (2210.02747, Eq. 20 with σ_min = 0),
# which is rectified flow (Liu et al. 2209.03003, Eq. 1, with t = 1 - σ). Its network predicts
# the path's velocity v = dx_σ/dσ = ε - x0 (a "flow_prediction" in diffusers' scheduler configs).
# Sampling integrates the ODE dx/dσ = v(x, σ) from σ = 1 to 0; Euler's method is
#     x_{σ_next} = x_σ + (σ_next - σ) v,
# and since σ_next < σ, each step removes a share of the predicted noise. A final step to σ = 0
# returns x_σ - σ v = x0 exactly, for the model's x0.

def flow_step(x, v, sigma, sigma_next):
    """One Euler step of dx/dσ = v from σ to σ_next (floats); x and v (B, C, F, h, w)."""
    return x + (sigma_next - sigma) * v


@dataclass
class FlowSchedule:
    """Euler sampling of a flow-matching ODE over N + 1 values of σ, from 1 (noise) down to 0 (data).

    Here the σ are evenly spaced; a family with its own rule overrides `sigmas` (Wan's shifted σ,
    wan.py). The coefficients are plain Python floats, known before sampling starts, so no step
    reads a tensor back from the device.
    """

    num_train_timesteps: int = 1000

    def sigmas(self, num_steps):
        """N + 1 values of σ: 1, 1 - 1/N, ..., 1/N, 0."""
        return [1 - i / num_steps for i in range(num_steps)] + [0.0]

    def steps(self, num_steps):
        """[(timestep, (σ, σ_next))]; the network reads the timestep T σ (Wan: 1000 σ)."""
        sig = self.sigmas(num_steps)
        return [(self.num_train_timesteps * a, (a, b)) for a, b in zip(sig[:-1], sig[1:])]

    def update(self, x, v, coeffs, eta=0.0, noise=None):
        """One Euler step; the ODE is deterministic, so there is no η."""
        if eta:
            raise ValueError("flow-matching Euler sampling is deterministic: eta must be 0")
        return flow_step(x, v, *coeffs)
