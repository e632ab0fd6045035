"""Run by tests/test_sharding.py under torchrun: every rank's sharded LoRA gradient is the average.

Each rank builds the tiny Wan (the same weights and LoRA everywhere), computes the LoRA
gradient of a loss on data of its own with an unsharded copy, then shards the model with
`shard_denoiser` and computes the same loss's gradient through FSDP2. The gathered sharded
gradient must equal the mean of the ranks' unsharded ones: a run whose ranks each trained
their own copy, or summed instead of averaging, fails here. Writes OUT/rank-<r>.json.
"""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.sharding import shard_denoiser  # noqa: E402
from lora import inject_lora, lora_layers  # noqa: E402
from models import load_video_model  # noqa: E402


def lora_grads(unet, x, text):
    """The LoRA gradients of a loss of the prediction, {path: (A grad, B grad)} as whole tensors."""
    out = unet(x, 500.0, encoder_hidden_states=text, return_dict=False)[0]  # (1, C, F, h, w)
    (out.square().mean() + out.mean()).backward()
    whole = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # noqa: E731
    return {name: torch.cat([whole(layer.lora_A.weight.grad).flatten(), whole(layer.lora_B.weight.grad).flatten()])
            for name, layer in lora_layers(unet).items()}


def main(out):
    model = load_video_model("tiny-wan")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    inject_lora(model.unet, rank=4)
    for layer in lora_layers(model.unet).values():  # B = 0 would give A no gradient
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x = torch.randn(1, 4, 3, 8, 8, generator=generator)  # (1, C, F_lat, h, w)
    text = torch.randn(1, 512, 32, generator=generator)  # (1, L, D)
    alone = lora_grads(copy.deepcopy(model.unet), x, text)  # this rank's own gradient, unsharded
    flat = torch.cat(list(alone.values()))
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    shard_denoiser(model, world, "cpu")
    sharded = torch.cat(list(lora_grads(model.unet, x, text).values()))
    mean = torch.stack(every).mean(0)
    result = dict(max_error=(sharded - mean).abs().max().item(), scale=mean.abs().max().item(),
                  ranks_differ=(every[0] - every[-1]).abs().max().item())
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
