"""What the model-backed rewards share: loading a frozen judge, and feeding it pixels.

Loading: every reward model comes from its public hub id or from a local path the user gives as
an option (`from_pretrained`, `weights_file`), is frozen (`freeze`), and turns a missing file or
an unreachable hub into a one-line `UserError` that names the option to set.

Preprocessing: the differentiable resize / crop / normalise live in rewards.py, where the aesthetic
reward teaches why; video clips also need `resample_frames` and ImageNet's statistics, below.
"""
import re
from pathlib import Path

import torch

from infra.cli import UserError
from infra.files import read_tensor_state

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


def load_checkpoint(module, path, option, what, key=None):
    """Load a .pt/.pth state dict into `module` with weights_only=True (tensors only: no code in
    the pickle runs); a file, key or shape that does not fit becomes a one-line UserError."""
    state = read_tensor_state(path, f"{what} file ({option}=)", f"point {option}= at the downloaded {what} file")
    if key is not None:
        if not (isinstance(state, dict) and key in state):
            found = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
            raise UserError(f"{option}={str(path)!r}: expected the {what} weights under {key!r}, found {found}")
        state = state[key]
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{option}={str(path)!r} does not have the {what} key layout "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); is it the right file?"
        )
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # the right names with the wrong shapes
        raise UserError(f"{option}={str(path)!r}: {what} tensor shapes do not match this model") from e
