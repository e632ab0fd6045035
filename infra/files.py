"""Files in and out: every file the project writes, and every file it reads, passes here.

Writing: a crash, a Ctrl-C or a full disk mid-write must never leave half a file where a whole
one was. Every file goes to a temporary name beside its target first (`.NAME.tmp-XXXXXXXX.EXT`)
and is renamed over it in one step; a full disk becomes a one-line error that says so.

Reading: a file from a disk that filled up, a copy cut short, an editor that saved in another
encoding or a stranger on the internet must cost one line naming the file, what is wrong and the
fix, never a traceback, and a file that would run code is never loaded. The readers below know
what a good text, JSON, CSV, safetensors and tensor-state file looks like.

A path the operating system refuses (a name over NAME_MAX bytes, a path over PATH_MAX, a folder
that may not be searched) costs the same one line, before any work: `check_name` for the length,
`probe` for the rest, and `filesystem_problem` for a folder on one of the kernel's virtual file
systems (/proc, /sys), where nothing of ours can be written.
"""
import contextlib
import csv
import errno
import io
import json
import os
import pickle
import re
import stat
import tempfile
from pathlib import Path

import torch

from infra.cli import UserError

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
MAX_TEXT_BYTES = 10 * 2**20  # a prompts file, a config or a metrics log: 10 MB is far beyond any real one
TMP_MARK = ".tmp-"  # in the name of every temporary file (and `step-N.tmp` checkpoint folder)
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit
NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits (bytes of one name; of a path with its final NUL), when unasked
# The kernel's own file systems: their files are its interfaces, not storage.
VIRTUAL_FS = {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "configfs", "pstore", "bpf",
              "efivarfs", "fusectl", "binfmt_misc", "devpts", "mqueue"}
VIRTUAL_ROOTS = ("/proc", "/sys")


#### Names the operating system refuses

def shown(path, most=120, size=True):
    """A path for a one-line message: whole, or its start and end (and its length) when it is long."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    n = len(os.fsencode(text))
    return text if n <= most else f"{text[:most // 2]}...{text[-most // 3:]}" + (f" ({n} bytes)" if size else "")


def limits(path):
    """(NAME_MAX, PATH_MAX) of the file system that would hold `path`: asked of its nearest existing folder."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    found = []
    for name, default in (("PC_NAME_MAX", NAME_MAX), ("PC_PATH_MAX", PATH_MAX)):
        try:
            found.append(os.pathconf(folder, name) or default)
        except (OSError, ValueError, AttributeError):  # AttributeError: no os.pathconf (Windows)
            found.append(default)
    return tuple(found)


def check_name(path, what, fix=None, room=0, last_room=0):
    """UserError (naming `what` and `path`) when the operating system would refuse the name: a part of
    it over NAME_MAX bytes (its last part `last_room` fewer, for a temporary name made from it) or the
    whole, with `room` for what is written inside it, over PATH_MAX."""
    raw = os.fsencode(os.fspath(path))
    fix = fix or f"choose a shorter {what}"
    name_max, path_max = limits(path)
    parts = raw.replace(os.sep.encode(), b"/").split(b"/")  # Windows: "\\" too
    for i, part in enumerate(parts):
        most = name_max - (last_room if i == len(parts) - 1 else 0)
        if len(part) > most:
            extra = f" (less {last_room} for the temporary name made from it)" if most < name_max else ""
            raise UserError(f"{what} {shown(path)}: the name {shown(part, 60, size=False)} is {len(part)} bytes, more than the "
                            f"{name_max} a file name may have{extra}; {fix}")
    if len(raw) + room >= path_max:
        inside = f" with the {room} bytes of the files written inside it" if room else ""
        raise UserError(f"{what} {shown(path)}: the path is {len(raw)} bytes{inside}, more than the {path_max} a path "
                        f"may have; {fix}")


def os_reason(e):
    """Why the operating system refused a path, in words."""
    if e.errno == errno.ENAMETOOLONG:
        return "its name is too long for the file system"
    if e.errno == errno.ELOOP:
        return "it goes round a loop of symbolic links"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"the operating system refuses to look at it ({e.strerror})"
    return e.strerror or str(e)


def probe(path, what, fix=None, follow=True):
    """os.stat of `path` (os.lstat without `follow`), or None when nothing is there; a path the operating
    system refuses to look at (too long, a loop of links, a folder on the way we may not search) is a
    UserError naming it."""
    try:
        return os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        check_name(path, what, fix)  # a too-long name says which part
        raise UserError(f"{what} {shown(path)}: {os_reason(e)}; {fix or f'choose another {what}'}") from None


def mount_of(real):
    """(mount point, file system type) of the mount holding the real path `real`, from
    /proc/self/mountinfo; None where that cannot be read (not Linux)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])  # "\040" is a space
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, fields[fields.index("-") + 1])
    return best


def filesystem_problem(folder):
    """'' for a folder on an ordinary file system; else why nothing can be written there (on /proc,
    /sys or another of the kernel's virtual file systems)."""
    real = os.path.realpath(folder)
    mount = mount_of(real)
    root = next((r for r in VIRTUAL_ROOTS if real == r or real.startswith(r + "/")), None)
    if root or (mount and mount[1] in VIRTUAL_FS):
        where, kind = (mount if mount and mount[1] in VIRTUAL_FS else (root, {"/proc": "proc", "/sys": "sysfs"}[root]))
        return (f"is on {kind} (mounted at {where}), one of the kernel's virtual file systems, whose files are its "
                "interfaces: nothing can be stored there")
    return ""


class WriteError(UserError):
    """A file could not be written; `reason` says why without the advice, for callers that add theirs."""

    def __init__(self, reason):
        super().__init__(f"{reason}; free some space or choose another --output-dir")
        self.reason = reason


def write_error(path, e):
    """The WriteError for an OSError met while writing `path`; a full disk says so."""
    if e.errno in FULL:
        return WriteError(f"could not write {path}: the disk holding {Path(path).parent} is full ({e.strerror})")
    return WriteError(f"could not write {path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`, then rename it over `path` in one step.

    `os.replace` is atomic on POSIX and Windows when both paths are on the same file system,
    which is why the temporary file lives in the same folder. The suffix is kept, so libraries
    that choose a format from the extension (imageio, matplotlib) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}{TMP_MARK}", suffix=path.suffix, dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes the file private (0600); give it the usual permissions
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # after the write: some writers (safetensors) recreate the file
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    """Write `text` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def first_line(e):
    """An exception's message cut to its first line (some libraries write paragraphs)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_text(path, what, fix):
    """The text of a UTF-8 file, its byte-order mark dropped. `what` names the file in errors
    ("prompts file"), `fix` says what to do about a bad one."""
    path = Path(path)
    found = probe(path, what, fix)
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise UserError(f"{what} {path} is a folder, not a file; {fix}")
    try:
        with open(path, "rb") as f:
            kind = os.fstat(f.fileno()).st_mode
            if stat.S_ISCHR(kind) or stat.S_ISBLK(kind) or stat.S_ISSOCK(kind):
                raise UserError(f"{what} {path} is a device, not a file; {fix}")
            # A bounded read: a pipe or a file still growing has no size to check beforehand.
            data = f.read(MAX_TEXT_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {shown(path)} ({os_reason(e)}); {fix}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise UserError(f"{what} {path} is more than the {MAX_TEXT_BYTES // 2**20} MB such a file can sensibly be; "
                        f"{fix}")
    if b"\0" in data:
        raise UserError(f"{what} {path} holds NUL bytes, so it is not text (a binary or damaged file); {fix}")
    try:
        return data.decode("utf-8-sig")  # utf-8-sig: a leading byte-order mark is dropped, not read
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "save it as UTF-8") from None


def read_json(path, what, required=(), fix="restore it from a copy"):
    """A JSON object from `path` that has every key in `required`."""
    try:
        value = json.loads(read_text(path, what, fix))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} holds a JSON {type(value).__name__}, not an object; {fix}")
    missing = [k for k in required if k not in value]
    if missing:
        raise UserError(f"{what} {path} lacks the field {missing[0]!r}; {fix}")
    return value


def read_csv(path, what, columns, fix="restore it from a copy", more=False):
    """Rows (dicts) of a CSV file whose header is exactly `columns` (with `more`: starts with them)."""
    text = read_text(path, what, fix)
    reader = csv.DictReader(io.StringIO(text))
    header = tuple(reader.fieldnames or ())
    if (header[:len(columns)] if more else header) != tuple(columns):
        raise UserError(f"{what} {path} has the columns {reader.fieldnames}, expected {list(columns)}"
                        f"{' first' if more else ''}; {fix}")
    rows = list(reader)
    for i, row in enumerate(rows, start=2):
        if None in row or None in row.values():  # a row with more or fewer cells than the header
            raise UserError(f"{what} {path}: line {i} does not have {len(header)} cells (a cut-off write?); {fix}")
    return rows


def is_file(path, what, fix):
    """Whether `path` is a file; a path the operating system refuses is a UserError (`probe`)."""
    found = probe(path, what, fix)
    return found is not None and stat.S_ISREG(found.st_mode)


def read_safetensors(path, what, fix):
    """(tensors, metadata) of a safetensors file; a missing, cut-off or foreign file is a UserError."""
    from safetensors import safe_open

    path = Path(path)
    if not is_file(path, what, fix):
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header or a short file
        raise UserError(f"{what} {path} is not a readable safetensors file ({first_line(e)}); {fix}") from None


def read_tensor_state(path, what, fix):
    """A .pt/.pth file of tensors, numbers, strings, lists and dicts, loaded with weights_only=True.

    weights_only makes `torch.load` refuse any pickle that would build another object, so no code
    in the file runs; such a file gets a message that says so rather than an UnpicklingError.
    """
    path = Path(path)
    if not is_file(path, what, fix):
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{what} {path} holds something other than tensors and numbers; it was not loaded (nothing "
                        f"in it ran); {fix}") from None
    except Exception as e:  # a cut-off zip archive, or not a torch file at all
        raise UserError(f"{what} {path} is not a readable torch file ({first_line(e)}); {fix}") from None


def read_prompts(arg):
    """Prompts from a file: a path, or a file name under prompts/. One a line, kept whole ("a #1 hit song");
    a line whose first character other than whitespace is '#' is a comment."""
    path, fix = Path(arg), "pass a text file with one prompt a line"
    if probe(path, "prompts file", fix) is None and probe(PROMPTS_DIR / arg, "prompts file", fix) is not None:
        path = PROMPTS_DIR / arg
    if probe(path, "prompts file", fix) is None:
        known = ", ".join(sorted(p.name for p in PROMPTS_DIR.glob("*.txt")))
        raise UserError(f"prompts file {arg!r} not found; pass a path or one of prompts/: {known}")
    text = read_text(path, "prompts file", fix)
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]  # blank, whitespace-only and comment lines: none
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts; write one prompt a line")
    return prompts


def model_configs(name):
    """(denoiser config, VAE config, model_index.json) of a diffusers-layout folder or hub id: dicts,
    the first two None and the index {} when missing.

    The denoiser's is transformer/config.json (Wan) or unet/config.json (the UNets); no weights are
    read, so a model's family and size are known before it is loaded.
    """
    from diffusers import AutoencoderKL

    def config(subfolder):
        try:
            return AutoencoderKL.load_config(name, subfolder=subfolder)  # any model class reads a config.json
        except (OSError, ValueError):  # not there, or no connection
            return None

    return config("transformer") or config("unet"), config("vae"), model_index(name)


def model_index(name):
    """A pipeline folder's or hub id's model_index.json as a dict ({} when there is none): where Wan2.2
    A14B names its second expert and the boundary between the two."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(name))
    except (OSError, ValueError):  # not there, or no connection
        return {}
