"""The reward registry and the weight-free rewards."""
import pytest
import torch

from infra.cli import UserError
from rewards import REWARDS, load_reward

WEIGHT_FREE = ["brightness", "darkness", "colorfulness", "compressibility", "smoothness"]


@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_gradient_reaches_the_frames(name):
    frames = torch.rand(3, 2, 3, 16, 16, requires_grad=True)  # (B, f, 3, H, W)
    r = load_reward(name)(frames, ["a", "b", "c"])
    assert r.shape == (3,)
    r.sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0


def test_values_on_known_images():
    white, black = torch.ones(1, 2, 3, 8, 8), torch.zeros(1, 2, 3, 8, 8)
    grey, red = torch.full((1, 2, 3, 8, 8), 0.5), torch.zeros(1, 2, 3, 8, 8)
    red[:, :, 0] = 1
    assert load_reward("brightness")(white, [""]).item() == pytest.approx(1.0)
    assert load_reward("darkness")(black, [""]).item() == pytest.approx(1.0)
    colour = load_reward("colorfulness")
    assert colour(grey, [""]).item() == pytest.approx(0.0, abs=1e-3)
    assert colour(red, [""]).item() == pytest.approx(0.3 * (1 + 0.25) ** 0.5, abs=1e-3)  # rg = 1, yb = 0.5
    assert load_reward("compressibility")(grey, [""]).item() == pytest.approx(0.0)
    stripes = grey.clone()
    stripes[..., ::2] = 1.0
    assert load_reward("compressibility")(stripes, [""]).item() < -0.2
    moving = torch.stack([black[0, 0], white[0, 0]])[None]  # (1, 2, 3, 8, 8): a black then a white frame
    assert load_reward("smoothness")(moving, [""]).item() == pytest.approx(-1.0)


def test_registry_errors():
    assert set(WEIGHT_FREE) <= set(REWARDS)
    with pytest.raises(UserError, match="unknown reward 'nope'; known rewards: .*brightness"):
        load_reward("nope")
    with pytest.raises(UserError, match="takes no option"):
        load_reward("brightness", colour="red")
    smooth = load_reward("smoothness")
    assert smooth.min_frames == 2 and load_reward("brightness").min_frames == 1
    with pytest.raises(UserError, match="--decode-frames 2"):
        smooth(torch.rand(1, 1, 3, 8, 8), [""])


def test_registry_imports_a_reward_module_only_when_asked_for():
    """`import rewards` knows every name but imports no reward model or toy module (only the
    weight-free helpers reward_models.common, .options and .registry); building one imports just its module. Run in a fresh interpreter, where nothing else has imported them."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, rewards; loaded = lambda: sorted(m for m in sys.modules if m.split('.')[0] in "
            "('reward_models', 'toy', 'transformers', 'open_clip')); before = loaded(); "
            "rewards.load_reward('redness'); print(len(rewards.REWARDS), before, loaded())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    helpers = "'reward_models', 'reward_models.common', 'reward_models.options', 'reward_models.registry'"
    assert out.split(" ", 1)[1].strip() == f"[{helpers}] [{helpers}, 'toy', 'toy.rewards', 'toy.world']"
    assert int(out.split()[0]) == len(REWARDS) >= 17
