"""`--shard`: the frozen denoiser split across processes with PyTorch's FSDP2, for models one GPU cannot hold.

Under DDP (infra/distributed.py) every process holds the whole frozen model; a 14B transformer is
28.6 GB of bf16 before any activation. `fully_shard` (torch.distributed.fsdp) instead keeps
1/N of every parameter on each of N processes, as a DTensor, and gathers one block's weights
just before the block runs (forward, recomputation, backward), freeing them right after:

    weights per process ≈ all weights / N  +  the gathered blocks in flight (two: the one running,
                                              and the next one, fetched while it runs)

The gradients of the sharded LoRA weights are reduce-scattered in backward: each process gets
the average over processes of its own 1/N slice, which is DDP's all-reduce, divided up.

Groups. Each block of the denoiser (`model.shard_blocks()`) is one FSDP group, and the root
holds what is left (embeddings, the output head). The LoRA A/B of a block live in the block's
group: float32 beside the frozen bf16 weights. FSDP2 requires one dtype only among a group's
*trainable* parameters (torch 2.10's `_init_mp_dtypes` checks those alone), and all the
trainable ones are LoRA, so one all-gather per block fetches base and adapters together.

Checkpoints are written with torch.distributed.checkpoint (DCP): every process writes its own
shards of the LoRA and of AdamW's moments, with a `.metadata` file that says where each slice
lives, so a run saved on N processes loads on M: DCP reads whichever slices the new layout needs.
"""
import pickle
import warnings
from pathlib import Path

import torch

from infra.cli import UserError
from infra.files import first_line

SHARDED = "sharded"  # a checkpoint's DCP folder
MIN_TORCH = (2, 10)


def check_torch():
    """FSDP2 with a frozen base of another dtype than its LoRA needs torch 2.10 (the requirements' floor)."""
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise UserError(f"--shard needs torch {'.'.join(map(str, MIN_TORCH))} or newer (FSDP2 with a float32 LoRA "
                        f"on a bf16 base), this is {torch.__version__}: pip install -U torch")


def shard_denoiser(model, world, device):
    """fully_shard each block of `model.unet` and then its root over `world` processes; returns the
    LoRA parameters, now DTensors holding this process's slices.

    The denoiser arrives in CPU memory (train.py loads it there under --shard), and `fully_shard`
    moves one block at a time to the mesh's device, so a GPU never holds the whole model. On the
    CPU the mesh is an explicit CPU mesh (gloo), which is how the tests shard without a GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_torch()
    # FSDP2 warns that a block returns a view, which an in-place op could detach from its backward
    # hook; the sampler and the UNets' skip connections use only out-of-place ops on them (the
    # tests compare the sharded gradients with one process's).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(torch.device(device).type, (world,))
    for block in model.shard_blocks():
        fully_shard(block, mesh=mesh)
    fully_shard(model.unet, mesh=mesh)
    if getattr(model, "high_expert", None) is not None:  # Wan2.2 A14B's high-noise expert (wan.TwoExperts)
        shard_high_expert(model.high_expert, mesh)
    return [p for p in model.unet.parameters() if p.requires_grad]


def whole_lora(unet, prefix):
    """The LoRA state dict with every sharded tensor gathered whole: the same file a single process
    writes. The gather is a collective, so every process calls this."""
    from lora import lora_state_dict

    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in lora_state_dict(unet, prefix).items()}


def shard_high_expert(expert, mesh):
    """Wan2.2 A14B's high-noise expert, frozen and run only without gradients, sharded block by block
    too; on a GPU its shards wait in (pinned) host memory (FSDP2's CPUOffloadPolicy), so each block
    is copied in, gathered, run and freed in turn, and a card holds none of it between blocks: the
    per-process peak is then the low-noise expert's, for a host-to-device copy of 28.6 GB / N per
    video. On the CPU (gloo) there is no host to offload to."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    offload = CPUOffloadPolicy() if mesh.device_type == "cuda" else OffloadPolicy()
    for block in expert.blocks:
        fully_shard(block, mesh=mesh, offload_policy=offload)
    fully_shard(expert, mesh=mesh, offload_policy=offload)


#### Checkpoints through torch.distributed.checkpoint

def _distributed():
    """Whether a process group exists (not under plain `python train.py --shard`: DCP then runs alone)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _state(unet, optimizer):
    """The LoRA and AdamW state as DCP reads and writes them: keyed by parameter name (the same on
    any number of processes), sharded where the model is; frozen weights left out."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    lora, optim = get_state_dict(unet, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"lora": lora, "optimizer": optim}


def save_sharded(folder, unet, optimizer):
    """Every process writes its slices of the LoRA and the optimizer state to folder/sharded/."""
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(_state(unet, optimizer), checkpoint_id=Path(folder) / SHARDED, no_dist=not _distributed())
    except CheckpointException as e:  # what any process failed to write (a full disk), gathered
        raise OSError(f"a process could not write its slices ({first_line(e)})") from None


def load_sharded(folder, unet, optimizer):
    """Load a checkpoint's folder/sharded/ into this run's layout, whatever the number of processes
    that wrote it: DCP reads, for each process, the slices its shards cover."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    state = _state(unet, optimizer)  # the target layout (an untouched AdamW is given zero moments first)
    try:
        dcp.load(state, storage_reader=SafeReader(Path(folder) / SHARDED), no_dist=not _distributed())
    except CheckpointException as e:  # a missing slice or parameter: another model or LoRA layout
        raise UserError(f"checkpoint {folder}/{SHARDED} does not fit this run ({first_line(e)}); resume from "
                        "another checkpoint, or start again without --resume") from None
    set_state_dict(unet, optimizer, model_state_dict=state["lora"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))  # the frozen weights are not in it (dcp.load checked the LoRA's)


# What a DCP .metadata file may name besides torch's dtypes and torch.Size: the classes of DCP's
# metadata module, and these (the folder it was written to is kept as a path).
ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
           ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes .metadata with pickle, and `pickle.load` runs whatever code a file names. This
    reader refuses every other global, as `torch.load(weights_only=True)` does for .pt files, so a
    checkpoint from elsewhere cannot run code (the Python docs' "Restricting Globals")."""

    def find_class(self, module, name):
        from torch.distributed.checkpoint import metadata

        if module == "torch":
            ok = name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        elif module == metadata.__name__:  # its dataclasses and enums, not what it imports
            ok = isinstance(getattr(metadata, name, None), type) and getattr(metadata, name).__module__ == module
        else:
            ok = (module, name) in ALLOWED
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")
        return super().find_class(module, name)


def read_metadata(path):
    """A DCP folder's .metadata, read without running code; UserError if it is missing or damaged."""
    from torch.distributed.checkpoint.metadata import Metadata

    fix = "resume from another checkpoint, or start again without --resume"
    try:
        with open(Path(path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
        raise UserError(f"checkpoint {path} has no readable sharded-state metadata ({e}); {fix}") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"checkpoint {path}/.metadata is not DCP metadata; {fix}")
    return metadata


def SafeReader(path):
    """DCP's FileSystemReader, with the metadata read by `read_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)
