"""A fixed-seed tiny run gives what the reference code gave: behaviour changes only on purpose.

tests/fixtures/tiny_reference/ holds the lora.safetensors, metrics.csv and config.json that the
command below wrote. The command covers gradient accumulation, random K, two decoded frames,
guidance and held-out evaluation. When the files took their present layout (one step function,
the reward registry, the packages below the tutorial), the new code repeated the reference
written by the old code bit for bit. The reference was recorded again when guidance's two passes
became two UNet calls in grad steps (sampler.guided_output): the same arithmetic, rounded
differently by a batched kernel (relative changes up to 7e-5 in metrics.csv, none in the K drawn
each step). It was recorded a third time at 16x16 pixels instead of 32x32, by the code that had
just repeated the 32x32 reference, so that the test runs in a third of the time. The reference
scored its held-out videos with the default evaluation reward (`dynamics`), the command here with
two (`--eval-rewards`): the LoRA and the training columns must still be the reference's, since
evaluation never touches the training. Floats are compared to 1e-5, so another CPU's kernels may
differ in the last bits while a change of behaviour (one random draw more or less, a step taken
differently) fails; the integer columns (K drawn each step, skipped steps) must match exactly.
"""

import csv
import json

import torch
from conftest import ROOT
from safetensors.torch import load_file

import train
from infra.cli import run_cli

REFERENCE = ROOT / "tests" / "fixtures" / "tiny_reference"
COMMAND = ["--model", "tiny", "--reward", "brightness", "--prompts", "animals.txt", "--num-steps", "4", "--frames", "4",
           "--num-videos", "2", "--max-steps", "4", "--grad-accum", "2", "--grad-steps", "2", "--random-grad-steps",
           "--decode-frames", "2", "--eval-every", "2", "--eval-videos", "2", "--lora-rank", "4", "--height", "16",
           "--width", "16"]
EVAL_REWARDS = "colorfulness,dynamics"  # the reference's: "dynamics"


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fixed_seed_run_matches_the_reference(tmp_path):
    out = tmp_path / "run"
    run_cli(train.main, [*COMMAND, "--eval-rewards", EVAL_REWARDS, "--output-dir", str(out)])
    config, reference = (json.loads((d / "config.json").read_text()) for d in (out, REFERENCE))
    newer = {"negative_prompt": "", "tracker_project": ""}  # fields newer than the reference, at the values that change nothing
    assert {**config, "output_dir": ""} == {**reference, "output_dir": "", "eval_rewards": EVAL_REWARDS, **newer}
    ours, theirs = rows(out / "metrics.csv"), rows(REFERENCE / "metrics.csv")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == ["0", "1", "2", "3", "4"]
    for a, b in zip(ours, theirs):
        assert (a["grad_steps"], a["skipped"], a["lr"]) == (b["grad_steps"], b["skipped"], b["lr"])
        for k in ("reward_mean", "reward_std", "loss", "grad_norm", "eval_reward"):
            assert (a[k] == "") == (b[k] == ""), k
            if a[k]:
                torch.testing.assert_close(float(a[k]), float(b[k]), rtol=1e-5, atol=1e-7, msg=k)
        assert (a["eval_colorfulness"] != "") == (a["eval_dynamics"] != "") == (b["eval_reward"] != "")
    lora, ref = load_file(out / "lora.safetensors"), load_file(REFERENCE / "lora.safetensors")
    assert lora.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(lora[k], ref[k], rtol=1e-5, atol=1e-7)
