"""Inputs no earlier check named: a misspelt word, a weight that is not finite, a path the operating
system refuses, a failed allocation on the CPU, --overwrite of a folder that holds no run, a LoRA of
another base, a checkpoint whose files disagree. Each costs one line on stderr and exit status 2 (or,
for a LoRA of another base whose shapes fit, one warning), before the work it guards, and leaves
every file as it was; after a failed allocation the corrected command starts again in the same folder."""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_files import TINY, one_line_error

import bench
import sample
import train
import vader
from infra import runlog
from infra.checks import check_choices, check_flags
from infra.cli import UserError, run_cli
from infra.folder import check_run_folder
from infra.setup import checkpoint_config, is_out_of_memory
from reward_models.options import parse_options, parse_reward_spec
from toy import evaluate, pretrain, train_judge

# One video of 2 frames of 16x16, one per step: what these tests check is the same at any size.
SMALL = [*TINY, "--num-videos", "1", "--batch-size", "1", "--grad-accum", "1"]
CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes"
LONG_NAME = "n" * 300  # over NAME_MAX (255 bytes)


def tree(folder):
    """Every entry under `folder`, links not followed: a file's sha256, a link's target, 'dir'."""
    seen = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(top, name)
            seen[str(p.relative_to(folder))] = ("-> " + os.readlink(p) if p.is_symlink() else "dir" if p.is_dir()
                                                else hashlib.sha256(p.read_bytes()).hexdigest())
    return seen


def long_path(tmp_path):
    """A path over PATH_MAX (4096 bytes) made of names that each fit."""
    return str(tmp_path / "/".join(["p" * 200] * 21))


def raise_oom(*args, **kwargs):
    raise RuntimeError(CPU_OOM)


def last_line_error(capsys, main, argv):
    """As one_line_error, for a run stopped after its progress bar began (on a terminal the bar's line is
    cleared, so the error is the one line left): exit 2, no traceback, the error the last line."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    err = capsys.readouterr().err
    last = re.split(r"[\r\n]", err.strip())[-1]  # a bar redraws its line with carriage returns
    assert exit_.value.code == 2 and last.startswith("error: ") and "Traceback" not in err, err
    return last


#### 4. A failed allocation on the CPU (first, as its fixture is the run the other tests read)

@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    """A run whose first step failed to allocate CPU memory, then the corrected command (smaller
    batch, more accumulation) in the same folder: (folder, the failed run's stderr and exit status)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    argv = [*SMALL, "--max-steps", "2", "--save-every", "1", "--output-dir", str(out)]
    original = train.train_step
    train.train_step = raise_oom
    try:
        with pytest.raises(SystemExit) as failed:
            run_cli(train.main, [*argv, "--batch-size", "2"])
    finally:
        train.train_step = original
    left = sorted(p.name for p in out.iterdir())
    run_cli(train.main, [*argv, "--batch-size", "1", "--grad-accum", "2"])
    return out, failed.value.code, left


def test_out_of_cpu_memory_is_one_line_and_the_corrected_command_starts_again(recovered, capsys):
    out, code, left = recovered
    assert code == 2
    assert runlog.list_checkpoints(out)[-1].name == "step-000002" and (out / "lora.safetensors").is_file()
    assert left == [".lock", "config.json", "videos"]  # the lock released (the second run took it), no checkpoint
    assert json.loads((out / "config.json").read_text())["grad_accum"] == 2  # the corrected run's settings


def test_out_of_cpu_memory_message(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(train, "train_step", raise_oom)
    err = last_line_error(capsys, train.main, [*SMALL, "--max-steps", "1", "--output-dir", str(out)])
    assert "out of CPU memory (RAM) at 2x16x16 before the first step finished; lower it with --decode-frames 1" in err
    assert "then the same command starts the run again" in err
    assert check_run_folder(out, "", False) == "restart"  # what that same command will find
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) and not is_out_of_memory(RuntimeError("x"))


def test_out_of_memory_while_loading_leaves_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "run"
    monkeypatch.setattr(train, "load_models", raise_oom)
    err = one_line_error(capsys, train.main, [*SMALL, "--output-dir", str(out)])
    assert "out of CPU memory (RAM) at 2x16x16 while loading" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []  # the folders made for the run, and its lock, are gone


def test_out_of_memory_after_a_checkpoint_says_resume(recovered, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(recovered[0], run)
    monkeypatch.setattr(train, "train_step", raise_oom)
    err = last_line_error(capsys, train.main, ["--resume", str(run), "--max-steps", "3"])
    assert "after step 2" in err and f"then --resume {run} continues from its checkpoint step-000002" in err


def test_sample_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(vader, "generate", raise_oom)
    err = last_line_error(capsys, sample.main, ["--model", "tiny", "--num-prompts", "1", "--frames", "2",
                                               "--output-dir", str(tmp_path / "out")])
    assert "out of CPU memory (RAM); lower it with a smaller --height/--width or --frames" in err
    assert not (tmp_path / "out").exists()


#### 1. A flag that takes one of a few words, misspelt

@pytest.mark.parametrize("args,message", [
    (["--dtype", "bfloat61"], "--dtype takes auto, float32, bfloat16 or float16, got 'bfloat61'; did you mean bfloat16?"),
    (["--dtype", "float64"], "--dtype takes auto, float32, bfloat16 or float16, got 'float64'"),
    (["--report-to", "wandbb"], "--report-to takes wandb or tensorboard, got 'wandbb'; did you mean wandb?"),
    (["--device", "cuda:x"], "--device takes auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
    (["--device", "CPU"], "--device takes auto, cpu, cuda, cuda:N or mps, got 'CPU'"),
])
def test_train_refuses_a_misspelt_word_with_the_choices(tmp_path, capsys, args, message):
    assert message in one_line_error(capsys, train.main, [*SMALL, *args, "--output-dir", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_word_is_refused_before_a_models_configs_are_read(tmp_path, capsys):
    # A hub id offline would be refused for its configs; the typo is found first, in a second.
    err = one_line_error(capsys, train.main, ["--model", "some-org/not-here", "--dtype", "bfloat61",
                                              "--output-dir", str(tmp_path / "out")])
    assert "--dtype takes" in err


def test_a_checkpoint_config_with_a_misspelt_word_is_not_a_runs_settings(recovered):
    config = json.loads((runlog.list_checkpoints(recovered[0])[-1] / "config.json").read_text())
    checkpoint_config(config, train.Config)
    with pytest.raises(UserError, match="--dtype takes"):
        checkpoint_config({**config, "dtype": "bfloat61"}, train.Config)
    with pytest.raises(UserError, match="reward weight 'nan'"):
        checkpoint_config({**config, "reward": "brightness:nan"}, train.Config)


@pytest.mark.parametrize("argv,message", [
    (["speed", "--device", "cuda:x"], "--device takes auto, cpu, cuda, cuda:N or mps"),
    (["efficiency", "--device", "gpu"], "--device takes auto, cpu, cuda, cuda:N or mps"),
])
def test_bench_refuses_a_misspelt_device(tmp_path, capsys, argv, message):
    assert message in one_line_error(capsys, bench.main, [*argv, "--output-dir", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_check_choices_leaves_a_flag_not_typed_alone():
    check_choices(train.Config())  # the defaults: dtype auto, report_to ''
    with pytest.raises(UserError, match="--report-to takes wandb or tensorboard, got 'WANDB'; did you mean wandb"):
        check_flags(train.Config(report_to="WANDB"))


#### 2. Weights and options that are not finite numbers

@pytest.mark.parametrize("spec,message", [
    ("aesthetic:nan", "reward weight 'nan' in 'aesthetic:nan' is not a finite number"),
    ("hps:inf", "reward weight 'inf' in 'hps:inf' is not a finite number"),
    ("aesthetic:1e999", "reward weight '1e999' in 'aesthetic:1e999' is not a finite number"),
    ("aesthetic:-inf,hps:1", "reward weight '-inf' in 'aesthetic:-inf,hps:1' is not a finite number"),
    ("aesthetic:,hps:1", "reward weight '' in 'aesthetic:,hps:1' is not a number"),
    ("aesthetic:abc", "reward weight 'abc' in 'aesthetic:abc' is not a number"),
])
def test_a_reward_weight_must_be_a_finite_number(spec, message):
    with pytest.raises(UserError, match=message):
        parse_reward_spec(spec)


def test_reward_weights_and_options_are_checked_before_the_folder_is_claimed(tmp_path, capsys):
    out = tmp_path / "out"
    assert "is not a finite number" in one_line_error(capsys, train.main, [*SMALL, "--reward", "brightness:nan",
                                                                           "--output-dir", str(out)])
    err = one_line_error(capsys, train.main, [*SMALL, "--reward", "tiny_videoreward", "--reward-options", "vq=inf",
                                              "--output-dir", str(out)])
    assert "--reward-options vq=inf: not a finite number" in err
    assert list(tmp_path.iterdir()) == []
    assert parse_reward_spec("brightness:-0.5,colorfulness:2") == [("brightness", -0.5), ("colorfulness", 2.0)]


@pytest.mark.parametrize("text", ["vq=nan", "mq=inf", "ta=-infinity", "max_pixels=1e999"])
def test_a_reward_option_that_reads_as_a_number_must_be_finite(text):
    with pytest.raises(UserError, match="not a finite number"):
        parse_options(text)


def test_an_option_whose_default_is_a_number_takes_only_a_number():
    from rewards import load_reward

    with pytest.raises(UserError, match="reward 'tiny_videoreward' takes a number for vq"):
        load_reward("tiny_videoreward", **parse_options("vq=abc"))
    assert parse_options("label=dancing,log_prob=true,vq=2") == {"label": "dancing", "log_prob": True, "vq": 2}


#### 3. A path the operating system refuses

def path_cases(tmp_path, lora):
    """(main, argv, what the message names) for every flag that names a path a script reads or writes."""
    out = ["--output-dir", str(tmp_path / "out")]
    long_name, too_long = str(tmp_path / LONG_NAME), long_path(tmp_path)
    return [
        (train.main, [*SMALL, "--output-dir", long_name], "is 300 bytes, more than the 255 a file name may have"),
        (train.main, [*SMALL, "--output-dir", too_long], "more than the 4096 a path may have; choose a shorter"),
        (train.main, [*SMALL, "--output-dir", "/proc/vader-run"], "/proc is on proc (mounted at /proc), one of the "
                                                                  "kernel's virtual file systems"),
        (train.main, [*SMALL, "--output-dir", "/sys/vader-run"], "/sys is on sysfs"),
        (train.main, [*SMALL, "--prompts", long_name, *out], "prompts file"),
        (train.main, [*SMALL, "--prompts", too_long, *out], "more than the 4096 a path may have"),
        (train.main, [*SMALL, "--eval-every", "1", "--eval-prompts", long_name, *out], "is 300 bytes"),
        (train.main, ["--resume", long_name], "--resume"),
        (train.main, ["--resume", too_long], "--resume"),
        (sample.main, ["--model", "tiny", "--lora", long_name, *out], "LoRA file"),
        (sample.main, ["--model", "tiny", "--lora", lora, "--output-dir", "/proc/vader-samples"], "/proc is on proc"),
        (sample.main, ["--model", "tiny", "--lora", lora, "--export-merged", long_name], "--export-merged"),
        (sample.main, ["--model", "tiny", "--lora", lora, "--export-merged", str(tmp_path / ("e" * 250))],
         "less 14 for the temporary name made from it"),
        (sample.main, ["--model", "tiny", "--lora", lora, "--export-merged", "/sys/merged"], "/sys is on sysfs"),
        (evaluate.main, ["--lora", long_name], "LoRA file"),
        (pretrain.main, ["--out", "/proc/toy"], "/proc is on proc"),
        (pretrain.main, ["--out", long_name], "--out"),
        (train_judge.main, ["--out", long_name], "--out"),
        (bench.main, ["speed", "--output-dir", long_name], "--output-dir"),
        (bench.main, ["compare", "--output-dir", too_long], "--output-dir"),
    ]


def test_a_path_the_operating_system_refuses_is_one_line_before_work(recovered, tmp_path, capsys):
    lora = str(recovered[0] / "lora.safetensors")
    for main, argv, message in path_cases(tmp_path, lora):
        err = one_line_error(capsys, main, argv)
        assert message in err, (argv[-2:], err)
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_path_under_proc_is_one_line(tmp_path, capsys):
    """/proc/1/root is the first process's root: not ours to look into (a PermissionError for stat)."""
    target = "/proc/1/root/vader-prompts.txt"
    try:
        os.stat(target)
    except PermissionError:
        pass
    else:
        pytest.skip("this machine lets this user look into /proc/1/root")
    err = one_line_error(capsys, train.main, [*SMALL, "--prompts", target, "--output-dir", str(tmp_path / "out")])
    assert f"prompts file {target}: the operating system refuses to look at it" in err
    assert "the operating system refuses to look at it" in one_line_error(capsys, train.main, ["--resume", target])


#### 5. --overwrite of a folder that holds no run

def test_overwrite_of_a_folder_that_holds_no_run_is_refused(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes\n")
    before = tree(tmp_path)
    err = one_line_error(capsys, train.main, [*SMALL, "--overwrite", "--output-dir", str(mine)])
    assert f"--overwrite replaces only a run, and {mine} holds no run of train.py but data and 1 more" in err
    assert "leave out --overwrite" in err
    assert tree(tmp_path) == before
    (tmp_path / "empty").mkdir()
    assert check_run_folder(tmp_path / "empty", "", True) == ""  # nothing there to lose
    (tmp_path / "empty" / ".lock").write_text("")  # what an earlier claim left: not a user's file
    assert check_run_folder(tmp_path / "empty", "", True) == ""
    assert check_run_folder(mine, "", False) == ""  # without --overwrite a run may go beside a user's files


#### 6. A LoRA of another base, by every entry point that loads one

def test_toy_evaluate_warns_of_a_lora_of_another_base(recovered, capsys, monkeypatch):
    """The tiny model's LoRA fits the toy model's shapes: measured, with a warning, as sample.py does."""
    monkeypatch.setattr(evaluate, "sample_model", lambda model, captions, *a, **k: torch.zeros(len(captions), 2, 3, 4, 4))
    run_cli(evaluate.main, ["--lora", str(recovered[0] / "lora.safetensors"), "--split", "heldout", "--repeats", "1"])
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("warning: ")
    assert "was trained on tiny, and is loaded into" in captured.err and "toy" in captured.err
    assert "heldout" in captured.out


#### 7. A checkpoint whose config.json disagrees with its own files

def spoil(ckpt, how):
    config = json.loads((ckpt / "config.json").read_text())
    if how == "rank":
        config["lora_rank"] = 8
    elif how == "alpha":
        config["lora_alpha"] = 3.0
    elif how == "model":
        config["model"] = "toy"
    else:  # AdamW's moments of another LoRA
        state = torch.load(ckpt / "state.pt", weights_only=True)
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 5)
        torch.save(state, ckpt / "state.pt")
    (ckpt / "config.json").write_text(json.dumps(config, indent=2) + "\n")


@pytest.mark.parametrize("how,reason", [
    ("rank", "has lora_rank 8, but its lora.safetensors is of rank 16"),
    ("alpha", "has lora_alpha 3.0, but its lora.safetensors has alpha 16"),
    ("model", "has the model toy, but its lora.safetensors was trained on tiny"),
    ("moments", "holds AdamW's moments of"),
])
def test_a_checkpoint_whose_config_disagrees_with_its_files_is_skipped(recovered, tmp_path, capsys, how, reason):
    run = tmp_path / "run"
    shutil.copytree(recovered[0], run)
    spoil(run / "checkpoints" / "step-000002", how)
    check = lambda values: checkpoint_config(values, train.Config)  # noqa: E731
    assert runlog.find_resume_point(run, check) == (run, run / "checkpoints" / "step-000001")
    warning = capsys.readouterr().err
    assert warning.startswith("warning: resuming from step-000001") and reason in warning and warning.count("\n") == 1
    with pytest.raises(UserError, match=reason):  # asked for by name, it is refused
        runlog.find_resume_point(run / "checkpoints" / "step-000002", check)


def test_no_checkpoint_that_agrees_with_itself_refuses_the_resume(recovered, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(recovered[0], run)
    spoil(run / "checkpoints" / "step-000002", "rank")
    spoil(run / "checkpoints" / "step-000001", "model")
    before = tree(run)
    err = one_line_error(capsys, train.main, ["--resume", str(run)])
    assert "no intact checkpoint" in err and "lora_rank 8" in err and "the model toy" in err
    assert tree(run) == before
    a = load_file(recovered[0] / "lora.safetensors")
    assert a.keys() == load_file(run / "lora.safetensors").keys()


#### Other flags of the entry points that met no check

@pytest.mark.parametrize("main,argv,message", [
    (evaluate.main, ["--seed", str(2**40)], "--seed must be a whole number from 0 to 4294967295"),
    (evaluate.main, ["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (evaluate.main, ["--model", "nope"], "unknown model 'nope'"),
    (pretrain.main, ["--batch", "0"], "--batch must be a whole number >= 1, got 0"),
    (pretrain.main, ["--vae-lr", "inf"], "--vae-lr must be a finite number above 0 and at most 1"),
    (pretrain.main, ["--unet-steps", "0"], "--unet-steps must be a whole number >= 1"),
    (train_judge.main, ["--steps", "0"], "--steps must be a whole number >= 1"),
    (train_judge.main, ["--lr", "nan"], "--lr must be a finite number above 0 and at most 1"),
    (bench.main, ["memory", "--num-steps", "100000"], "--num-steps must be a whole number from 1 to 1000"),
    (bench.main, ["efficiency", "--eta", "nan"], "--eta must be a finite number above 0, got nan"),
    (bench.main, ["efficiency", "--lr-grid", "1e-3", "inf"], "--lr-grid values must be finite numbers above 0, got inf"),
    (bench.main, ["efficiency", "--seeds", "0", str(2**40)], "--seeds must be whole numbers from 0 to 4294967295"),
    (bench.main, ["efficiency", "--guidance", "-1"], "--guidance must be a finite number >= 0, got -1.0"),
])
def test_other_flags_are_one_line(tmp_path, capsys, main, argv, message):
    assert message in one_line_error(capsys, main, argv)


def test_toy_scripts_never_replace_a_folder_or_file_they_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    before = tree(tmp_path)
    err = one_line_error(capsys, pretrain.main, ["--out", str(mine)])
    assert "holds notes.txt, so it is not a model toy/pretrain.py wrote; it would be replaced whole" in err
    assert "is a file" in one_line_error(capsys, pretrain.main, ["--out", str(mine / "notes.txt")])
    assert "is a folder" in one_line_error(capsys, train_judge.main, ["--out", str(mine)])
    assert tree(tmp_path) == before
