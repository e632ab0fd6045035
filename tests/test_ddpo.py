"""DDPO, the baseline: its log-probabilities against torch's Normal, PPO's clipping; the bench run with GRPO."""
import csv
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

import bench
from infra.cli import run_cli
from baselines.ddpo import (DDPOConfig, PromptStats, ddim_logprob, ddim_sigma, ddpo_epoch, policy_logprob, ppo_loss,
                  sample_with_logprobs)
from lora import inject_lora
from rewards import load_reward
from sampler import Schedule, sample
from vader import encode_prompts

MODELSCOPE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  set_alpha_to_one=False, timestep_spacing="leading", clip_sample=False)
GEN = dict(frames=2, height=32, width=32, num_steps=2, guidance=1.0, decode_frames=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_logprob_is_the_gaussian_density_of_diffusers_ddim_step(prediction_type, eta):
    """Mean and σ_t from diffusers' DDIMScheduler (an independent implementation), density from torch."""
    ref = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **MODELSCOPE)
    ref.set_timesteps(10)
    pairs = Schedule.from_config(ref.config).steps(10)
    torch.manual_seed(0)
    for step in (0, 5, 9):  # noisy, middle, and the last step (to ᾱ_0, the smallest σ)
        t, (a_t, a_prev) = pairs[step]
        x_t, out = torch.randn(3, 4, 2, 8, 8), torch.randn(3, 4, 2, 8, 8)  # (B, C, F, h, w)
        mean = ref.step(out, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t)).prev_sample
        sigma = ref.step(out, t, x_t, eta=eta, variance_noise=torch.ones_like(x_t)).prev_sample - mean  # σ_t
        x_prev = mean + sigma * torch.randn_like(x_t)
        expected = torch.distributions.Normal(mean, sigma).log_prob(x_prev).mean(dim=(1, 2, 3, 4))  # (B,)
        got = ddim_logprob(x_prev, x_t, out, a_t, a_prev, eta, prediction_type)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_policy_is_the_sampler(tiny_model):
    """The rollout DDPO scores is exactly sampler.sample with η > 0 and the same noise seed."""
    cond, uncond = encode_prompts(tiny_model, ["a cat"]), encode_prompts(tiny_model, [""])
    z_T = torch.randn(1, 4, 2, 16, 16)  # (B, C, F, h, w)
    xs, logp = sample_with_logprobs(tiny_model.unet, z_T, cond, uncond, tiny_model.schedule, 3, 2.0, 1.0,
                                    torch.Generator().manual_seed(7))
    z0 = sample(tiny_model.unet, z_T, cond, uncond, tiny_model.schedule, 3, 2.0, eta=1.0,
                generator=torch.Generator().manual_seed(7))
    assert xs.shape == (1, 4, 4, 2, 16, 16) and logp.shape == (1, 3)
    torch.testing.assert_close(xs[:, -1], z0)
    # x_prev = μ + σ z, so each stored log π is the mean over 2,048 entries of -z²/2 - log σ - log sqrt(2π):
    # -1/2 - log σ - log sqrt(2π) up to ~0.02 of sampling noise. Wrong σ or a wrong state would miss it.
    for j, (t, (a_t, a_prev)) in enumerate(tiny_model.schedule.steps(3)):
        expected = -0.5 - math.log(ddim_sigma(a_t, a_prev, 1.0)) - math.log(math.sqrt(2 * math.pi))
        assert logp[0, j].item() == pytest.approx(expected, abs=0.1)


class LinearEps(torch.nn.Module):
    """A two-parameter stand-in for the UNet, cheap enough for 400,000 rollouts in a second."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([0.3, -0.2]))

    def forward(self, x, t, encoder_hidden_states):
        return SimpleNamespace(sample=self.theta[0] * x + self.theta[1] * torch.tanh(x) * t / 1000)


def test_policy_gradient_is_unbiased_for_the_reward_gradient():
    """DDPO's score-function gradient, E[(r - mean r) Σ_t ∇ log π_t], and VADER's pathwise gradient
    (backprop through all N steps of the same η = 1 sampler) estimate the same ∇ E[r]. A wrong σ_t
    or a wrong mean in the log-probability biases the first; the chunks give its standard error."""
    unet, schedule, N = LinearEps(), Schedule(steps_offset=1, set_alpha_to_one=False), 3
    model, gen = SimpleNamespace(unet=unet, schedule=schedule), SimpleNamespace(num_steps=N, guidance=1.0)
    cond, generator = torch.zeros(1, 1, 1), torch.Generator().manual_seed(0)

    def reward(x0):  # (B, 1, 1, 2, 2) -> (B,)
        return -((x0 - 0.5) ** 2).mean(dim=(1, 2, 3, 4))

    pathwise, score = [], []
    for _ in range(8):
        z_T = torch.randn(50_000, 1, 1, 2, 2, generator=generator)  # (B, C, F, h, w)
        x0 = sample(unet, z_T, cond, None, schedule, N, grad_steps=N, eta=1.0, generator=generator)
        pathwise.append(torch.autograd.grad(reward(x0).mean(), unet.theta)[0])
        xs, _ = sample_with_logprobs(unet, z_T, cond, None, schedule, N, 1.0, 1.0, generator)
        r = reward(xs[:, -1])
        logp = sum(policy_logprob(model, xs, j, cond, None, gen, 1.0) for j in range(N)) * 4  # sum, not mean
        score.append(torch.autograd.grad(((r - r.mean()) * logp).mean(), unet.theta)[0])
    pathwise, score = torch.stack(pathwise), torch.stack(score)  # (8, 2) each
    se = ((pathwise.var(dim=0) + score.var(dim=0)) / 8).sqrt()
    assert (se < 0.1 * pathwise.mean(dim=0).abs()).all()  # precise enough to see a bias
    assert ((score.mean(dim=0) - pathwise.mean(dim=0)).abs() < 4 * se).all(), (score.mean(0), pathwise.mean(0), se)


def ratio_and_grad(ratio, advantage, clip_range=0.1):
    logp = torch.tensor([math.log(ratio)], requires_grad=True)
    loss, rho = ppo_loss(logp, torch.zeros(1), torch.tensor([advantage]), clip_range)
    loss.backward()
    return loss.item(), rho.item(), logp.grad.item()


@pytest.mark.parametrize("ratio,advantage,clipped", [
    (1.05, 1.0, False), (0.95, -1.0, False),  # inside [1 - ε, 1 + ε]: the plain policy gradient
    (1.2, 1.0, True), (0.8, -1.0, True),  # moved past the bound in the direction A favours: no gradient
    (0.8, 1.0, False), (1.2, -1.0, False),  # moved the wrong way: not clipped, the pessimistic bound
])
def test_ppo_clipping_at_the_boundary(ratio, advantage, clipped):
    loss, rho, grad = ratio_and_grad(ratio, advantage)
    assert rho == pytest.approx(ratio)
    if clipped:
        assert loss == pytest.approx(-advantage * (1 + 0.1 * (1 if ratio > 1 else -1))) and grad == 0
    else:  # d(-A ρ)/d log π = -A ρ
        assert loss == pytest.approx(-advantage * ratio) and grad == pytest.approx(-advantage * ratio)


def test_prompt_stats_normalise_per_prompt_once_they_have_enough():
    stats = PromptStats(buffer_size=4, min_count=2)
    first = stats.advantages(["a", "b"], torch.tensor([1.0, 3.0]))  # one each: the batch's mean and std
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0]), rtol=0, atol=1e-5)
    second = stats.advantages(["a", "b"], torch.tensor([3.0, 3.0]))  # each prompt now has [1, 3] or [3, 3]
    torch.testing.assert_close(second, torch.tensor([1.0, 0.0]), rtol=0, atol=1e-5)


def test_ppo_ratio_is_one_at_the_first_inner_step(tiny_model):
    """Until the first update θ = θ_old, so a correct re-evaluation of each transition gives ρ = 1."""
    prompts = ["a cat", "a dog"]
    cond, uncond = encode_prompts(tiny_model, prompts), encode_prompts(tiny_model, [""])
    torch.manual_seed(0)
    params = inject_lora(tiny_model.unet, rank=2)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    gen = SimpleNamespace(**{**GEN, "guidance": 2.0})
    rewards, info = ddpo_epoch(tiny_model, load_reward("brightness"), params, optimizer, PromptStats(), prompts,
                               cond, uncond, gen, DDPOConfig(samples_per_epoch=4), torch.Generator().manual_seed(0))
    assert rewards.shape == (4,)
    assert info["first_ratio"].shape == (2, 2)  # (samples in the first PPO step, timesteps)
    torch.testing.assert_close(info["first_ratio"], torch.ones(2, 2), rtol=0, atol=1e-5)
    assert 0 < info["clip_fraction"] <= 0.5  # the second step starts from θ ≠ θ_old and is clipped
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_efficiency_run_tunes_each_lr_and_writes_table_and_plot(tiny_folder, tmp_path, capsys):
    """One seed of all four methods after a two-point lr grid, on toy-world captions (so the
    detector scores every evaluation point too), on the tiny model."""
    out = tmp_path / "eff"
    prompts = tmp_path / "toy.txt"
    prompts.write_text("a big blue triangle moving left\na small yellow circle moving up\n")
    bench.main(["efficiency", "--model", str(tiny_folder), "--prompts", str(prompts), "--budget", "2", "--seeds", "0",
                "--num-steps", "2", "--frames", "2", "--lora-rank", "2", "--batch-size", "1", "--ddpo-batch", "2",
                "--grpo-group", "2", "--grpo-groups", "1", "--grpo-window", "1", "1", "--eval-videos", "1",
                "--eval-points", "2", "--lr-grid", "0.03", "0.001", "--output-dir", str(out)])
    methods = ["VADER K=1", "VADER K=2", "DDPO", "GRPO"]
    grid = read_csv(out / "efficiency_lr_grid.csv")
    assert [(g["method"], float(g["lr"])) for g in grid] == [(m, lr) for m in methods for lr in (0.03, 0.001)]
    table = (out / "efficiency.md").read_text()
    for m in methods:  # the comparison ran at each method's best lr of the grid
        best = max((g for g in grid if g["method"] == m), key=lambda g: float(g["final_reward"]))
        assert f"{m} {float(best['lr']):g}" in table.splitlines()[-1]
    assert "| method | lr 0.03 | lr 0.001 |" in table

    rows = read_csv(out / "efficiency_curves.csv")
    assert sorted({r["method"] for r in rows}) == sorted(methods)
    for m in methods:
        for seed in ("0",):
            run = [r for r in rows if r["method"] == m and r["seed"] == seed]
            assert [int(r["queries"]) for r in run] == ([0, 2] if m in ("DDPO", "GRPO") else [0, 1, 2])
            assert float(run[0]["change"]) == 0 and float(run[-1]["change"]) > 0  # trained away from the base
    assert len({r["eval_reward"] for r in rows if r["queries"] == "0"}) == 1  # one base model for every run
    assert all(float(r["eval_reward"]) > 0 for r in rows)  # brightness is in (0, 1)
    assert all(0 <= float(r["shape_accuracy"]) <= 1 for r in rows)  # the detector's opinion at every point

    summary = read_csv(out / "efficiency_summary.csv")
    assert len(summary) == 4
    base = float(rows[0]["eval_reward"])
    for r in summary:  # each baseline's final reward is a target, where the baseline improved on the base
        for b in ("DDPO", "GRPO"):
            final = float([x for x in rows if x["method"] == b and x["seed"] == r["seed"]][-1]["eval_reward"])
            if final > base:
                assert float(r[f"target_{b}"]) == pytest.approx(final)
                assert r["method"] != b or r[f"queries_to_{b}"] == "2"  # its own final reward, at the end
            else:
                assert math.isnan(float(r[f"target_{b}"])) and math.isnan(float(r[f"queries_to_{b}"]))

    assert "| method | final reward at 2 queries | queries to DDPO's | training s to DDPO's | queries to GRPO's |" in table
    assert all(f"| {m} |" in table for m in methods) and "DDPO / VADER K=1:" in table and "GRPO / VADER K=2:" in table
    assert "final shape accuracy |" in table
    assert table in capsys.readouterr().out  # printed for BENCHMARKS.md

    image = Image.open(out / "efficiency.png")
    assert image.size == (1500, 800)  # reward panels, and the detector's below them
    colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # panels of curves, not a blank canvas


@pytest.mark.parametrize("args,message", [
    (["--reward", "nope"], "unknown reward 'nope'"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--budget", "4"], "--budget (4) is smaller than one batch"),
    (["--budget", "20"], "--budget (20) must be a multiple of --batch-size (2), --ddpo-batch (8) and GRPO's"),
    (["--grpo-window", "3", "2"], "--grpo-window 3 2 does not fit --num-steps 4"),
    (["--lr-grid", "0.01", "0"], "--lr-grid values must be finite numbers above 0"),
    (["--large-k", "9"], "--large-k must be between 1 and --num-steps (4), got 9"),
])
def test_efficiency_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        run_cli(bench.main, ["efficiency", "--output-dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
