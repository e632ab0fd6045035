"""Shared fixtures: offline, CPU, and one tiny model built once per test session."""
import os
import sys
from pathlib import Path

import pytest
import torch

# Tests never touch the network: the hub is unreachable here and in CI.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# One thread per test process (and per script it starts): pytest.ini runs two workers on two cores.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The files that take longest, longest first (seconds on this project's 2-core CPU: 30-55, 20-40
# each, then 10-20). The two workers of pytest.ini take whole files in collection order, so the
# long files start at once and the short ones fill in at the end; by default pytest-xdist would
# order the files by their number of tests, which left a long file to run alone at the end.
SLOWEST_FIRST = ["test_ownership.py", "test_toy.py", "test_videoreward.py", "test_files.py", "test_robustness.py", "test_scripts.py", "test_wan.py",
                 "test_wan22.py",
                 "test_ddpo.py", "test_models.py", "test_inputs.py", "test_memory.py", "test_reward_models.py",
                 "test_trackers.py", "test_flags.py", "test_comfyui.py", "test_releases.py", "test_behaviour.py",
                 "test_param_counts.py", "test_prompt_store.py", "test_portable.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny model written once in the diffusers layout, as a user's local folder would be."""
    from infra.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def wan_folder(tmp_path_factory):
    """Wan2.1 in miniature, written once in the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, every
    tensor off its initial default as a release's are."""
    from infra.tiny import build_tiny_wan

    folder = tmp_path_factory.mktemp("tiny_wan")
    build_tiny_wan(folder, release=True)
    return folder


@pytest.fixture()
def tiny_model(tiny_folder):
    """A fresh copy of the tiny model (tests inject LoRA into it), loaded from the folder."""
    from models import load_video_model

    return load_video_model(str(tiny_folder))


@pytest.fixture(scope="session")
def wan22_folder(tmp_path_factory):
    """Wan2.2 TI2V-5B in miniature, in the layout of Wan-AI/Wan2.2-TI2V-5B-Diffusers (off its defaults)."""
    from infra.tiny import build_tiny_wan

    folder = tmp_path_factory.mktemp("tiny_wan22")
    build_tiny_wan(folder, version="2.2-5b", release=True)
    return folder


@pytest.fixture(scope="session")
def a14b_folder(tmp_path_factory):
    """Wan2.2 T2V-A14B (two experts) in miniature, in the layout of Wan-AI/Wan2.2-T2V-A14B-Diffusers
    (off its defaults)."""
    from infra.tiny import build_tiny_wan

    folder = tmp_path_factory.mktemp("tiny_a14b")
    build_tiny_wan(folder, version="2.2-a14b", release=True)
    return folder
