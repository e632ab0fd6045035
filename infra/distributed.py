"""Several GPUs under torchrun, with DistributedDataParallel's semantics for the LoRA gradients.

`python train.py` sets none of torchrun's variables and runs as one process; nothing here does
anything then. Under `torchrun --nproc_per_node=N`, every process draws the same global batch
from the same seed and keeps its own share, and the LoRA gradients are averaged over processes
before the optimizer step, so N processes with batch B compute exactly what one with N*B would.
"""
import os

import torch


def resolve_device(device="auto"):
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def distributed_env(device):
    """(rank, world size, device) from the variables torchrun sets (plain `python` sets none); the
    device resolved ('auto': a GPU when one is visible), under torchrun each process its own GPU."""
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return int(os.environ["RANK"]), world, device


def join_process_group(world, device):
    """Start the process group (NCCL on GPUs, gloo on CPUs). Called after the models are loaded:
    once a group exists, transformers' save_pretrained writes only on rank 0, and every rank
    writes the tiny model to its own temporary folder."""
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def leave_process_group(world):
    """End the process group once every process is done. Left to the interpreter's exit, gloo's
    threads can still be running when the process is torn down, which aborts it (SIGABRT,
    "terminate called without an active exception") after all its work is written."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def barrier(world):
    """Wait until every process gets here (nothing to wait for on one)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_average(tensors, world):
    """Average tensors over processes in one all-reduce (what DDP does to gradients)."""
    if world == 1:
        return
    import torch.distributed as dist

    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(v.view_as(t))


def all_gather(tensor, world):
    """Concatenate a (B,) tensor from every process (B must be the same on each)."""
    if world == 1:
        return tensor
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def mean_over_processes(params, loss, world):
    """DDP's all-reduce of the LoRA gradients and of the loss (for the log), in one call; returns the
    loss averaged over the `world` processes (on one, `loss` itself).

    A parameter no gradient reached (possible under dropout or a reward that ignores some
    frames) takes part as zeros, so every process sends tensors of the same sizes. Sharded
    parameters (--shard: FSDP2's DTensors) had their gradients averaged in backward: only the loss.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(params[0], DTensor):
        loss_t = torch.tensor([loss], device=params[0].device)
        all_average([loss_t], world)
        return loss_t.item()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    loss_t = torch.tensor([loss], device=grads[0].device)
    all_average(grads + [loss_t], world)
    for p, g in zip(params, grads):
        p.grad = g
    return loss_t.item()
