"""Files in and out: atomic writes, and the prompt lists every script reads.

A crash, a Ctrl-C or a full disk mid-write must never leave half a file where a whole one was:
every file the project writes goes to a temporary name beside its target first, and is renamed
over it in one step.
"""
import contextlib
import os
import tempfile
from pathlib import Path

from infra.cli import UserError

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`, then rename it over `path` in one step.

    `os.replace` is atomic on POSIX and Windows when both paths are on the same file system,
    which is why the temporary file lives in the same folder. The suffix is kept, so libraries
    that choose a format from the extension (imageio, matplotlib) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes the file private (0600); give it the usual permissions
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    """Write `text` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def read_prompts(arg):
    """Prompts from a file: a path, or a file name under prompts/. One a line; '#' starts a comment."""
    path = Path(arg)
    if not path.exists() and (PROMPTS_DIR / arg).exists():
        path = PROMPTS_DIR / arg
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in PROMPTS_DIR.glob("*.txt")))
        raise UserError(f"prompts file {arg!r} not found; pass a path or one of prompts/: {known}")
    prompts = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts; write one prompt a line")
    return prompts
