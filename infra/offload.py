"""--low-memory's moves between the GPU and host memory, kept out of the lesson's step.

Each helper trades copies over PCIe for GPU memory, and on a CPU does nothing (there is nowhere
else to go). What each saves at real sizes is predicted by `python bench.py memory`.
"""
import contextlib

import torch


def saved_on_cpu(enabled, device):
    """What autograd saves for backward waits in (pinned) CPU memory instead of the GPU's."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.device(device).type == "cuda")


def reward_leaves_in_backward(reward_fn, device):
    """The reward model waits in host memory while the decoder and the denoiser run backward.

    Backward reaches the reward first (its ops came last) and is done with it once the frames'
    gradient exists; from then on its weights only take room, and a video-language judge's are
    gigabytes. A hook on the frames sends its modules (`reward_fn.modules`) to host memory then,
    and the next call brings them back: two copies of the reward model per micro-batch. Rewards
    without `modules` (a weighted sum) stay where they are.
    """
    modules = getattr(reward_fn, "modules", None)
    if not modules or torch.device(device).type == "cpu":
        return reward_fn

    def reward(frames, prompts):
        move_modules(modules, device)  # back from host memory, if backward sent it there
        r = reward_fn(frames, prompts)
        if frames.requires_grad:
            frames.register_hook(lambda grad: move_modules(modules, "cpu"))
        return r

    reward.min_frames, reward.fps = reward_fn.min_frames, getattr(reward_fn, "fps", None)
    return reward


def move_modules(modules, device):
    """Each module's weights to `device` (its own function, so the memory simulator can count the moves)."""
    for m in modules:
        m.to(device)


@contextlib.contextmanager
def swapped(device, arriving=(), leaving=()):
    """For the block, `arriving` modules on `device` and `leaving` ones in CPU memory; then back."""
    for m in leaving:
        m.to("cpu")
    for m in arriving:
        m.to(device)
    try:
        yield
    finally:
        for m in arriving:
            m.to("cpu")
        for m in leaving:
            m.to(device)


def sharded(module):
    """Whether FSDP2 has split a module's weights (they are then DTensors), which then stay where FSDP keeps them."""
    from torch.distributed.tensor import DTensor

    return isinstance(next(module.parameters(), None), DTensor)


@contextlib.contextmanager
def denoiser_in_cpu_memory(model, enabled=True):
    """While a whole video decodes, the idle denoiser waits in CPU memory.

    A training step decodes f frames, but the before/after and evaluation videos decode all F,
    and a large VAE's decode of a whole video at high resolution can need more than the step, on
    top of the denoiser's weights. Moving the denoiser out for the decode costs one copy each way
    per batch of videos. A sharded denoiser (--shard) stays where FSDP keeps it.
    """
    if not enabled or torch.device(model.device).type in ("cpu", "meta") or sharded(model.unet):
        yield
        return
    with swapped(model.device, leaving=[model.unet]):
        yield


def in_cpu_memory(module):
    """Whether a module's weights are in CPU memory (one without weights is taken to be on the device)."""
    p = next(module.parameters(), None)
    return p is not None and p.device.type == "cpu"
