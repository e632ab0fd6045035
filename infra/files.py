"""Files in and out: every file the project writes, and every file it reads, passes here.

Writing: a crash, a Ctrl-C or a full disk mid-write must never leave half a file where a whole
one was. Every file goes to a temporary name beside its target first (`.NAME.tmp-XXXXXXXX.EXT`)
and is renamed over it in one step; a full disk becomes a one-line error that says so.

Reading: a file from a disk that filled up, a copy cut short, an editor that saved in another
encoding or a stranger on the internet must cost one line naming the file, what is wrong and the
fix, never a traceback, and a file that would run code is never loaded. The readers below know
what a good text, JSON, CSV, safetensors and tensor-state file looks like.
"""
import contextlib
import csv
import errno
import io
import json
import os
import pickle
import stat
import tempfile
from pathlib import Path

import torch

from infra.cli import UserError

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
MAX_TEXT_BYTES = 10 * 2**20  # a prompts file, a config or a metrics log: 10 MB is far beyond any real one
TMP_MARK = ".tmp-"  # in the name of every temporary file (and `step-N.tmp` checkpoint folder)
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit


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
    if path.is_dir():
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
        raise UserError(f"cannot read {what} {path} ({e.strerror or e}); {fix}") from None
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


def read_safetensors(path, what, fix):
    """(tensors, metadata) of a safetensors file; a missing, cut-off or foreign file is a UserError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
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
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{what} {path} holds something other than tensors and numbers; it was not loaded (nothing "
                        f"in it ran); {fix}") from None
    except Exception as e:  # a cut-off zip archive, or not a torch file at all
        raise UserError(f"{what} {path} is not a readable torch file ({first_line(e)}); {fix}") from None


def read_prompts(arg):
    """Prompts from a file: a path, or a file name under prompts/. One a line; '#' starts a comment."""
    path = Path(arg)
    if not path.exists() and (PROMPTS_DIR / arg).exists():
        path = PROMPTS_DIR / arg
    if not path.exists():
        known = ", ".join(sorted(p.name for p in PROMPTS_DIR.glob("*.txt")))
        raise UserError(f"prompts file {arg!r} not found; pass a path or one of prompts/: {known}")
    text = read_text(path, "prompts file", "pass a text file with one prompt a line")
    prompts = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    prompts = [p for p in prompts if p]  # blank and whitespace-only lines are no prompts
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
