"""The memory simulator (bench.py memory): calibrated where the truth is known, and able to fail."""
import json

import pytest

import bench
import models
from benchmarks import memory
from benchmarks.memory import register_cpu_attention_flops, simulate
from benchmarks.speed import SPEED_CONFIGS
from infra.cli import run_cli

STEPS = 1  # DDIM steps: the peak of a step does not depend on the no-grad ones, the time does


@pytest.fixture(scope="module", autouse=True)
def small_tiny():
    """The tiny configuration at 4 frames of 16x16 instead of 8 of 32x32: the simulator runs the
    same operators (its time goes to dispatching them, not to their size) and what is checked
    here holds at any size."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SPEED_CONFIGS, "tiny", ("tiny", 16, 16, 4, 1))
        yield


@pytest.fixture(scope="module")
def tiny_fake(small_tiny):
    register_cpu_attention_flops()
    return simulate("tiny", num_steps=STEPS)


@pytest.fixture(scope="module")
def tiny_real(small_tiny):
    return simulate("tiny", fake=False, num_steps=STEPS)


def test_fake_run_matches_the_same_counter_on_real_tensors(tiny_fake, tiny_real):
    """On the CPU the truth is known: the same step and generation on real tensors."""
    fake, real = tiny_fake, tiny_real
    for what in ("step", "generation"):
        assert fake[what]["peak_gib"] == pytest.approx(real[what]["peak_gib"], rel=0.03), what
        assert fake[what]["flops"] == real[what]["flops"] > 0
    assert fake["step"]["where"].startswith("backward") and fake["step"]["where"] == real["step"]["where"]


def test_the_breakdown_adds_up_and_names_the_parts(tiny_fake):
    step = tiny_fake["step"]
    parts = step["breakdown_gib"]
    assert {"frozen weights", "LoRA", "activations"} <= set(parts)
    assert sum(parts.values()) == pytest.approx(step["peak_gib"], rel=0.02)
    assert step["optimizer_state_gib"] == pytest.approx(2 * parts["LoRA"], rel=0.01)  # AdamW's two moments
    assert step["flops"] > tiny_fake["generation"]["flops"] * STEPS / (STEPS + 1)  # at least the sampling


# The levers' checks count on real tensors, three times faster here than fake ones (the fake
# run's time goes to dispatching each operator); the test above holds the two counts together.

def test_without_unet_checkpointing_the_peak_is_larger(tiny_real, monkeypatch):
    monkeypatch.setattr(models, "checkpoint_blocks", lambda unet, enabled=True: None)
    plain = simulate("tiny", fake=False, num_steps=STEPS)
    assert plain["step"]["peak_gib"] > 1.2 * tiny_real["step"]["peak_gib"]


def test_low_memory_is_not_larger(tiny_real):
    low = simulate("tiny", low_memory=True, fake=False, num_steps=STEPS)
    assert low["step"]["peak_gib"] <= tiny_real["step"]["peak_gib"]


def test_the_command_writes_its_table_and_json(tiny_fake, tmp_path, capsys, monkeypatch):
    """The command around `simulate` (tested above): its table row, its JSON and its errors."""
    calls = []
    monkeypatch.setattr(memory, "simulate", lambda *args, **kwargs: calls.append((args, kwargs)) or tiny_fake)
    run_cli(bench.main, ["memory", "--config", "tiny", "--num-steps", "1", "--output-dir", str(tmp_path)])
    assert calls == [(("tiny", False), {"num_steps": 1})]
    assert "| tiny | no |" in capsys.readouterr().out
    record = json.loads((tmp_path / "memory-tiny.json").read_text())
    assert record["step"]["peak_gib"] > record["generation"]["peak_gib"] > 0
    assert set(record["estimate"]["step_s"]) == {"RTX 4090", "H100 SXM"}
    with pytest.raises(SystemExit) as exit_:
        run_cli(bench.main, ["memory", "--config", "nope", "--output-dir", str(tmp_path)])
    assert exit_.value.code == 2 and "unknown --config nope" in capsys.readouterr().err


def test_compare_puts_measured_beside_predicted(tmp_path, capsys):
    """What benchmarks/gpu_check.sh ends with, on files as a GPU run writes them."""
    speed = dict(config="modelscope-256", device="NVIDIA H200", low_memory=False, step_s=2.0, ratio=1.1,
                 step_peak_gb=5.5, generation_peak_gb=4.0)
    memory = dict(config="modelscope-256", step=dict(peak_gib=5.0), generation=dict(peak_gib=4.0), flops_ratio=1.04)
    (tmp_path / "speed-modelscope-256.json").write_text(json.dumps(speed))
    (tmp_path / "memory-modelscope-256.json").write_text(json.dumps(memory))
    run_cli(bench.main, ["compare", "--output-dir", str(tmp_path)])
    row = (tmp_path / "gpu-check.md").read_text().splitlines()[-1]
    assert row == "| modelscope-256 | no | NVIDIA H200 | 5.50 | 5.00 | 1.10 | 4.00 | 4.00 | 1.00 | 2.00 | 1.10 | 1.04 |"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(bench.main, ["compare", "--output-dir", str(tmp_path / "empty")])
    assert "no pair of GPU speed" in capsys.readouterr().err
