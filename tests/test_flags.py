"""train.py's and sample.py's spellings of a flag (--max_steps, diffusers' --max_train_steps) and
--config FILE, a run's own config.json as the defaults under the flags typed."""
import csv
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import sample
import train
from conftest import ROOT
from infra.cli import UserError, run_cli
from infra.setup import DIFFUSERS_FLAGS, parse_flags

TINY = ["--model", "tiny"]
# 16x16, 4 frames, 4 sampler steps (tests/test_scripts.py's FAST), one before/after video
FAST = [*TINY, "--prompts", "animals.txt", "--num-steps", "4", "--frames", "4", "--num-videos", "1",
        "--height", "16", "--width", "16", "--reward", "brightness", "--eval-rewards", ""]


def flags(*argv):
    return parse_flags(train.Config, list(argv), "")


def config(*argv):
    return train.parse_config([*TINY, *argv])[0]


def test_every_flag_takes_its_underscore_spelling():
    for f in train.Config.__dataclass_fields__.values():
        if "_" not in f.name:
            continue
        if f.type is bool:
            assert flags(f"--{f.name}") == {f.name: True}
            assert flags(f"--no_{f.name}") == {f.name: False}
            assert flags(f"--no-{f.name.replace('_', '-')}") == {f.name: False}
        else:
            value = {int: "3", float: "0.5", str: {"resume": "latest", "report_to": "wandb"}.get(f.name, "x")}[f.type]
            assert flags(f"--{f.name}", value) == flags(f"--{f.name.replace('_', '-')}", value) == \
                {f.name: f.type(value)}, f.name
    assert config("--no_low_memory").low_memory is False and config("--max_steps=5").max_steps == 5


@pytest.mark.parametrize("argv, field, value", [
    (["--max_train_steps", "7"], "max_steps", 7),
    (["--learning_rate", "1e-3"], "lr", 1e-3),
    (["--gradient_accumulation_steps", "4"], "grad_accum", 4),
    (["--train_batch_size", "3"], "batch_size", 3),
    (["--resume_from_checkpoint", "latest"], "resume", "latest"),
    (["--resume_from_checkpoint"], "resume", "latest"),
    (["--resume_from_checkpoint", "runs/a/checkpoints/step-000002"], "resume", "runs/a/checkpoints/step-000002"),
    (["--mixed_precision", "no"], "dtype", "float32"),
    (["--mixed_precision", "fp16"], "dtype", "float16"),
    (["--mixed_precision", "bf16"], "dtype", "bfloat16"),
    (["--seed", "5"], "seed", 5),
    (["--output_dir", "runs/x"], "output_dir", "runs/x"),
    (["--rank", "8"], "lora_rank", 8),
    (["--report_to", "wandb"], "report_to", "wandb"),
    (["--checkpointing_steps", "50"], "save_every", 50),
    (["--checkpoints_total_limit", "2"], "keep_checkpoints", 2),
    (["--max_grad_norm", "0.5"], "grad_clip", 0.5),
    (["--adam_weight_decay", "0.1"], "weight_decay", 0.1),
])
def test_diffusers_names_reach_their_field(argv, field, value):
    assert flags(*argv) == {field: value}


def test_a_diffusers_launch_line_is_our_config():
    theirs = config("--max_train_steps", "2", "--learning_rate", "1e-3", "--gradient_accumulation_steps", "1",
                    "--train_batch_size", "1", "--mixed_precision", "no", "--output_dir", "X")
    ours = config("--max-steps", "2", "--lr", "1e-3", "--grad-accum", "1", "--batch-size", "1", "--dtype", "float32",
                  "--output-dir", "X")
    assert theirs == ours
    assert len(DIFFUSERS_FLAGS) == 11


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "2", "--max_train_steps", "3"], "--max-steps 2 and --max_train_steps 3"),
    (["--max-steps", "2", "--max_steps", "3"], "--max-steps 2 and --max_steps 3"),
    (["--dtype", "bfloat16", "--mixed_precision", "fp16"], "--dtype bfloat16 and --mixed_precision fp16"),
    (["--low-memory", "--no_low_memory"], "--low-memory and --no_low_memory"),
    (["--resume", "--resume_from_checkpoint", "runs/a"], "--resume latest and --resume_from_checkpoint runs/a"),
])
def test_two_spellings_that_disagree_are_refused(argv, message):
    with pytest.raises(UserError, match="^" + message + " are two spellings of one setting"):
        flags(*argv)
    assert flags("--max-steps", "2", "--max_train_steps", "2", "--lr", "0.001", "--learning_rate", "1e-3") == \
        {"max_steps": 2, "lr": 1e-3}  # the same value twice is no conflict


def test_sample_takes_underscore_spellings():
    args = sample.parse_args(["--num_prompts", "2", "--output_dir=out_1", "--side_by_side", "--num_steps", "3"])
    assert (args.num_prompts, args.output_dir, args.side_by_side, args.num_steps) == (2, "out_1", True, 3)


def write(path, values):
    path.write_text(json.dumps(values))
    return str(path)


def test_config_file_sits_between_the_recipe_and_the_typed_flags(tmp_path):
    recipe = config()
    path = write(tmp_path / "c.json", {"lr": 0.5, "max_steps": 9, "seed": 3, "output_dir": "runs/old",
                                       "resume": "latest", "overwrite": True})
    cfg = config("--config", path, "--seed", "4", "--max_train_steps", "8")
    assert (cfg.lr, cfg.max_steps, cfg.seed) == (0.5, 8, 4)  # the file over the tiny recipe's lr, flags over both
    assert (cfg.grad_accum, cfg.batch_size) == (recipe.grad_accum, recipe.batch_size)  # the recipe under the file
    assert (cfg.output_dir, cfg.resume, cfg.overwrite) == ("runs/tiny-aesthetic", "", False)  # never from the file
    # the file's model picks the registry entry (and its recipe) when --model is not typed
    picked = train.parse_config(["--config", write(tmp_path / "m.json", {"model": "tiny", "frames": 4})])[0]
    assert (picked.model, picked.frames, picked.height, picked.lr) == ("tiny", 4, 32, recipe.lr)


@pytest.mark.parametrize("values, message", [
    ({"max_steps": 2, "learning_rate": 1e-3}, r"unknown field 'learning_rate'"),
    ({"lr": "fast"}, r"its lr is 'fast', not a float value"),
    ({"max_steps": 2.5}, r"its max_steps is 2.5, not a int value"),
    ({"grad_steps": 0}, r"--grad-steps must be"),
    ({"dtype": "bfloat61"}, r"--dtype takes"),
])
def test_a_bad_config_file_is_refused_in_one_line(tmp_path, values, message):
    path = write(tmp_path / "c.json", values)
    with pytest.raises(UserError, match=f"^--config {path}: .*{message}") as e:
        config("--config", path)
    assert "\n" not in str(e.value)


def test_config_file_with_resume_is_refused(tmp_path):
    with pytest.raises(UserError, match="--config and --resume"):
        config("--config", write(tmp_path / "c.json", {}), "--resume")


@pytest.mark.slow  # two training runs
def test_a_run_repeated_from_its_config_json_gives_the_same_lora(tmp_path, capsys):
    first, second = tmp_path / "X", tmp_path / "Y"
    run_cli(train.main, [*FAST, "--max-steps", "2", "--seed", "1", "--output-dir", str(first)])
    run_cli(train.main, ["--config", str(first / "config.json"), "--output-dir", str(second)])
    assert json.loads((second / "config.json").read_text()) == \
        {**json.loads((first / "config.json").read_text()), "output_dir": str(second)}
    # bit for bit: every tensor and the metadata (safetensors writes the metadata's keys in no fixed order,
    # so the files' bytes may differ there)
    with safe_open(first / "lora.safetensors", "pt") as a, safe_open(second / "lora.safetensors", "pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), k
    rows = [[{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(run / "metrics.csv"))]
            for run in (first, second)]
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_help_prints_the_defaults():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--max-steps INT Optimizer steps to train for. [default: 200]" in text
    assert "--lr FLOAT" in text and "[default: 0.0002]" in text and "--config FILE" in text
    assert "--max_steps" not in text.split("Every flag")[0]  # the aliases are not listed one by one
    assert "underscore spelling" in text and "--max_train_steps (= --max-steps)" in text
