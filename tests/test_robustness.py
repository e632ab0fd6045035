"""Faults a long run must survive: signals, interrupted saves, non-finite steps, refused resumes,
and several processes under torchrun computing what one process would."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_scripts import FAST, read_metrics

import rewards
import train
from infra import runlog
from infra.cli import UserError, run_cli
from rewards import register

TINY = [*FAST, "--reward", "brightness", "--num-steps", "2", "--frames", "2"]  # file handling, not numerics: the smallest run


def test_sigint_saves_a_checkpoint_and_exits_0(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "--max-steps", "500",
                             "--output-dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 120
    while not ((out / "metrics.csv").exists() and len(read_metrics(out)) >= 1) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by SIGINT" in stdout and "Traceback" not in stderr
    steps = len(read_metrics(out))
    assert 1 <= steps < 500
    assert [p.name for p in runlog.list_checkpoints(out)] == [f"step-{steps:06d}"]
    assert (out / "lora.safetensors").exists()


def test_a_failed_or_interrupted_save_leaves_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    from lora import inject_lora

    params = inject_lora(tiny_model.unet, rank=2)
    opt = torch.optim.AdamW(params)
    gen = torch.Generator().manual_seed(0)
    runlog.save_checkpoint(tmp_path, 1, tiny_model.unet, opt, gen, "{}", runlog.metrics_text([]))
    good = load_file(tmp_path / "checkpoints/step-000001/lora.safetensors")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*step-000001 is intact"):
        runlog.save_checkpoint(tmp_path, 2, tiny_model.unet, opt, gen, "{}", "")

    def killed(*args, **kwargs):  # a kill half way through the write
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        runlog.save_checkpoint(tmp_path, 3, tiny_model.unet, opt, gen, "{}", "")
    monkeypatch.undo()
    run_dir, latest = runlog.find_resume_point(tmp_path)
    assert latest.name == "step-000001"
    assert runlog.load_checkpoint(latest, tiny_model.unet, opt, gen) == 1
    again = load_file(latest / "lora.safetensors")
    assert all(torch.equal(good[k], again[k]) for k in good)


def test_keeps_only_the_newest_checkpoints(tiny_model, tmp_path):
    from lora import inject_lora

    params = inject_lora(tiny_model.unet, rank=2)
    opt, gen = torch.optim.AdamW(params), torch.Generator()
    for step in range(1, 6):
        runlog.save_checkpoint(tmp_path, step, tiny_model.unet, opt, gen, "{}", "", keep=2)
    assert [p.name for p in runlog.list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, capsys, monkeypatch):
    calls = []
    # The test's reward is registered in copies of the registry, so no later test sees it.
    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))
    monkeypatch.setattr(rewards, "_FACTORIES", dict(rewards._FACTORIES))

    @register("test_nan_after_1", "test only: finite once, then NaN")
    def nan_after_1(device="cpu", dtype=torch.float32):
        def reward(frames, prompts):
            calls.append(1)
            r = frames.mean(dim=(1, 2, 3, 4))
            return r if len(calls) == 1 else r * float("nan")

        return reward

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, [*FAST, "--reward", "test_nan_after_1", "--max-steps", "20", "--max-bad-steps", "2",
                             "--output-dir", str(out)])
    assert exit_.value.code == 2
    assert "2 steps in a row had a non-finite loss" in capsys.readouterr().err
    rows = read_metrics(out)
    assert [r["skipped"] for r in rows] == ["0", "1", "1"]
    # The skipped updates left the LoRA as step 1 made it: finite, and saved for a resume.
    saved = load_file(runlog.list_checkpoints(out)[-1] / "lora.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A one-step run, copied by each test that may not change it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    run_cli(train.main, [*TINY, "--max-steps", "1", "--num-videos", "1", "--output-dir", str(out)])
    return out


@pytest.mark.parametrize("args,message", [
    (["--lora-rank", "8"], "--resume cannot change --lora-rank"),
    (["--model", "modelscope"], "--resume cannot change --model"),
])
def test_a_resume_cannot_change_the_model(args, message, one_step, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, ["--resume", str(out), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written


def test_two_processes_equal_one_with_the_whole_batch(tmp_path):
    """torchrun with 2 gloo processes of batch 1 == 1 process of batch 2, after two updates."""
    common = [*TINY, "--max-steps", "2", "--num-videos", "1", "--device", "cpu", "--lr", "0.05"]
    run_cli(train.main, [*common, "--batch-size", "2", "--output-dir", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *common, "--batch-size", "1", "--output-dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[:3000] + "\n...\n" + ddp.stderr[-2000:]
    a, b = load_file(tmp_path / "one/lora.safetensors"), load_file(tmp_path / "two/lora.safetensors")
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it did train
    # Not bit-identical: the all-reduce sums the two halves in another order than one batch does,
    # and Adam's normalised step turns a 1e-9 gradient difference near zero into ~1e-6. An
    # averaging bug would differ by the update itself, ~lr = 5e-2.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for r1, r2 in zip(one, two):
        assert float(r1["reward_mean"]) == pytest.approx(float(r2["reward_mean"]), rel=1e-5)
    assert "x 2 processes" in ddp.stdout
