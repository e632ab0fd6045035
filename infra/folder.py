"""Whose folder is it: a run owns its output folder, and removes only what it wrote.

A run folder is claimed with a lock before anything is loaded: `OUT/.lock`, held with `flock`
(Windows: `msvcrt.locking` of a byte past its text) for as long as the process lives. The kernel
drops the lock when the process ends, however it ends (a crash, `kill -9`, a power cut), so a dead
run never leaves the folder stuck; a second run started on a live one is refused with the first
one's process id and command, read from the file. Where neither exists, `.lock` itself is the lock:
made with O_CREAT | O_EXCL, which one process alone can do, and taken over once the process it
names (on this host) has died.

A folder holds a run when its config.json is a run's config or it has a checkpoint; only then is
there anything to resume or to overwrite. `--overwrite` removes the files a run writes (by name,
RUN_FILES) and nothing else a user keeps there; a link among them is removed as a link, never
followed. Aimed at a folder that holds no run but other files, `--overwrite` is refused: it replaces
only a run, and a user who typed it meant to replace something that is not there.
`--export-merged` writes only into an empty folder or over an earlier export.
"""
import importlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

from infra.cli import UserError
from infra.files import TMP_MARK, check_name, probe

LOCK = ".lock"
LOCK_BYTE = 1 << 30  # msvcrt.locking's byte: past any text, which Windows then still lets others read
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Windows has none
# What a run writes into its folder (the trackers' folders only with --report-to).
RUN_FILES = ("config.json", "metrics.csv", "reward_curve.png", "lora.safetensors", "lora_comfyui.safetensors",
             "checkpoints", "videos", "tensorboard", "wandb", "tracker.json")
RUN_VIDEOS = ("before.*", "after.*", "before_after.png", "eval-step-*.*")  # inside videos/
EXPORT_FILES = ("config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.index.json")


def run_config(out):
    """The run's settings in `out`/config.json, or None when there is none (or it is not a run's)."""
    try:
        value = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and {"model", "reward", "max_steps"} <= set(value) else None


def has_checkpoint(out):
    folder = Path(out) / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("step-") for p in folder.iterdir())


def holds_run(out):
    """True when `out` holds a run: a run's config.json, or a checkpoint."""
    return run_config(out) is not None or has_checkpoint(out)


def check_run_folder(out, resume, overwrite):
    """Refuse to start in a folder whose run would be lost, or whose user files a run would write over.

    Returns "restart" for a run that stopped before its first checkpoint (nothing to resume, so the
    same command starts it again), "overwrite" for a run --overwrite replaces, else "".
    """
    out = Path(out)
    if resume or not out.is_dir():
        return ""
    if holds_run(out):
        if overwrite:
            return "overwrite"
        if not has_checkpoint(out) and not (out / "lora.safetensors").exists():
            return "restart"
        raise UserError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                        "or another --output-dir")
    clash = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
    if clash:
        raise UserError(f"{out} holds {clash[0]}, which a run would write over, but no run of train.py "
                        "(--overwrite replaces only a run); choose another --output-dir")
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if overwrite and others:
        raise UserError(f"--overwrite replaces only a run, and {out} holds no run of train.py but {others[0]}"
                        f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}; choose another --output-dir, "
                        "or leave out --overwrite to write the run beside those files")
    return ""


#### The lock: flock, msvcrt.locking, or a file only one process can make

def locking():
    """fcntl (POSIX), msvcrt (Windows) or None (neither): imported here, since neither exists everywhere."""
    for name in ("fcntl", "msvcrt"):
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    return None


def take(lib, file, shared=False):
    """Lock the open lock file without waiting (msvcrt: exclusively, LOCK_BYTE); False while a live run holds it."""
    if lib.__name__ == "fcntl":
        try:
            lib.flock(file, (lib.LOCK_SH if shared else lib.LOCK_EX) | lib.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    os.lseek(file.fileno(), LOCK_BYTE, os.SEEK_SET)  # msvcrt.locking locks from the file's position
    try:
        lib.locking(file.fileno(), lib.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def untake(lib, file):
    if lib.__name__ == "fcntl":
        lib.flock(file, lib.LOCK_UN)
    else:
        os.lseek(file.fileno(), LOCK_BYTE, os.SEEK_SET)
        lib.locking(file.fileno(), lib.LK_UNLCK, 1)


def holder_alive(text):
    """Without flock or msvcrt: whether the process a lock file's text names ("pid N on HOST, ...") lives.
    A text that names none (one being written) or a process on another host counts as alive."""
    found = re.match(r"pid (\d+) on (\S+),", text)
    if not found or found[2] != socket.gethostname() or sys.platform == "win32":  # (os.kill ends it there)
        return True
    try:
        os.kill(int(found[1]), 0)  # signal 0 only asks whether it exists
    except ProcessLookupError:
        return False
    except OSError:  # another user's: it exists
        pass
    return True


def make_new(path, text=None):
    """`path` made with O_CREAT | O_EXCL, open (and `text` written in); None when it exists already."""
    try:
        file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644), "r+")
    except FileExistsError:
        return None
    if text is not None:
        file.write(text)
        file.flush()
    return file


def claim_by_pid(path):
    """(the lock file, made new, or None while a live run holds it; the text of a dead run's lock taken over)."""
    for _ in range(3):
        file = make_new(path)
        if file is not None:
            return file, None
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a link, a folder: not ours to follow or replace
                raise OSError(0, "not a regular file")
            with open(path, errors="replace") as f:
                text = f.read(4096)
        except FileNotFoundError:  # its run just ended
            continue
        if holder_alive(text):
            return None, None
        # A dead run's lock, moved aside to a name of our own and removed if it is still the one judged
        # dead; another process's taken in the meantime is put back.
        aside = path.with_name(f"{LOCK}{TMP_MARK}{os.getpid()}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            continue
        with open(aside, errors="replace") as f:
            taken = f.read(4096) != text
        if taken:
            os.replace(aside, path)
            return None, None
        aside.unlink()
        file = make_new(path)
        if file is not None:
            return file, text
    return None, None


class Claim:
    """A claimed folder: the open lock file, and what claiming it changed (the folders mkdir made, the
    lock file's earlier text), so that a run refused or stopped before it wrote leaves the folder as found.
    `by_pid`: the lock is the file itself (neither flock nor msvcrt), removed when the run ends."""

    def __init__(self, out, made, file, before, by_pid=False):
        self.out, self.made, self.file, self.before = out, made, file, before  # made: deepest first
        self.by_pid = by_pid

    def release(self, began):
        path = self.out / LOCK
        if not began and self.before is not None and not self.by_pid:  # its earlier text back
            self.file.seek(0)
            self.file.truncate()
            self.file.write(self.before)
        if os.name == "nt" or self.by_pid:  # Windows removes no open file
            self.file.close()
        if self.by_pid or not began and self.before is None:  # (a run that opens it in this instant locks a lost file)
            path.unlink(missing_ok=True)
        if self.by_pid and not began and self.before is not None:  # the dead run's lock found here, put back
            restored = make_new(path, self.before)
            if restored is not None:
                restored.close()
        if not began:
            for folder in self.made:
                if any(folder.iterdir()):
                    break
                folder.rmdir()
        self.file.close()


def in_use(out):
    """Refuse a folder whose lock a live run holds (a UserError naming it); a folder without one is free."""
    path = Path(out) / LOCK
    found = probe(path, "the run folder's lock file", "choose another folder", follow=False)
    if found is None or not stat.S_ISREG(found.st_mode):
        return
    lib = locking()
    with open(path) as lock:
        holder = lock.read(4096).strip()
        held = holder_alive(holder) if lib is None else not take(lib, lock, shared=True)
        if lib is not None and not held:
            untake(lib, lock)
    if held:  # refused only while a run holds it
        raise UserError(f"{out} is in use by a run that is still going ({holder or 'another process'}); wait for it "
                        "to end or stop it, or choose another --output-dir")


def claim(out):
    """Lock `out` for this process (made if need be); returns a Claim, to keep until the run ends.
    Another live run holding it is a UserError naming that run."""
    out = Path(out)
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # check_output_dir looked first; this is what it could not foresee
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise UserError(f"--output-dir {out} cannot be made ({e.strerror or e}); choose another --output-dir") from None
    path = out / LOCK
    existed = path.exists() or path.is_symlink()
    lib = locking()
    try:  # O_NOFOLLOW: a .lock that is a link would have us write into whatever it points to
        if lib is None:
            lock, before = claim_by_pid(path)
        else:
            lock = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644), "r+")
        if lock is not None and not stat.S_ISREG(os.fstat(lock.fileno()).st_mode):
            lock.close()
            raise OSError(0, "not a regular file")
    except OSError as e:
        raise UserError(f"{path} cannot be the run's lock file ({e.strerror}); remove it") from None
    if lib is not None:
        before = lock.read(4096) if existed else None
    if lock is None or lib is not None and not take(lib, lock):
        if lock is not None:
            lock.close()
        in_use(out)  # names the holder
        raise UserError(f"{out} was in use by another run a moment ago; run the command again")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
               f"{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n")
    lock.flush()
    return Claim(out, made, lock, before, by_pid=lib is None)


def remove(path):
    """Remove a file, a folder or a link (the link itself, never what it points to)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def remove_run_files(out):
    """--overwrite: remove what a run wrote in `out` (RUN_FILES; in videos/ only a run's videos),
    keep everything else, and leave videos/ in place if a user's file remains in it."""
    out = Path(out)
    for name in RUN_FILES:
        path = out / name
        if name == "videos" and path.is_dir() and not path.is_symlink():
            for pattern in RUN_VIDEOS:
                for f in path.glob(pattern):
                    remove(f)
            if not any(path.iterdir()):
                path.rmdir()
        else:
            remove(path)


def check_export_folder(folder):
    """--export-merged DIR: refused unless DIR is new, empty, or an earlier export (only the files
    save_pretrained writes), so a run folder or a user's folder is never replaced."""
    folder = Path(folder)
    # The export is written beside it as .NAME.tmp-XXXXXXXX first (sample.export_merged): room for that name too.
    check_name(folder, "--export-merged", last_room=len(".") + len(TMP_MARK) + 8)
    if folder.is_symlink():
        raise UserError(f"--export-merged {folder} is a link; pass the folder it points to, or a new folder")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"--export-merged {folder} is a file; pass a new or empty folder")
    entries = list(folder.iterdir())
    ours = [e for e in entries if e.is_file() and not e.is_symlink() and any(e.match(p) for p in EXPORT_FILES)]
    if entries and (len(ours) < len(entries) or not (folder / "config.json").is_file()
                    or "_class_name" not in (folder / "config.json").read_text(errors="replace")):
        other = next(e.name for e in entries if e not in ours) if len(ours) < len(entries) else "config.json"
        raise UserError(f"--export-merged {folder} holds {other}, so it is not an earlier export; it would be "
                        "replaced whole: pass a new or empty folder")
