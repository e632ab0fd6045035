"""Nothing lost, nothing half-done: refusals change no byte, the run folder is locked, --overwrite and
--export-merged remove only their own files, and a signal at any moment leaves a folder that
--resume continues or the same command starts again."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from test_files import ENV, TINY, one_line_error, wait_for
from test_scripts import read_metrics

import infra.run
import sample
import train
from infra import runlog
from infra.cli import run_cli
from infra.files import TMP_MARK, read_safetensors
from infra.folder import claim
from infra.setup import checkpoint_config
from infra.lorafile import load_lora_file
from lora import save_lora

# Held-out evaluations at steps 0 and 3, and the before/after videos: every moment a signal can hit.
SIGNALS = [*TINY, "--max-steps", "3", "--eval-every", "3", "--eval-videos", "1", "--num-videos", "1"]


def fingerprint(folder):
    """Every entry under `folder`, links not followed: a file's sha256, a link's target, 'dir'."""
    seen = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(top, name)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                seen[rel] = "-> " + os.readlink(p)
            elif os.path.isdir(p):
                seen[rel] = "dir"
            else:
                seen[rel] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return seen


def same_run(a, b):
    """Two run folders trained the same: the LoRA bit for bit, metrics.csv but for the `seconds` column."""
    x, y = load_file(a / "lora.safetensors"), load_file(b / "lora.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(read_metrics(a)) == drop(read_metrics(b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The SIGNALS run, never interrupted."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    run_cli(train.main, [*SIGNALS, "--output-dir", str(out)])
    return out


def user_folder(path):
    """A folder of a user's own files, none of them a run's."""
    (path / "data").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "data" / "clip.bin").write_bytes(os.urandom(64))
    return path


#### Refusals change nothing

REFUSALS = [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--reward", "nope"], "unknown reward 'nope'"),  # found once the folder is claimed
    (["--reward", "detector"], "has no gradient"),  # found once the reward is built
    (["--height", "33"], "multiples of 2"),  # found once the model is loaded
]


@pytest.mark.parametrize("kind,args,message", [
    (kind, args, message) for kind in ("a run", "a user's folder", "a new folder") for args, message in REFUSALS
    if kind != "a new folder" or args[0] in ("--reward", "--height")  # refused after the folder is made
])
def test_a_refusal_changes_no_byte(reference, tmp_path, capsys, kind, args, message):
    if kind == "a run":  # with --overwrite, so that the refusal comes from the flag, not the folder
        out, extra = tmp_path / "run", ["--overwrite"]
        shutil.copytree(reference, out, symlinks=True)
    elif kind == "a user's folder":
        out, extra = user_folder(tmp_path / "mine"), []
    else:
        out, extra = tmp_path / "new" / "deeper", []
    before = fingerprint(tmp_path)
    err = one_line_error(capsys, train.main, [*TINY, *extra, *args, "--output-dir", str(out)])
    assert message in err
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize("setup,args,message", [
    ("run", [], "already holds a run; pass --resume to continue it, --overwrite"),
    ("user metrics.csv", ["--overwrite"], "holds metrics.csv, which a run would write over, but no run of train.py"),
    ("user checkpoints", [], "holds checkpoints, which a run would write over"),
    ("under a file", [], "is a file"),
])
def test_a_folder_a_run_would_harm_is_refused(reference, tmp_path, capsys, setup, args, message):
    out = tmp_path / "out"
    if setup == "run":
        shutil.copytree(reference, out)
    elif setup == "under a file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out"
    elif setup == "user checkpoints":
        user_folder(out)
        (out / "checkpoints").mkdir()
    else:
        user_folder(out)
        (out / "metrics.csv").write_text("a,b\n")
    before = fingerprint(tmp_path)
    assert message in one_line_error(capsys, train.main, [*TINY, *args, "--output-dir", str(out)])
    assert fingerprint(tmp_path) == before


#### One run to a folder

def test_a_second_run_on_a_live_runs_folder_is_refused(tmp_path, capsys):
    """Two train.py on one folder: the second, in this process, is refused while the first lives,
    and the message names the first; SIGTERM then stops the first with a checkpoint."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "--max-steps", "500",
                              "--output-dir", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.csv").exists() or first.poll() is not None)
    for argv in ([*TINY, "--max-steps", "500", "--output-dir", str(out)], ["--resume", str(out)],
                 [*TINY, "--overwrite", "--output-dir", str(out)]):
        err = one_line_error(capsys, train.main, argv)
        assert f"is in use by a run that is still going (pid {first.pid} on " in err and "train.py" in err, err
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0 and "stopped by SIGTERM after step" in stdout, stderr[-2000:]
    assert runlog.list_checkpoints(out)  # and the lock went with the process: resume is free to start
    held = claim(out)
    held.release(began=True)


def test_overwrite_removes_only_a_runs_files_and_links_not_their_targets(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    elsewhere = user_folder(tmp_path / "elsewhere")
    shutil.move(out / "checkpoints", elsewhere / "checkpoints")
    (out / "checkpoints").symlink_to(elsewhere / "checkpoints")  # checkpoints kept on another disk
    (out / "notes.txt").write_text("mine\n")
    (out / "videos" / "my_edit.mp4").write_bytes(b"a user's video")
    kept = fingerprint(elsewhere)
    run_cli(train.main, [*SIGNALS, "--overwrite", "--output-dir", str(out)])
    assert fingerprint(elsewhere) == kept  # the link was removed, never followed
    assert not (out / "checkpoints").is_symlink() and runlog.list_checkpoints(out)
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "videos" / "my_edit.mp4").exists()
    same_run(out, reference)


def test_export_merged_writes_only_a_new_folder_or_over_an_earlier_export(reference, tmp_path, capsys):
    base = ["--model", "tiny", "--lora", str(reference / "lora.safetensors"), "--device", "cpu"]
    run, mine = tmp_path / "run", user_folder(tmp_path / "mine")
    shutil.copytree(reference, run)
    before = fingerprint(tmp_path)
    assert "so it is not an earlier export" in one_line_error(capsys, sample.main, [*base, "--export-merged", str(run)])
    assert "so it is not an earlier export" in one_line_error(capsys, sample.main, [*base, "--export-merged", str(mine)])
    assert "is a file" in one_line_error(capsys, sample.main, [*base, "--export-merged", str(mine / "notes.txt")])
    assert fingerprint(tmp_path) == before
    export = tmp_path / "merged"
    run_cli(sample.main, [*base, "--export-merged", str(export)])
    (export / "diffusion_pytorch_model.safetensors").write_bytes(b"spoiled")
    stale = tmp_path / f".merged{TMP_MARK}old"  # what an export killed mid-replace leaves
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    run_cli(sample.main, [*base, "--export-merged", str(export)])  # an earlier export is replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine", "run"]  # and nothing left beside it
    merged = load_file(export / "diffusion_pytorch_model.safetensors")
    assert not any("lora_" in k for k in merged) and torch.isfinite(torch.cat([v.flatten() for v in merged.values()])).all()


#### A signal at any moment

def kill_when(monkeypatch, module, name, when=lambda *a, **k: True, times=1):
    """Wrap module.name: the first call for which `when(*args)` holds sends this process SIGTERM
    (`times` of them) and then goes on, as a signal from outside lands mid-work."""
    original, sent = getattr(module, name), []

    def wrapped(*args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(1)
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("moment", ["loading the models", "the before-videos", "the step-0 evaluation", "step 2",
                                    "the last save"])
def test_a_signal_at_any_moment_then_resume_or_restart(reference, tmp_path, capsys, monkeypatch, moment):
    out = tmp_path / "run"
    argv = [*SIGNALS, "--output-dir", str(out)]
    steps = []
    if moment == "loading the models":
        kill_when(monkeypatch, train, "load_models")
    elif moment == "the before-videos":  # make_videos(model, cfg, prompts, cond, uncond, path_stem, n)
        kill_when(monkeypatch, train, "make_videos", lambda *a, **k: a[5].name == "before")
    elif moment == "the step-0 evaluation":
        kill_when(monkeypatch, train, "make_videos", lambda *a, **k: a[5].name == "eval-step-000000")
    elif moment == "step 2":
        kill_when(monkeypatch, train, "train_step", lambda *a: steps.append(1) or len(steps) == 2)
    else:
        kill_when(monkeypatch, infra.run, "save_checkpoint", lambda out, step, *a, **k: step == 3)
    run_cli(train.main, argv)
    monkeypatch.undo()
    said = capsys.readouterr().out
    if moment == "loading the models":
        assert "while loading, before the run began; nothing was written. Run the same command" in said
        assert not out.exists()
        run_cli(train.main, argv)
    else:
        stopped_at = {"step 2": 2, "the last save": 3}.get(moment, 0)
        assert f"stopped by SIGTERM after step {stopped_at}; checkpoint saved. Continue with: " \
               f"python train.py --resume {out}" in said
        assert runlog.list_checkpoints(out)[-1].name == f"step-{stopped_at:06d}"
        run_cli(train.main, ["--resume", str(out)])
    assert "done: training reward" in capsys.readouterr().out
    same_run(out, reference)
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(p.name for p in (reference / "videos").iterdir())


def test_a_second_signal_stops_at_once_and_the_same_command_starts_again(reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = [*SIGNALS, "--output-dir", str(out)]
    steps = []
    kill_when(monkeypatch, train, "train_step", lambda *a: steps.append(1) or len(steps) == 2, times=2)
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, argv)
    monkeypatch.undo()
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 130 and err[-1].startswith("error: stopped at once;") and "Traceback" not in err
    assert not runlog.list_checkpoints(out)  # stopped before its first checkpoint: nothing to resume
    run_cli(train.main, argv)
    assert "starting again the run there, which stopped before its first checkpoint" in capsys.readouterr().out
    same_run(out, reference)


#### Files read are checked for what they hold

def test_prompts_from_a_device_or_an_endless_pipe_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    err = one_line_error(capsys, train.main, [*TINY, "--prompts", "/dev/zero", "--output-dir", str(out)])
    assert "/dev/zero is a device, not a file" in err
    read, write = os.pipe()

    def endless():
        try:
            while True:
                os.write(write, b"a cat\n" * 4096)
        except OSError:  # the reader closed the pipe
            os.close(write)

    writer = threading.Thread(target=endless, daemon=True)
    writer.start()
    try:
        err = one_line_error(capsys, train.main, [*TINY, "--prompts", f"/dev/fd/{read}", "--output-dir", str(out)])
    finally:
        os.close(read)
    writer.join(timeout=10)
    assert "is more than the 10 MB" in err and not out.exists()


def test_a_lora_file_with_nan_or_bad_metadata_is_refused(reference, tmp_path, capsys):
    tensors = load_file(reference / "lora.safetensors")
    first = min(tensors)
    spoiled = {
        "nan.safetensors": ({**tensors, first: tensors[first] * float("nan")}, {"rank": "16", "alpha": "16"}),
        "rank.safetensors": (tensors, {"rank": "-3", "alpha": "16"}),
        "alpha.safetensors": (tensors, {"rank": "16", "alpha": "inf"}),
        "ints.safetensors": ({k: v.to(torch.int32) for k, v in tensors.items()}, {"rank": "16", "alpha": "16"}),
    }
    messages = {"nan.safetensors": f"{first} holds inf or NaN values", "rank.safetensors": "rank='-3'",
                "alpha.safetensors": "alpha='inf'", "ints.safetensors": "holds torch.int32 values"}
    for name, (t, meta) in spoiled.items():
        save_file(t, tmp_path / name, metadata=meta)
        err = one_line_error(capsys, sample.main, ["--model", "tiny", "--lora", str(tmp_path / name),
                                                   "--output-dir", str(tmp_path / "out")])
        assert messages[name] in err, err
    assert not (tmp_path / "out").exists()


def test_a_lora_records_its_base_model_and_warns_on_another(reference, tiny_model, tmp_path, capsys):
    from models import base_id

    meta = read_safetensors(reference / "lora.safetensors", "LoRA file", "")[1]
    assert meta["base_model"] == "tiny"  # train.py wrote it: the registry's name of a built-in model
    load_lora_file(tiny_model.unet, reference / "lora.safetensors", base="tiny")
    assert capsys.readouterr().err == ""
    save_lora(tiny_model.unet, tmp_path / "lora.safetensors", base="some-org/other-model")
    load_lora_file(tiny_model.unet, tmp_path / "lora.safetensors", base=base_id(tiny_model.spec))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert "trained on some-org/other-model" in err and f"loaded into {base_id(tiny_model.spec)}" in err


def test_a_checkpoint_whose_config_is_wrongly_typed_is_skipped(reference, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*SIGNALS, "--max-steps", "2", "--save-every", "1", "--output-dir", str(out)]
    run_cli(train.main, argv)
    newest = runlog.list_checkpoints(out)[-1]
    config = (newest / "config.json").read_text()
    (newest / "config.json").write_text(config.replace('"lr": ', '"lr": "fast", "was": '))
    capsys.readouterr()
    run_cli(train.main, ["--resume", str(out)])
    warning = capsys.readouterr().err.splitlines()[0]
    assert warning.startswith("warning: resuming from step-000001") and "is not a run's settings" in warning
    assert "lr is 'fast'" in warning
    runlog.check_checkpoint(newest, lambda values: checkpoint_config(values, train.Config))  # step 2 trained again and saved whole


def test_a_step_that_makes_a_lora_weight_non_finite_is_undone(tmp_path, capsys, monkeypatch):
    """A finite gradient times a large enough learning rate: the step is undone, counted, and the
    run stops with the non-finite rule's message and a finite checkpoint."""
    step = torch.optim.AdamW.step

    def overshoot(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] >= 2:  # from the second step on
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overshoot)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, [*TINY, "--max-steps", "5", "--max-bad-steps", "2", "--output-dir", str(out)])
    assert exit_.value.code == 2 and "non-finite loss, gradient or updated LoRA weight" in capsys.readouterr().err
    assert [r["skipped"] for r in read_metrics(out)] == ["0", "1", "1"]
    saved = load_file(runlog.list_checkpoints(out)[-1] / "lora.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_sample_refuses_bad_flags_before_loading(tmp_path, capsys):
    for args, message in ([["--guidance", "nan"], "--guidance must be a finite number"],
                          [["--seed", str(2**64)], "--seed must be a whole number"],
                          [["--device", "cuda:7"], "--device cuda:7"],
                          [["--num-steps", "0"], "--num-steps must be a whole number from 1"]):
        err = one_line_error(capsys, sample.main, ["--model", "tiny", *args, "--output-dir", str(tmp_path / "out")])
        assert message in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_written_is_refused_before_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    err = one_line_error(capsys, sample.main, ["--model", "tiny", "--output-dir", str(tmp_path / "afile" / "out")])
    assert f"{tmp_path / 'afile'} is a file, not a folder" in err
    # A read-only filesystem, as a mount would be: access() refuses, statvfs says why.
    read_only = os.statvfs_result((4096,) * 8 + (os.ST_RDONLY, 255))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(os, "statvfs", lambda path: read_only)
    err = one_line_error(capsys, train.main, [*TINY, "--output-dir", str(tmp_path / "new")])
    assert f"{tmp_path} is on a read-only file system" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
