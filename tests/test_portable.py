"""What makes the project the same on every machine and for every reader: videos at the model's own
frame rate, prompts kept whole, no POSIX-only module on the way of the CPU work (Windows, macOS),
the folder lock without flock, the licence and citation files, and Wan's default negative prompt."""
import errno
import hashlib
import os
import socket
import subprocess
import sys
import types

import imageio
import pytest
import torch
import yaml
from conftest import ROOT
from PIL import Image, ImageSequence

import sample
import train
from infra import folder
from infra.cli import UserError
from infra.files import read_prompts
from models import MODELS, WAN_NEGATIVE

POSIX_ONLY = ("fcntl", "termios", "pwd", "grp", "resource")
DEAD_PID = 2**22 + 1  # above Linux's largest pid_max: no process has it
# sha256 of `sample_neg_prompt` in wan/configs/shared_config.py (Wan2.1 and Wan2.2 alike), UTF-8
WAN_NEGATIVE_SHA256 = "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e"


#### 1. Videos at the model's frame rate

def fake_model(name):
    """What make_videos and sample.py ask of a model, without loading one."""
    spec = MODELS[name]
    return types.SimpleNamespace(spec=spec, device="cpu", size_multiple=8, temporal_factor=4 if spec.family == "wan" else 1,
                                 denoiser=None, unet=None)


def check_frame_rate(stem, frames, fps):
    """The mp4 at `fps`; the GIF's frames, each shown a whole number of hundredths of a second, at
    `fps` on average: the clip's length within half a hundredth."""
    with imageio.get_reader(stem.with_suffix(".mp4")) as mp4:
        assert mp4.get_meta_data()["fps"] == fps
    with Image.open(stem.with_suffix(".gif")) as gif:
        shown = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]  # ms
    assert len(shown) == frames and all(ms % 10 == 0 for ms in shown)
    assert abs(sum(shown) - 1000 * frames / fps) <= 5 and max(shown) - min(shown) <= 10


@pytest.mark.parametrize("name,fps", [("tiny-wan", 16), ("tiny", 8)])
def test_videos_are_written_at_the_models_frame_rate(tmp_path, monkeypatch, name, fps):
    """train.py's before/after videos (infra/run.make_videos) and sample.py's, at the registry's fps:
    Wan's 16, the UNets' 8 (the GIF within its hundredths of a second, its length exact)."""
    import infra.run
    import models
    import vader

    spec = MODELS[name]
    video = torch.rand(1, spec.frames, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (1, F, 3, H, W)
    monkeypatch.setattr(infra.run, "generate", lambda *args, **kwargs: video)
    cfg = types.SimpleNamespace(frames=spec.frames, height=32, width=32, num_steps=1, guidance=1.0, low_memory=False)
    infra.run.make_videos(fake_model(name), cfg, ["a cat"], torch.zeros(1, 1, 1), None, tmp_path / "before", 1)
    check_frame_rate(tmp_path / "before", spec.frames, fps)

    encoded = []
    monkeypatch.setattr(models, "load_video_model", lambda *args: fake_model(name))
    monkeypatch.setattr(vader, "encode_prompts", lambda model, prompts: encoded.append(prompts) or torch.zeros(2, 1, 1))
    monkeypatch.setattr(vader, "generate", lambda *args, **kwargs: video)
    sample.main(["--model", name, "--num-prompts", "1", "--output-dir", str(tmp_path / "samples")])
    stem = next((tmp_path / "samples").glob("000-*.mp4")).with_suffix("")
    check_frame_rate(stem, spec.frames, fps)
    # 5. sample.py's negative prompt: the model's (Wan: its authors'), or the one typed.
    sample.main(["--model", name, "--num-prompts", "1", "--output-dir", str(tmp_path / "again"),
                 "--negative-prompt", "blurry"])
    assert [p[-1] for p in encoded] == [WAN_NEGATIVE if name == "tiny-wan" else "", "blurry"]


#### 2. Prompts files

def test_a_hash_inside_a_prompt_is_kept_and_only_a_line_that_starts_with_one_is_a_comment(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a comment\n   # an indented comment\na #1 hit song\nan étude in C# minor  \n#\n")
    assert read_prompts(str(path)) == ["a #1 hit song", "an étude in C# minor"]


#### 3. Windows and macOS: no POSIX-only module at the top, POSIX-only calls guarded

WITHOUT_POSIX = r"""
import os, sys, pathlib
root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for name in {modules!r}:
    sys.modules[name] = None  # `import fcntl` now fails, as on Windows
for name in ("statvfs", "getuid", "geteuid", "pathconf", "O_NOFOLLOW"):
    if hasattr(os, name):
        delattr(os, name)
sys.path.insert(0, str(root))
import importlib
files = [p for p in root.rglob("*.py") if not {{".venv", "tests"}} & set(p.relative_to(root).parts)]
for p in sorted(files):
    importlib.import_module(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"))
import train
try:
    train.main(["--help"])
except SystemExit as e:
    assert e.code == 0, e.code
# What every run does before loading a model: the config, every check, signals caught, the folder claimed.
from infra.checks import check_output_dir
from infra.cli import UserError, stop_signals
from infra.folder import claim
from infra.setup import check_settings
cfg, spec = train.parse_config(["--model", "tiny", "--output-dir", str(out)])
check_settings(cfg)
with stop_signals() as stop:
    lock = claim(out)
    try:
        claim(out)
        raise AssertionError("a second claim of a claimed folder went through")
    except UserError as e:
        assert f"pid {{os.getpid()}}" in str(e), e
    lock.release(began=True)
claim(out).release(began=False)
os.access = lambda *args, **kwargs: False  # a folder not ours to write: said without os.statvfs
try:
    check_output_dir(out)
    raise AssertionError("an unwritable folder was accepted")
except UserError as e:
    assert "is not writable by this user" in str(e), e
print("ok")
"""


def test_every_module_imports_and_a_run_starts_without_posix_only_modules(tmp_path):
    """A fresh interpreter without fcntl, termios, pwd, grp and resource, and without os.statvfs, os.getuid
    and os.pathconf: every project module imports, `train.py --help` prints, and a run's checks, its
    signal handlers and its folder lock (the O_CREAT | O_EXCL file) work."""
    script = WITHOUT_POSIX.format(modules=POSIX_ONLY)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(ROOT), str(tmp_path / "run")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), done.stderr[-3000:]
    assert "--negative-prompt" in done.stdout  # the --help text came out


class FakeMsvcrt(types.ModuleType):
    """msvcrt.locking as Windows does it, in one process: `nbytes` from the file's position, refused
    (OSError) while another open file holds them; a holder's lock goes with its closing."""
    LK_NBLCK, LK_UNLCK = 2, 0

    def __init__(self):
        super().__init__("msvcrt")
        self.held, self.positions = {}, []

    def locking(self, fd, mode, nbytes):
        st, where = os.fstat(fd), os.lseek(fd, 0, os.SEEK_CUR)
        key = (st.st_dev, st.st_ino, where, nbytes)
        self.positions.append(where)
        owner = self.held.get(key)
        if owner is not None and owner != fd:
            try:
                alive = (os.fstat(owner).st_dev, os.fstat(owner).st_ino) == key[:2]
            except OSError:
                alive = False
            if alive:
                raise PermissionError(errno.EACCES, "Permission denied")
        if mode == self.LK_UNLCK:
            self.held.pop(key, None)
        else:
            self.held[key] = fd


@pytest.mark.parametrize("kind", ["msvcrt", "neither"])
def test_the_lock_refuses_a_second_claim_without_fcntl(tmp_path, monkeypatch, kind):
    """Without fcntl, the lock keeps its guarantee: msvcrt.locking (Windows) of a byte past the text, or
    where neither exists a `.lock` only one process can make, held while the process it names lives.
    A second claim and a resume are refused naming the first run; a released folder is free again; a dead
    run's lock is taken over and, when the run is refused, put back as found."""
    monkeypatch.setitem(sys.modules, "fcntl", None)
    fake = FakeMsvcrt() if kind == "msvcrt" else None
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    assert folder.locking() is fake
    out = tmp_path / "run"
    first = folder.claim(out)
    for attempt in (folder.claim, folder.in_use):  # in_use: what --resume asks of a live run's folder
        with pytest.raises(UserError, match=f"in use by a run that is still going \\(pid {os.getpid()} on "):
            attempt(out)
    first.release(began=True)
    folder.in_use(out)  # free
    if fake is not None:
        assert set(fake.positions) == {folder.LOCK_BYTE}  # past the text, which others still read
        folder.claim(out).release(began=True)
        return
    assert not (out / folder.LOCK).exists()  # the file is the lock: gone with the run
    other_host = f"pid 1 on not-{socket.gethostname()}, started 2026-01-01 00:00:00: train.py\n"
    (out / folder.LOCK).write_text(other_host)  # a run on another machine sharing the folder: not checkable here
    with pytest.raises(UserError, match="in use by a run that is still going \\(pid 1 on not-"):
        folder.claim(out)
    dead = f"pid {DEAD_PID} on {socket.gethostname()}, started 2026-01-01 00:00:00: train.py\n"
    (out / folder.LOCK).write_text(dead)
    taken = folder.claim(out)
    assert (out / folder.LOCK).read_text().startswith(f"pid {os.getpid()} ")
    taken.release(began=False)
    assert (out / folder.LOCK).read_text() == dead and sorted(p.name for p in out.iterdir()) == [folder.LOCK]


#### 4. LICENSE and CITATION.cff

def test_the_licence_and_the_citation_file():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2026 the vader-minimal authors" in licence
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and {"message", "title", "authors"} <= set(cff) and cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    assert paper["title"] == "Video Diffusion Alignment via Reward Gradients" and paper["year"] == 2024
    assert [a["family-names"] for a in paper["authors"]] == ["Prabhudesai", "Mendonca", "Qin", "Fragkiadaki", "Pathak"]
    assert "2407.08737" in paper["url"] and paper["doi"] == "10.48550/arXiv.2407.08737"


#### 5. Wan's default negative prompt, and --negative-prompt

def test_the_negative_prompt_is_the_models_unless_one_is_typed(capsys):
    """Wan's authors' text for every Wan entry (the real ones and their miniatures), "" for the UNets;
    `--negative-prompt ""` gives diffusers' empty one; --help says where the default comes from."""
    assert WAN_NEGATIVE.startswith("色调艳丽，过曝，静态") and WAN_NEGATIVE.endswith("背景人很多，倒着走")
    assert hashlib.sha256(WAN_NEGATIVE.encode()).hexdigest() == WAN_NEGATIVE_SHA256  # every character, the 28 terms
    for name, spec in MODELS.items():
        assert spec.negative_prompt == (WAN_NEGATIVE if spec.family == "wan" else ""), name
    for name in ("wan", "tiny-wan", "tiny-wan22-a14b"):
        assert train.parse_config(["--model", name])[0].negative_prompt == WAN_NEGATIVE
    assert train.parse_config(["--model", "tiny-wan", "--negative-prompt", ""])[0].negative_prompt == ""
    assert train.parse_config(["--model", "tiny"])[0].negative_prompt == ""
    assert train.parse_config(["--model", "tiny", "--negative-prompt", "blurry"])[0].negative_prompt == "blurry"
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "list of flaws, in Chinese). [default: the model's]" in " ".join(capsys.readouterr().out.split())
