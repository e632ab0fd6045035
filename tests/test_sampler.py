"""DDIM and flow-matching Euler parity with diffusers' schedulers, and truncated backpropagation."""
import pytest
import torch
from diffusers import DDIMScheduler

from sampler import FlowSchedule, Schedule, ddim_step, flow_step, sample
from wan import WanFlowSchedule

CONFIGS = {
    # ModelScope's scheduler (its hub folder's scheduler_config.json)
    "modelscope": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                       set_alpha_to_one=False, timestep_spacing="leading"),
    # AnimateDiff's documented scheduler
    "animatediff": dict(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                        set_alpha_to_one=False, timestep_spacing="linspace"),
    "trailing": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                     set_alpha_to_one=True, timestep_spacing="trailing"),
}


def reference(name, prediction_type="epsilon"):
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type,
                         **CONFIGS[name])


def ours(name, prediction_type="epsilon"):
    return Schedule.from_config(reference(name, prediction_type).config)


def fake_model(x, t):
    """A deterministic stand-in for the UNet that depends on both x and t."""
    return torch.sin(3 * x) * 0.5 + 0.001 * t * torch.cos(x)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("num_steps", [10, 25, 7])
def test_timesteps_match_diffusers(name, num_steps):
    ref = reference(name)
    ref.set_timesteps(num_steps)
    assert ours(name).timesteps(num_steps) == ref.timesteps.tolist()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(prediction_type, eta):
    ref = reference("modelscope", prediction_type)
    ref.set_timesteps(25)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)  # (B, C, F, h, w)
    out = torch.randn(2, 4, 3, 8, 8, generator=g)
    noise = torch.randn(2, 4, 3, 8, 8, generator=g)
    for t, (a_t, a_prev) in ours("modelscope", prediction_type).steps(25)[::6]:
        expected = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        got = ddim_step(x, out, a_t, a_prev, eta=eta, noise=noise, prediction_type=prediction_type)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("prediction_type,eta", [("epsilon", 0.0), ("epsilon", 1.0), ("v_prediction", 0.3)])
def test_full_trajectory_matches_diffusers(name, prediction_type, eta):
    ref = reference(name, prediction_type)
    ref.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x_ref = x = torch.randn(1, 4, 2, 6, 6, generator=g)
    noises = [torch.randn(1, 4, 2, 6, 6, generator=g) for _ in range(20)]
    for (t, (a_t, a_prev)), noise in zip(ours(name, prediction_type).steps(20), noises):
        x = ddim_step(x, fake_model(x, t), a_t, a_prev, eta, noise, prediction_type)
        x_ref = ref.step(fake_model(x_ref, t), t, x_ref, eta=eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4)


class CountingUNet(torch.nn.Module):
    """A one-parameter "UNet" that records, for each call, whether autograd was recording."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, x, t, encoder_hidden_states):
        self.calls.append(torch.is_grad_enabled())
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)  # one number per sample
        eps = torch.tanh(self.w * x + text + t / 1000)

        class Out:
            sample = eps

        return Out()


@pytest.mark.parametrize("k", [0, 1, 3])
def test_only_last_k_steps_build_a_graph(k):
    unet = CountingUNet()
    z = torch.randn(1, 4, 2, 4, 4)
    cond = torch.zeros(1, 3, 5)
    out = sample(unet, z, cond, None, ours("modelscope"), 8, guidance=1.0, grad_steps=k)
    assert unet.calls == [False] * (8 - k) + [True] * k
    assert out.requires_grad == (k > 0)


def test_truncated_gradient_equals_last_k_steps_alone():
    """The gradient through the full chain with K grad steps equals running those K steps alone
    from the detached latent the first N - K steps produce (checkpointing included)."""
    schedule, n, k = ours("modelscope"), 10, 3
    z = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    cond = torch.randn(1, 3, 5)
    unet = CountingUNet()
    sample(unet, z, cond, None, schedule, n, grad_steps=k).square().mean().backward()
    full_grad = unet.w.grad.clone()

    unet.w.grad = None
    with torch.no_grad():  # the first N - K steps, by hand
        x = z
        for t, (a_t, a_prev) in schedule.steps(n)[: n - k]:
            x = ddim_step(x, unet(x, t, cond).sample, a_t, a_prev)
    x = x.detach()
    for t, (a_t, a_prev) in schedule.steps(n)[n - k:]:
        x = ddim_step(x, unet(x, t, cond).sample, a_t, a_prev)
    x.square().mean().backward()
    torch.testing.assert_close(full_grad, unet.w.grad)
    assert full_grad.abs() > 0


def test_classifier_free_guidance_combines_the_two_passes():
    unet = CountingUNet()
    z = torch.randn(1, 4, 2, 4, 4)
    cond, uncond = torch.ones(1, 3, 5), torch.zeros(1, 3, 5)
    schedule = ours("modelscope")
    (t, (a_t, a_prev)), = schedule.steps(1)
    got = sample(unet, z, cond, uncond, schedule, 1, guidance=7.5)
    eps_c, eps_u = unet(z, t, cond).sample, unet(z, t, uncond).sample
    torch.testing.assert_close(got, ddim_step(z, eps_u + 7.5 * (eps_c - eps_u), a_t, a_prev))


#### Flow matching: parity with diffusers' FlowMatchEulerDiscreteScheduler

def flow_reference(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 7, 40])
def test_flow_sigmas_and_timesteps_match_diffusers(shift, num_steps):
    ref = flow_reference(shift)
    ref.set_timesteps(num_steps)
    ours = WanFlowSchedule(shift=shift)
    torch.testing.assert_close(torch.tensor(ours.sigmas(num_steps), dtype=torch.float32), ref.sigmas)
    torch.testing.assert_close(torch.tensor([t for t, _ in ours.steps(num_steps)], dtype=torch.float32),
                               ref.timesteps)
    assert ours.sigmas(num_steps)[0] == 1.0 and ours.sigmas(num_steps)[-1] == 0.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_single_steps_match_diffusers(shift):
    ours = WanFlowSchedule(shift=shift)
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 16, 3, 6, 6, generator=g), torch.randn(2, 16, 3, 6, 6, generator=g)  # (B, C, F_lat, h, w)
    for i in (0, 5, 11):  # the first, a middle and the last step (to σ = 0)
        ref = flow_reference(shift)
        ref.set_timesteps(12)
        ref.set_begin_index(i)
        t, coeffs = ours.steps(12)[i]
        torch.testing.assert_close(ours.update(x, v, coeffs), ref.step(v, ref.timesteps[i], x, return_dict=False)[0],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_trajectories_match_diffusers(shift):
    ref, ours = flow_reference(shift), WanFlowSchedule(shift=shift)
    ref.set_timesteps(12)
    x_ref = x = torch.randn(1, 16, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    for (t, coeffs), t_ref in zip(ours.steps(12), ref.timesteps):
        x = ours.update(x, fake_model(x, t), coeffs)
        x_ref = ref.step(fake_model(x_ref, t_ref), t_ref, x_ref, return_dict=False)[0]
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4)


def test_the_last_euler_step_lands_on_the_predicted_x0():
    """x_σ - σ v with v = ε - x0 on the path x_σ = (1 - σ) x0 + σ ε gives x0 exactly."""
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(2, 4, 2, 3, 3, generator=g), torch.randn(2, 4, 2, 3, 3, generator=g)
    sigma = 0.37
    torch.testing.assert_close(flow_step((1 - sigma) * x0 + sigma * eps, eps - x0, sigma, 0.0), x0)


@pytest.mark.parametrize("k", [0, 2])
def test_flow_sampling_keeps_a_graph_only_for_the_last_k_steps(k):
    unet = CountingUNet()
    out = sample(unet, torch.randn(1, 4, 2, 4, 4), torch.zeros(1, 3, 5), None, WanFlowSchedule(shift=3.0), 6,
                 grad_steps=k)
    assert unet.calls == [False] * (6 - k) + [True] * k and out.requires_grad == (k > 0)
    with pytest.raises(ValueError, match="deterministic"):
        sample(unet, torch.randn(1, 4, 2, 4, 4), torch.zeros(1, 3, 5), None, FlowSchedule(), 2, eta=0.5)
