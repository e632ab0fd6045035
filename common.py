"""Small pieces every script shares: the user-error type, atomic file writes, the CLI wrapper.

Bad input (a missing prompts file, an unknown reward, a flag out of range) is the user's to fix,
not a bug. The code raises `UserError`; `run_cli` turns it into one line on stderr and exit
status 2, with no traceback. Genuine bugs still raise normally and show their traceback.
"""
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix, in one line."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`, then rename it over `path` in one step.

    A crash, a Ctrl-C or a full disk mid-write leaves the old file intact rather than half a new
    one: `os.replace` is atomic on POSIX and Windows when both paths are on the same file system,
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


def run_cli(main, argv=None):
    """Run a script's `main(argv)`; a `UserError` becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def stop_signals():
    """Catch SIGINT and SIGTERM into a list (checked after each step); restore the old handlers after."""
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
