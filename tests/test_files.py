"""Damaged, hostile and odd files: each costs one line naming the file and the fix, never a
traceback or a run. Resume survives a damaged newest checkpoint, kill -9 at any moment, and a
disk that fills up mid-save."""
import contextlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from test_scripts import FAST, read_metrics

import sample
import train
from infra import runlog
from infra.cli import UserError, run_cli
from infra.files import read_prompts

TINY = [*FAST, "--reward", "brightness", "--num-steps", "2", "--frames", "2"]  # file handling, not numerics: the smallest run


def one_line_error(capsys, main, argv):
    """Run a script's main; assert it failed as a user error should: exit 2, one line, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def snapshot(folder):
    """Every file under `folder` with its size and modification time: what 'nothing changed' means."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def leftovers(folder):
    """Temporary files and folders a save leaves while it runs."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]


#### Prompts files

def test_prompts_with_a_bom_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa cat\n   \n\t\n# a comment\n  # an indented one\na #1 hit song  \n".encode())
    assert read_prompts(str(path)) == ["a cat", "a #1 hit song"]  # a '#' inside a prompt is the prompt's


@pytest.mark.parametrize("content,message", [
    ("a caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 5); save it as UTF-8"),
    (b"a cat\n\0\0\0", "holds NUL bytes, so it is not text"),
    ("DIR", "is a folder, not a file"),
    ("HUGE", "more than the 10 MB"),
    (b"\n  \n# only comments\n", "has no prompts"),
])
def test_a_bad_prompts_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "prompts.txt"
    if content == "DIR":
        path.mkdir()
    elif content == "HUGE":
        with open(path, "wb") as f:
            f.truncate(11 * 2**20)  # sparse: costs no disk
    else:
        path.write_bytes(content)
    err = one_line_error(capsys, train.main, [*TINY, "--prompts", str(path), "--output-dir", str(tmp_path / "out")])
    assert message in err and str(path) in err
    assert not (tmp_path / "out").exists()


#### LoRA files

def test_a_lora_file_that_does_not_fit_names_the_first_mismatch(tmp_path, capsys, tiny_folder):
    from infra.lorafile import load_lora_file
    from lora import inject_lora, save_lora
    from models import load_video_model

    q_only = load_video_model(str(tiny_folder))
    inject_lora(q_only.unet, rank=2, targets=("to_q",))
    save_lora(q_only.unet, tmp_path / "q_only.safetensors")
    tensors = load_file(tmp_path / "q_only.safetensors")
    first = sorted(tensors)[0]
    save_file({**tensors, first: torch.zeros(2, 3)}, tmp_path / "bad_shape.safetensors", metadata={"rank": "2", "alpha": "2"})
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "q_only.safetensors").read_bytes()[:300])
    base = ["--model", str(tiny_folder), "--num-steps", "2", "--frames", "2", "--num-prompts", "1",
            "--output-dir", str(tmp_path / "out")]
    err = one_line_error(capsys, sample.main, [*base, "--lora", str(tmp_path / "cut.safetensors")])
    assert "is not a readable safetensors file" in err
    # sample.py injects adapters from the file's own keys, then names the first shape that does not fit.
    err = one_line_error(capsys, sample.main, [*base, "--lora", str(tmp_path / "bad_shape.safetensors")])
    assert f"{first} has shape (2, 3), the model needs" in err
    assert not (tmp_path / "out").exists()
    every = load_video_model(str(tiny_folder))
    inject_lora(every.unet, rank=2)  # all four projections: the q-only file lacks most of them
    with pytest.raises(UserError, match=r"adapters missing, 0 unexpected: the model has unet\..*to_k"):
        load_lora_file(every.unet, tmp_path / "q_only.safetensors")


#### Damaged checkpoints

@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, and a copy of its final LoRA."""
    out = tmp_path_factory.mktemp("runs") / "run"
    run_cli(train.main, [*TINY, "--max-steps", "4", "--save-every", "2", "--output-dir", str(out)])
    shutil.copy(out / "lora.safetensors", out.parent / "reference.safetensors")
    return out


def damage(ckpt, how):
    """Spoil one checkpoint the way real runs meet it."""
    if how == "cut lora":  # an interrupted copy
        data = (ckpt / "lora.safetensors").read_bytes()
        (ckpt / "lora.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "cut config":
        (ckpt / "config.json").write_text('{"model": "tiny", "heigh')
    elif how == "no state":
        (ckpt / "state.pt").unlink()
    elif how == "cut metrics":
        (ckpt / "metrics.csv").write_text((ckpt / "metrics.csv").read_text() + "5,0.5\n")
    elif how == "hostile state":  # a pickle that would run a command if it were unpickled
        class Payload:
            def __reduce__(self):
                return os.system, (f"touch {ckpt.parent.parent / 'PWNED'}",)

        torch.save({"step": 4, "optimizer": Payload(), "rng": {}}, ckpt / "state.pt")


@pytest.mark.parametrize("how,reason", [
    ("cut lora", "is not a readable safetensors file"),
    ("cut config", "is not valid JSON"),
    ("no state", "state.pt does not exist"),
    ("cut metrics", "line 6 does not have 10 cells"),
    ("hostile state", "holds something other than tensors and numbers; it was not loaded"),
])
def test_a_damaged_newest_checkpoint_is_skipped(four_steps, tmp_path, capsys, how, reason):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    damage(run / "checkpoints/step-000004", how)
    assert runlog.find_resume_point(run) == (run, run / "checkpoints/step-000002")
    warning = capsys.readouterr().err
    assert warning.startswith("warning: resuming from step-000002") and reason in warning and warning.count("\n") == 1
    assert not (run / "PWNED").exists()  # the hostile pickle never ran
    # Asked for by name, a damaged checkpoint is refused, not replaced by another.
    with pytest.raises(UserError, match=reason):
        runlog.find_resume_point(run / "checkpoints/step-000004")


def test_resume_from_the_newest_intact_checkpoint_is_exact(four_steps, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    damage(run / "checkpoints/step-000004", "hostile state")
    run_cli(train.main, ["--resume", str(run)])
    assert "warning: resuming from step-000002" in capsys.readouterr().err
    a, b = load_file(four_steps.parent / "reference.safetensors"), load_file(run / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runlog.list_checkpoints(run)[-1].name == "step-000004"
    runlog.check_checkpoint(run / "checkpoints/step-000004")  # rewritten whole
    assert not (run / "PWNED").exists()


def test_no_intact_checkpoint_refuses_and_changes_nothing(four_steps, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    damage(run / "checkpoints/step-000004", "cut lora")
    damage(run / "checkpoints/step-000002", "no state")
    before = snapshot(run)
    err = one_line_error(capsys, train.main, ["--resume", str(run)])
    assert "no intact checkpoint" in err and "tried step-000004: " in err and "| step-000002: " in err
    assert snapshot(run) == before


#### kill -9 at any moment, and a full disk

# train.py with a slow disk: each torch.save takes half a second longer, so a kill can land inside a save.
SLOW_SAVE = """
import runpy, sys, time, torch
save = torch.save
def slow_save(*args, **kwargs):
    save(*args, **kwargs)
    time.sleep(0.5)
torch.save = slow_save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_kill_9_at_any_moment_then_resume_gives_the_same_lora(four_steps, tmp_path):
    """Exact resume under kill -9: SIGKILL during a checkpoint save and at a random moment;
    every resumed run ends with the LoRA, bit for bit, and the metrics.csv (the `seconds` column
    aside) of the run that was never killed (`four_steps`: checkpoints do not change what is
    trained), although its metrics.csv was ahead of its checkpoint; no temporary file is left."""
    args = [*TINY, "--max-steps", "4", "--save-every", "1", "--keep-checkpoints", "2"]
    rng = random.Random(0)
    moments = {  # when to kill: once the condition holds, or a random time after the first checkpoint
        "during the save of step 2": lambda out: (out / "checkpoints/step-000002.tmp/lora.safetensors").exists(),
        # within 1.5 s of the first checkpoint: the three saves still to come sleep that long, so
        # the run is alive then however fast the machine is
        "at a random moment": rng.uniform(0.0, 1.5),
    }

    def run_and_kill(i, when):  # the runs go at once, each killed by its own thread
        out = tmp_path / f"killed-{i}"
        proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *args, "--output-dir", str(out)], cwd=ROOT,
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (out / "checkpoints/step-000001").is_dir() or proc.poll() is not None)
        if callable(moments[when]):
            wait_for(lambda: moments[when](out))
        else:
            time.sleep(moments[when])
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, f"the run ended before it was killed {when}"
        return out

    with ThreadPoolExecutor(len(moments)) as pool:
        killed = list(pool.map(run_and_kill, range(len(moments)), moments))
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    reference = load_file(four_steps.parent / "reference.safetensors")
    assert leftovers(killed[0]), "a kill during a save leaves its temporary folder behind"
    for when, out in zip(moments, killed):
        run_cli(train.main, ["--resume", str(out)])
        lora = load_file(out / "lora.safetensors")
        assert all(torch.equal(reference[k], lora[k]) for k in reference), when
        assert drop(read_metrics(out)) == drop(read_metrics(four_steps)), when
        assert leftovers(out) == [], when


@contextlib.contextmanager
def file_size_limit(limit):
    """In this process: files may grow to `limit` bytes; a bigger write fails with EFBIG, as on a
    full disk. Only the soft limit is lowered, so it can be raised back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_mid_save_keeps_the_previous_checkpoint(tmp_path, tiny_folder, capsys):
    run = tmp_path / "run"
    # A folder: nothing to write before training, unlike --model tiny (with the tiny model's recipe).
    args = [*TINY, "--model", str(tiny_folder), "--guidance", "3", "--grad-accum", "1", "--batch-size", "2"]
    run_cli(train.main, [*args, "--max-steps", "1", "--save-every", "1", "--output-dir", str(run)])
    lora_size = (run / "lora.safetensors").stat().st_size  # the LoRA fits; the optimizer state, twice its size, does not
    capsys.readouterr()
    with file_size_limit(lora_size + 4096), pytest.raises(SystemExit) as exit_:
        run_cli(train.main, ["--resume", str(run), "--max-steps", "2"])
    stderr = capsys.readouterr().err  # the progress bar's, then the error's line
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    err = errors[0]
    assert err.startswith("error: could not write ") and "step-000002" in err and "the disk holding" in err, err
    assert "the previous checkpoint" in err and "step-000001 is intact" in err
    assert [p.name for p in runlog.list_checkpoints(run)] == ["step-000001"] and leftovers(run) == []
    runlog.check_checkpoint(run / "checkpoints/step-000001")
    run_cli(train.main, ["--resume", str(run), "--max-steps", "2"])  # space again: the run goes on
    assert [int(r["step"]) for r in read_metrics(run)] == [1, 2]
