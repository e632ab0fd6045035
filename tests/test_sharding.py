"""--shard: FSDP2 across processes, proved on the CPU with gloo, and wan-14b's real size.

The multi-process tests start `torchrun --standalone --nproc_per_node=2` on the real train.py
(about two minutes in all on 2 cores); they are marked slow and run as the second command of
.ci/run: `python -m pytest -q tests -m slow`.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
# Three optimizer steps of the tiny models, global batch 2: one process with 2 videos, or 2 with 1.
COMMON = ["--reward", "colorfulness", "--eval-every", "0", "--num-videos", "1", "--max-steps", "3"]
# Float32 on the CPU: the same global batch on 1 or 2 processes sums the gradients in another
# order, and AdamW's normalised step turns those last-bit differences into up to ~2e-5 on weights of ~0.2.
ATOL = 5e-5


def train(out, *flags, processes=1, check=True):
    """Run train.py (under torchrun for several processes); returns the CompletedProcess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), str(ROOT / "train.py"), *COMMON,
               "--output-dir", str(out), *flags]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def lora(run):
    return load_file(Path(run) / "lora.safetensors")


def max_difference(a, b):
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


#### Fast: what needs no second process

def test_wan_14b_real_size_on_the_meta_device():
    from benchmarks.architectures import build_architecture
    from lora import inject_lora
    from models import MODELS

    transformer, vae, text = build_architecture("wan-14b")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(transformer) == 14_288_491_584  # 28.58 GB of bf16, the published 28.6 GB
    assert len(transformer.blocks) == 40 and count(transformer.blocks[0]) == 351_394_304
    assert count(vae) == 126_892_531 and count(text) == 5_680_910_336  # the 1.3B's VAE and UMT5
    lora_params = inject_lora(transformer, rank=16, targets=MODELS["wan-14b"].lora_targets)
    assert sum(p.numel() for p in lora_params) == 40 * 8 * 16 * (5120 + 5120)
    spec = MODELS["wan-14b"]
    assert (spec.source, spec.height, spec.width, spec.frames, spec.num_steps, spec.guidance) == \
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", 480, 832, 81, 50, 5.0)
    assert spec.scheduler == {"flow_shift": 3.0} and spec.family == "wan"


def test_an_older_torch_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    import train
    from infra.cli import run_cli

    monkeypatch.setattr(torch, "__version__", "2.7.1+cu126")
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, ["--model", "tiny", "--shard", "--output-dir", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--shard needs torch 2.10 or newer" in err and "2.7.1" in err
    assert not (tmp_path / "run").exists()


class Runs:
    """A pickle that runs code when it is loaded: what a hostile checkpoint would hold."""

    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_checkpoint_metadata_that_names_code_is_refused(tmp_path):
    from infra.cli import UserError
    from infra.sharding import read_metadata

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Runs()))
    with pytest.raises(UserError, match="posix.system is not allowed|os.system is not allowed"):
        read_metadata(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"cut sh")
    with pytest.raises(UserError, match="no readable sharded-state metadata"):
        read_metadata(tmp_path)


def test_one_process_with_shard_writes_a_sharded_checkpoint_it_reads_back(tmp_path):
    """--shard without torchrun: the same training (nothing is split), checkpoints through DCP, and
    the metadata reader accepts what DCP writes."""
    import torch.distributed.checkpoint as dcp

    import train
    from infra.cli import run_cli
    from infra.sharding import SafeReader, read_metadata

    run_cli(train.main, ["--model", "tiny", *COMMON, "--max-steps", "1", "--shard", "--num-steps", "2",
                         "--frames", "2", "--height", "16", "--width", "16", "--output-dir", str(tmp_path / "run")])
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    keys = set(read_metadata(ckpt / "sharded").state_dict_metadata)
    assert any(k.startswith("lora.") and k.endswith("lora_A.weight") for k in keys)
    assert any(k.startswith("optimizer.state.") and k.endswith("exp_avg_sq") for k in keys)
    assert not any(".base." in k for k in keys)  # the frozen weights are not written
    assert "optimizer" not in torch.load(ckpt / "state.pt", weights_only=True)  # it is in sharded/
    saved = lora(ckpt)
    state = {"lora": {k.removeprefix("unet."): torch.empty_like(v) for k, v in saved.items()}}
    dcp.load(state, storage_reader=SafeReader(ckpt / "sharded"), no_dist=True)
    assert max_difference({f"unet.{k}": v for k, v in state["lora"].items()}, saved) == 0


#### Slow: two processes on gloo

@pytest.fixture(scope="module")
def wan_runs(tmp_path_factory):
    """The tiny Wan trained 3 steps on the same global batch: on one process, under DDP and under
    --shard on two; and --shard cut at step 2, then resumed on two processes and on one."""
    root = tmp_path_factory.mktemp("sharding")
    tiny = ["--model", "tiny-wan"]
    train(root / "one", *tiny, "--batch-size", "2")
    train(root / "ddp", *tiny, "--batch-size", "1", processes=2)
    train(root / "shard", *tiny, "--batch-size", "1", "--shard", processes=2)
    train(root / "cut", *tiny, "--batch-size", "1", "--shard", "--max-steps", "2", processes=2)
    shutil.copytree(root / "cut", root / "cut-on-one")
    train(root / "cut", "--resume", processes=2)
    train(root / "cut-on-one", "--resume", "--batch-size", "2")
    return root


@pytest.mark.slow
def test_sharded_training_equals_one_process_and_ddp(wan_runs):
    one = lora(wan_runs / "one")
    assert max(v.abs().max().item() for v in one.values()) > 0.05  # it trained
    assert max_difference(lora(wan_runs / "ddp"), one) < ATOL
    assert max_difference(lora(wan_runs / "shard"), one) < ATOL
    with safe_open(wan_runs / "one" / "lora.safetensors", "pt") as a, \
            safe_open(wan_runs / "shard" / "lora.safetensors", "pt") as b:
        assert a.metadata() == b.metadata()  # the same file: PEFT layout, transformer. prefix, rank, alpha, base


@pytest.mark.slow
def test_sharded_resume_is_exact_on_the_same_world_size(wan_runs):
    assert max_difference(lora(wan_runs / "cut"), lora(wan_runs / "shard")) == 0
    rows = lambda run: (Path(run) / "metrics.csv").read_text().splitlines()  # noqa: E731
    cut = lambda line: line.rsplit(",", 1)[0]  # noqa: E731  (the seconds column aside)
    assert [cut(r) for r in rows(wan_runs / "cut")] == [cut(r) for r in rows(wan_runs / "shard")]


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_another_world_size(wan_runs):
    """2 processes -> 1 with the same global batch: the restored state is exact (DCP reshards it),
    the steps after it equal the 2-process run's to float32 summation order."""
    assert max_difference(lora(wan_runs / "cut-on-one"), lora(wan_runs / "shard")) < ATOL


@pytest.mark.slow
def test_a_sharded_checkpoint_is_not_resumed_without_shard(wan_runs):
    done = train(wan_runs / "cut", "--resume", "--no-shard", "--max-steps", "4", check=False)
    assert done.returncode == 2
    assert "was saved with --shard; resume it with --shard" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_every_ranks_gradient_is_the_average(tmp_path):
    """The gradient FSDP2 leaves on each rank is the mean of the ranks' own (DanceGRPO #110's bug:
    ranks that never synchronised would each keep their own)."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "tests" / "shard_worker.py"), str(tmp_path)], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=300)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert result["ranks_differ"] > 10 * result["max_error"]  # the ranks' own gradients are not alike
        assert result["max_error"] < 1e-6 * max(1.0, result["scale"])


@pytest.mark.slow
def test_the_sharded_unet_with_low_memory_equals_one_process(tmp_path):
    """The tiny UNet3D (blocks are down/mid/up) with --low-memory's whole-step checkpoints and offload."""
    tiny = ["--model", "tiny", "--low-memory"]
    train(tmp_path / "one", *tiny, "--batch-size", "2")
    train(tmp_path / "shard", *tiny, "--batch-size", "1", "--shard", processes=2)
    assert max_difference(lora(tmp_path / "shard"), lora(tmp_path / "one")) < 1e-6


@pytest.mark.slow
def test_the_two_expert_wan_sharded_equals_ddp_and_one_process(tmp_path):
    """Wan2.2 A14B in miniature: both experts sharded (the high-noise one frozen, run without gradients).

    Against DDP (the same video on each process) the difference is the usual reduction order; one
    process runs both videos as one batch through 4 high-noise steps first, whose last bits then
    differ too, and AdamW's normalised steps carry that to ~1e-4 on weights of ~0.2."""
    tiny = ["--model", "tiny-wan22-a14b", "--num-steps", "6", "--grad-steps", "2"]
    train(tmp_path / "one", *tiny, "--batch-size", "2")
    train(tmp_path / "ddp", *tiny, "--batch-size", "1", processes=2)
    train(tmp_path / "shard", *tiny, "--batch-size", "1", "--shard", processes=2)
    one = lora(tmp_path / "one")
    assert max(v.abs().max().item() for v in one.values()) > 0.05  # it trained
    assert max_difference(lora(tmp_path / "shard"), lora(tmp_path / "ddp")) < ATOL
    assert max_difference(lora(tmp_path / "shard"), one) < 4 * ATOL
