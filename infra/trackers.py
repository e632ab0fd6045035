"""--report-to wandb|tensorboard: the run as W&B or TensorBoard shows it, beside metrics.csv.

A tracker gets every metrics.csv row's numbers at its step (the step-0 evaluation's included), and
every clip the run writes into videos/: `videos/before` and `videos/after`, and `videos/eval` at
each evaluation's step. A clip is sent as the file the run wrote (infra/video.py, at the model's
frame rate), so what a tracker plays is what is on disk, and neither tracker needs moviepy:
W&B gets the .mp4 (`wandb.Video` of a file), TensorBoard the animated .gif as an image summary
(the very record `SummaryWriter.add_video` makes, which would need moviepy 1's `moviepy.editor`
to encode it), shown, animated, under IMAGES.

A resumed run goes on in the same tracker run. W&B: the run's id is kept in the run folder's
tracker.json and the run is resumed (`resume="allow"`). TensorBoard: a new writer appends a new
event file to `tensorboard/`, with `purge_step` one past the checkpoint's step, so that what the
stopped run logged after that checkpoint (and the resumed run logs again) is dropped, not doubled.
W&B drops a step logged again itself: it keeps the first values (a resume is exact, so the same).

Each package is imported only when asked for (a missing one is refused by check_settings first).
The tracker is closed however the run ends (infra/run.py, Run.__exit__).
"""
import json
import re
import secrets
import sys
from dataclasses import asdict
from pathlib import Path

from infra.files import atomic_write_text

TRACKER_FILE = "tracker.json"  # in the run folder: {"wandb_id": ...}, what a resume needs to go on in the same run
DEFAULT_PROJECT = "vader-minimal"


class Tracker:
    """The part both trackers share: rows to scalars, clip names to tags and steps."""

    def __init__(self, out, step):
        self.out, self.step = Path(out), step  # step: the last one logged (a resumed run's checkpoint's at first)

    def __call__(self, row):
        """A metrics.csv row: its numbers (empty cells left out) at its step."""
        self.step = row["step"]
        self.scalars({k: v for k, v in row.items() if k != "step" and v != ""}, self.step)

    def videos(self, make):
        """`make(name, n, scored)` (Run.videos) that also sends the clip it wrote: videos/eval-step-N at
        step N as "videos/eval", before and after as "videos/before", "videos/after" at the last step logged."""
        def made(name, n, scored):
            result = make(name, n, scored)
            evaluation = re.fullmatch(r"eval-step-(\d+)", name)
            tag, step = ("videos/eval", int(evaluation[1])) if evaluation else (f"videos/{name}", self.step)
            path = self.out / "videos" / f"{name}{self.suffix}"
            if path.is_file():
                self.clip(tag, path, step)
            else:
                print(f"warning: --report-to: {path} was not written, so it is not logged", file=sys.stderr)
            return result
        return made

    def close(self, failed=False):
        """Write what is pending and end the tracker's run; a failure here never hides the run's own."""
        try:
            self.finish(failed)
        except Exception as e:  # noqa: BLE001
            print(f"warning: --report-to: closing the tracker failed ({type(e).__name__}: {e})", file=sys.stderr)


class TensorBoard(Tracker):
    suffix = ".gif"

    def __init__(self, out, step):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(out, step)
        # A resumed run: events at steps after the checkpoint's were the stopped run's; they are dropped.
        self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=step + 1 if step else None)

    def scalars(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a run killed at once keeps every row it logged

    def clip(self, tag, path, step):
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        with Image.open(path) as image:
            width, height = image.size
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=path.read_bytes())
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self.writer.flush()

    def finish(self, failed):
        self.writer.close()


class WandB(Tracker):
    suffix = ".mp4"

    def __init__(self, out, step, cfg):
        import wandb

        super().__init__(out, step)
        self.wandb = wandb
        path = self.out / TRACKER_FILE
        try:
            run_id = json.loads(path.read_text()).get("wandb_id")
        except (OSError, ValueError, AttributeError):  # none yet (a new run), or not one we wrote
            run_id = None
        if not (isinstance(run_id, str) and run_id):
            if path.exists():
                print(f"warning: {path} holds no W&B run id; logging to a new W&B run", file=sys.stderr)
            run_id = secrets.token_hex(8)
            atomic_write_text(path, json.dumps({"wandb_id": run_id}) + "\n")
        self.run = wandb.init(project=cfg.tracker_project or DEFAULT_PROJECT, name=self.out.resolve().name,
                              id=run_id, resume="allow", config=asdict(cfg), allow_val_change=True, dir=str(self.out))

    def scalars(self, values, step):
        self.run.log(values, step=step)

    def clip(self, tag, path, step):
        self.run.log({tag: self.wandb.Video(str(path))}, step=step)  # a file: its own frame rate, no moviepy

    def finish(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


def open_tracker(cfg, out, step):
    """The Tracker of --report-to for a run in `out` starting at `step` (a resumed run's), or None."""
    if cfg.report_to == "wandb":
        return WandB(out, step, cfg)
    if cfg.report_to == "tensorboard":
        return TensorBoard(out, step)
    return None
