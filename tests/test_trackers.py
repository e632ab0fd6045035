"""--report-to: TensorBoard's event files read back as TensorBoard reads them (every row, the step-0
evaluation, the videos; a resume that appends without doubling a step; closed after an error), and
W&B through a stand-in `wandb` module that records its calls, and (marked slow: the real one starts
a service process per run) W&B itself in offline mode, which never touches the network."""
import csv
import importlib.machinery
import io
import json
import shutil
import sys
import types

import pytest
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # requirements.txt: tests only

import train
from infra.cli import run_cli
from models import spec_of

COMMAND = ["--model", "tiny", "--prompts", "animals.txt", "--num-steps", "2", "--frames", "4", "--height", "16",
           "--width", "16", "--max-steps", "2", "--grad-accum", "1", "--eval-every", "1", "--eval-videos", "1",
           "--num-videos", "1", "--reward", "brightness"]
FPS = spec_of("tiny").fps


def events(run):
    """TensorBoard's view of run/tensorboard: {tag: [(step, value)]} of scalars and of images (GIF bytes)."""
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    images = {t: [(e.step, e.encoded_image_string) for e in acc.Images(t)] for t in acc.Tags()["images"]}
    return scalars, images


def read_metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def gif_frames(data):
    """(frames, total duration in ms) of an animated GIF."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "GIF"
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(image)]
    return len(durations), sum(durations)


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """The two-step run of the task, with a checkpoint after each step (for the resume below)."""
    out = tmp_path_factory.mktemp("runs") / "tb"
    run_cli(train.main, [*COMMAND, "--report-to", "tensorboard", "--save-every", "1", "--output-dir", str(out)])
    return out


def test_tensorboard_holds_every_row_the_step_0_evaluation_and_the_videos(tb_run):
    scalars, images = events(tb_run)
    rows = read_metrics(tb_run)
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    for column in rows[0]:  # every number of metrics.csv, at its step
        if column != "step":
            want = [(int(r["step"]), pytest.approx(float(r[column]), rel=1e-6)) for r in rows if r[column] != ""]
            assert scalars[column] == want, column
    assert [s for s, _ in scalars["eval_reward"]] == [0, 1, 2]  # the step-0 evaluation too
    assert [s for s, _ in scalars["reward_mean"]] == [1, 2]
    assert {t: [s for s, _ in v] for t, v in images.items()} == {
        "videos/before": [0], "videos/eval": [0, 1, 2], "videos/after": [2]}
    for tag, logged in images.items():
        for step, data in logged:  # each an animated GIF of the run's 4 frames, at the model's frame rate
            frames, ms = gif_frames(data)
            assert frames == 4 and abs(ms - 4 * 1000 / FPS) <= 10, (tag, step, frames, ms)
    name = "eval-step-000001.gif"
    assert dict(images["videos/eval"])[1] == (tb_run / "videos" / name).read_bytes()  # the file the run wrote


def failing_at_step(monkeypatch, n):
    """train.train_step raising a RuntimeError at its n-th call, as a bug there would."""
    step, calls = train.train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("a bug in the step")
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", train_step)


def crashed_copy(tb_run, tmp_path, name):
    """tb_run as if killed after step 2 was logged but before its checkpoint: a resume does step 2 again."""
    run = tmp_path / name
    shutil.copytree(tb_run, run)
    shutil.rmtree(run / "checkpoints" / "step-000002")
    return run


@pytest.mark.slow  # three training runs
def test_the_writer_is_closed_after_an_error_and_a_resume_appends_without_doubling_a_step(tb_run, tmp_path,
                                                                                       monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    run = crashed_copy(tb_run, tmp_path, "tb")
    closed, close = [], SummaryWriter.close
    with monkeypatch.context() as m:
        m.setattr(SummaryWriter, "close", lambda self: (closed.append(self.log_dir), close(self)))
        failing_at_step(m, 1)
        with pytest.raises(RuntimeError, match="a bug in the step"):
            run_cli(train.main, ["--resume", str(run)])
    assert closed == [str(run / "tensorboard")]  # by Run.__exit__, on the error
    run_cli(train.main, ["--resume", str(run)])
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 3  # two more files, the same folder
    (scalars, images), (first, first_images) = events(run), events(tb_run)
    assert scalars.keys() == first.keys() and images.keys() == first_images.keys()
    for tag in scalars:  # each step once, and the same values (a resume is exact; a step's time is not)
        assert [(step, tag == "seconds" or v) for step, v in scalars[tag]] == [
            (step, tag == "seconds" or v) for step, v in first[tag]], tag
    for tag in images:
        assert [s for s, _ in images[tag]] == [s for s, _ in first_images[tag]], tag


class FakeWandb(types.ModuleType):
    """`wandb` as train.py uses it, keeping every call: init's arguments (checked against the real
    signature's names), each run's logs in order, how it finished; Video of a file, as the real one."""

    INIT_ARGS = {"entity", "project", "dir", "id", "name", "notes", "tags", "config", "config_exclude_keys",
                 "config_include_keys", "allow_val_change", "group", "job_type", "mode", "force", "reinit", "resume",
                 "resume_from", "fork_from", "save_code", "tensorboard", "sync_tensorboard", "monitor_gym",
                 "settings", "anonymous"}  # wandb 0.31's wandb.init

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # found by check_settings' find_spec
        self.runs = []
        fake = self

        class Run:
            def __init__(self, kwargs):
                self.init, self.logs, self.exit_code = kwargs, [], None

            def log(self, data, step=None, commit=None):
                assert self.exit_code is None and step is not None
                assert not self.logs or step >= self.logs[-1][0], "W&B drops a step below the last one logged"
                self.logs.append((step, data))

            def finish(self, exit_code=None):
                self.exit_code = exit_code

        class Video:
            def __init__(self, data_or_path, caption=None, fps=None, format=None):
                assert isinstance(data_or_path, str) and data_or_path.rsplit(".", 1)[-1] in ("gif", "mp4", "webm", "ogg")
                self.path, self.data = data_or_path, open(data_or_path, "rb").read()

        def init(**kwargs):
            assert set(kwargs) <= self.INIT_ARGS, set(kwargs) - self.INIT_ARGS
            fake.runs.append(Run(kwargs))
            return fake.runs[-1]

        self.init, self.Video = init, Video


def test_wandb_project_name_resume_id_and_videos(tb_run, tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = crashed_copy(tb_run, tmp_path, "my-run")
    flags = ["--resume", str(out), "--report-to", "wandb", "--tracker-project", "proj"]
    with monkeypatch.context() as m:  # the first W&B run fails at its first step ...
        failing_at_step(m, 1)
        with pytest.raises(RuntimeError, match="a bug in the step"):
            run_cli(train.main, flags)
    run_cli(train.main, flags)  # ... and the resume goes on in the same W&B run
    first, second = wandb.runs
    assert (first.exit_code, second.exit_code) == (1, 0)  # finished however the run ended
    run_id = json.loads((out / "tracker.json").read_text())["wandb_id"]
    for run in (first, second):  # one W&B run, resumed by the id kept in the run folder
        assert {k: run.init[k] for k in ("project", "name", "id", "resume", "dir")} == {
            "project": "proj", "name": "my-run", "id": run_id, "resume": "allow", "dir": str(out)}
        assert run.init["config"]["report_to"] == "wandb" and run.init["config"]["tracker_project"] == "proj"
    assert first.logs == []
    row = read_metrics(out)[-1]
    assert [(step, sorted(data)) for step, data in second.logs] == [
        (2, ["videos/eval"]), (2, sorted(k for k, v in row.items() if k != "step" and v != "")), (2, ["videos/after"])]
    values = {k: v for _, data in second.logs for k, v in data.items()}
    assert all(values[k] == pytest.approx(float(v), rel=1e-12) for k, v in row.items() if k != "step" and v != "")
    assert values["videos/after"].path == str(out / "videos" / "after.mp4")  # the run's own .mp4
    assert values["videos/after"].data[4:8] == b"ftyp"


def test_a_missing_package_is_one_line_before_anything_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, as importlib sees it
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, [*COMMAND, "--report-to", "wandb", "--output-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --report-to wandb needs the wandb package: pip install wandb\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # the real wandb starts a service process for each run: seconds
def test_wandb_offline_keeps_one_run_across_a_resume_with_its_videos(tb_run, tmp_path, monkeypatch):
    """W&B itself, in offline mode (no network): the run's id is the one kept in tracker.json, a resume
    writes to a run of the same id, and the videos reach W&B's media folder."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = crashed_copy(tb_run, tmp_path, "offline-run")
    run_cli(train.main, ["--resume", str(out), "--report-to", "wandb", "--tracker-project", "proj"])
    run_id = json.loads((out / "tracker.json").read_text())["wandb_id"]
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs, sorted(p.name for p in (out / "wandb").iterdir())
    media = [p.name for r in runs for p in (r / "files" / "media" / "videos").rglob("*.mp4")]
    assert any("after" in m for m in media) and any("eval" in m for m in media), media
    run_cli(train.main, ["--resume", str(out), "--report-to", "wandb", "--max-steps", "3"])
    assert json.loads((out / "tracker.json").read_text())["wandb_id"] == run_id
    assert len(sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))) == len(runs) + 1  # the same run, resumed
