"""What the model-backed rewards share: loading a frozen judge, and feeding it pixels.

Loading: every reward model comes from its public hub id or from a local path the user gives as
an option (`from_pretrained`, `weights_file`), is frozen (`freeze`), and turns a missing file or
an unreachable hub into a one-line `UserError` that names the option to set. Its weights fill the
model exactly (`load_checkpoint`, `load_pretrained`): a tensor missing from the file, left over in
it or in another shape is refused by name, never left at its initial value or skipped in silence.

Preprocessing: the differentiable resize / crop / normalise live in rewards.py, where the aesthetic
reward teaches why; video clips also need `resample_frames` and ImageNet's statistics, below.
"""
import re
from pathlib import Path

import torch

from infra.cli import UserError
from infra.files import read_tensor_state
from infra.loading import misfit, unfit_text

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # VideoMAE, X-CLIP, V-JEPA 2
IMAGENET_STD = (0.229, 0.224, 0.225)


def resample_frames(frames, n):
    """(B, f, 3, H, W) -> (B, n, 3, H, W): n evenly spaced frames, repeating some when f < n.

    Video models with a fixed clip length get the decoded frames stretched or thinned to it;
    indexing keeps the gradient (a repeated frame collects the gradient of all its copies).
    """
    index = torch.linspace(0, frames.shape[1] - 1, n, device=frames.device).round().long()
    return frames[:, index]  # (B, n, 3, H, W)


#### Loading


def freeze(model, device, dtype):
    """A reward model is a fixed judge: eval mode, no parameter gradients, on device in dtype."""
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


_HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")  # "org/name", as on huggingface.co


def from_pretrained(load, source, option):
    """Call `load(source)` (a `from_pretrained`) on a hub id or a local folder.

    `option` names the reward option that set `source`, so the error says how to fix it.
    """
    local = Path(source).expanduser()
    if not local.exists() and not _HUB_ID.fullmatch(source):
        raise UserError(f"{option}={source!r} is neither an existing folder nor a hub id 'org/name'")
    try:
        return load(str(local) if local.exists() else source)
    except OSError as e:
        reason = str(e).strip().splitlines()[0]
        raise UserError(f"cannot load {source!r} ({reason}); set {option}= to a downloaded model folder") from e


def weights_file(path, repo_id, filename, option):
    """A local weights file: `path` if given (it must exist), else `filename` from hub `repo_id`."""
    if path is not None:
        if not Path(path).expanduser().is_file():
            raise UserError(f"{option}={path!r}: no such file; point it at the downloaded {filename}")
        return Path(path).expanduser()
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except OSError as e:  # offline, or no access
        raise UserError(
            f"cannot download {filename} from {repo_id} ({type(e).__name__}); "
            f"download it once and pass {option}=<path to {filename}>"
        ) from e


def refuse_unfit(where, what, fix, missing=(), unexpected=(), shapes=()):
    """The one-line UserError for a checkpoint that does not fill its model exactly.

    A loader that went on would leave the `missing` tensors at their random (or zero, or one)
    initial values, skip the `unexpected` ones, and score with a broken judge, silently.
    `shapes`: (name, in the file, in the model) of tensors whose shape does not fit.
    """
    text = unfit_text(missing, unexpected, shapes)
    if text:
        raise UserError(f"{where} does not have the {what} key layout ({text}); {fix}")


def load_checkpoint(module, path, option, what, key=None):
    """Load a .pt/.pth state dict into `module` with weights_only=True (tensors only: no code in
    the pickle runs). Every tensor of the module must be in the file, in its shape, and every
    tensor of the file in the module: anything else is a one-line UserError naming the keys."""
    fix = f"point {option}= at the downloaded {what} file"
    state = read_tensor_state(path, f"{what} file ({option}=)", fix)
    if key is not None:
        if not (isinstance(state, dict) and key in state):
            found = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
            raise UserError(f"{option}={str(path)!r}: expected the {what} weights under {key!r}, found {found}")
        state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{option}={str(path)!r} holds a {type(state).__name__}, not the {what} tensors by name; {fix}")
    refuse_unfit(f"{option}={str(path)!r}", what, f"is it the right file? {fix}", *misfit(module.state_dict(), state))
    module.load_state_dict(state)


def load_pretrained(cls, source, option, unused=(), **kwargs):
    """`cls.from_pretrained(source, **kwargs)` (a transformers model) through `from_pretrained`,
    held to the checkpoint as `load_checkpoint` is.

    transformers initialises a weight the checkpoint lacks (or holds in another shape) at random
    and only logs it, and skips a checkpoint tensor the model has no place for: either would
    leave a judge scoring with noise. Here both are a one-line UserError naming the keys.
    `unused`: key prefixes the checkpoint may hold that this model skips on purpose (the text
    tower of a whole CLIP checkpoint under a vision-only model).
    """
    from transformers.utils import logging

    def load(path):
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # its load report: what the check below refuses, and keys skipped on purpose
        try:
            return cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        finally:
            logging.set_verbosity(verbosity)

    model, info = from_pretrained(load, source, option)
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(tuple(unused))]
    refuse_unfit(f"{option}={source!r}", cls.__name__, f"is it the right model? point {option}= at the released folder",
                 missing=info["missing_keys"], unexpected=unexpected, shapes=info["mismatched_keys"])
    return model
