"""End to end: train.py and sample.py on the tiny model, the files they write, and bad input."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from infra import runlog
import sample
import train
from infra.cli import run_cli
from conftest import ROOT

# 16x16 pixels (the tiny model's default is 32x32): a quarter of the convolutions and a sixteenth
# of the attention, and everything these tests check is the same at any size.
FAST = ["--model", "tiny", "--prompts", "animals.txt", "--num-steps", "4", "--frames", "4", "--num-videos", "2",
        "--height", "16", "--width", "16"]


def run_script(script, *args):
    """Run a script as a user would; returns the finished process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def read_metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 6-step training run on the brightness reward, shared by the tests below. It runs in this
    process; train.py as a process of its own is run by the shell, signal and kill tests."""
    out = tmp_path_factory.mktemp("runs") / "bright"
    run_cli(train.main, [*FAST, "--reward", "brightness", "--max-steps", "6", "--save-every", "3",
                         "--eval-every", "3", "--eval-videos", "2", "--output-dir", str(out)])
    return out


def test_train_writes_every_file(run):
    for name in ("lora.safetensors", "metrics.csv", "config.json", "reward_curve.png",
                 "videos/before.mp4", "videos/before.gif", "videos/after.mp4", "videos/after.gif"):
        assert (run / name).stat().st_size > 0, name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    config = json.loads((run / "config.json").read_text())
    assert config["reward"] == "brightness" and config["max_steps"] == 6 and config["lr"] == 1e-2
    gif = Image.open(run / "videos/after.gif")
    assert gif.n_frames == 4 and gif.size == (2 * 128, 128)  # 2 prompts side by side, upscaled to 128
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(0, 7))  # step 0: the held-out baseline
    assert set(rows[0]) == set(runlog.METRICS) | {"eval_dynamics"}  # the default --eval-rewards


def test_held_out_rewards_are_logged(run):
    rows = read_metrics(run)
    scored = {int(r["step"]): float(r["eval_reward"]) for r in rows if r["eval_reward"]}
    assert sorted(scored) == [0, 3, 6] and all(0 < v < 1 for v in scored.values())
    assert all((run / f"videos/eval-step-{s:06d}.gif").exists() for s in scored)
    config = json.loads((run / "config.json").read_text())
    assert config["eval_every"] == 3


def test_reward_rises(run):
    rewards = [float(r["reward_mean"]) for r in read_metrics(run) if r["reward_mean"]]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert last > first + 0.01, rewards


def test_sample_side_by_side_on_the_loras_own_base(run, tmp_path, capsys):
    out = tmp_path / "samples"
    run_cli(sample.main, ["--lora", str(run / "lora.safetensors"), "--prompts", "animals.txt",  # no --model
                          "--num-prompts", "2", "--num-steps", "4", "--frames", "4", "--height", "16", "--width", "16",
                          "--side-by-side", "--output-dir", str(out)])
    assert f"--model tiny (the base model {run / 'lora.safetensors'} was trained on)" in capsys.readouterr().out
    gifs = sorted(out.glob("*.gif"))
    assert len(gifs) == 2 and len(list(out.glob("*.mp4"))) == 2
    assert Image.open(gifs[0]).size == (2 * 128, 128)  # base | aligned
    assert gifs[0].name == "000-a-cat-stretching-in-a-patch-of-sunlight.gif"


def bad(tmp_path, *args):
    """train.py's command line with FAST settings and an output folder under tmp_path."""
    return [*FAST, "--reward", "brightness", "--output-dir", str(tmp_path / "out"), *args]


@pytest.mark.parametrize("args,message", [
    (["--prompts", "missing.txt"], "prompts file 'missing.txt' not found"),
    (["--prompts", "EMPTY"], "has no prompts"),
    (["--model", "nope"], "unknown model 'nope'; known models: tiny"),
    (["--reward", "nope"], "unknown reward 'nope'; known rewards:"),
    (["--eval-rewards", "colorfulness,nope"], "--eval-rewards: unknown reward 'nope'; known rewards:"),
    (["--reward", "detector"], "has no gradient, so it cannot be trained on; watch it with --eval-rewards"),
    (["--grad-steps", "5"], "--grad-steps must be a whole number from 1 to --num-steps (4), got 5"),
    (["--grad-steps", "0"], "--grad-steps must be a whole number from 1 to --num-steps (4), got 0"),
    (["--decode-frames", "5"], "--decode-frames must be a whole number from 1 to --frames (4), got 5"),
    (["--seed", str(2**64)], "--seed must be a whole number from 0 to 4294967295"),
    (["--lr", "inf"], "--lr must be a finite number above 0 and at most 1, got inf"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--lora-dropout", "2"], "--lora-dropout must be a number from 0 up to (not including) 1"),
    (["--device", "cuda:7"], "--device cuda:7:"),
    (["--eval-every", "1", "--eval-videos", "0"], "--eval-videos must be a whole number >= 1 when --eval-every"),
    (["--num-videos", "0"], "--num-videos must be a whole number >= 1"),
    (["--frames", "100000"], "--frames must be a whole number from 1 to 1024"),
    (["--height", "33"], "--height and --width must be multiples of 2"),
    (["--reward", "smoothness"], "needs --decode-frames 2 or more"),
    (["--resume"], "no checkpoint"),
    (["--report-to", "nope"], "--report-to takes wandb or tensorboard"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    if "EMPTY" in args:
        (tmp_path / "empty.txt").write_text("# no prompts here\n")
        args = [a.replace("EMPTY", str(tmp_path / "empty.txt")) for a in args]
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, bad(tmp_path, *args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_refuses_a_folder_that_holds_a_run(run, tmp_path, capsys):
    copy = tmp_path / "taken"
    shutil.copytree(run, copy)
    metrics = (copy / "metrics.csv").read_text()
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, [*FAST, "--reward", "brightness", "--output-dir", str(copy)])
    assert exit_.value.code == 2 and "already holds a run; pass --resume" in capsys.readouterr().err
    assert (copy / "metrics.csv").read_text() == metrics  # untouched


def test_sample_bad_lora_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(sample.main, ["--model", "tiny", "--lora", str(tmp_path / "x.safetensors")])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_bad_input_from_the_shell_has_no_traceback():
    proc = run_script("train.py", "--model", "tiny", "--reward", "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown reward") and "Traceback" not in proc.stderr
