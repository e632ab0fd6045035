"""How often a toy-world model draws what its captions ask for, read by the weight-free detector.

    python -m toy.evaluate                   # the committed toy model
    python -m toy.evaluate --lora RUN/lora.safetensors    # the toy model aligned by train.py
    python -m toy.evaluate --model FOLDER    # a model toy/pretrain.py wrote elsewhere

Every training caption and every held-out one (colour/shape pairs never seen in pretraining) is
sampled `--repeats` times with its own seed, and `world.accuracy` reads colour, shape, size and
direction back from the pixels.
"""
import argparse
from dataclasses import replace

import torch

from infra.cli import UserError, run_cli
from toy.world import CHANCE, FRAMES, SIZE, accuracy, all_clips


@torch.no_grad()
def sample_model(model, captions, seed=0, batch=16, num_steps=None, guidance=None):
    """Generate one video per caption with the model's defaults: (N, F, 3, H, W) in [0, 1]."""
    from vader import encode_prompts, generate

    spec = model.spec
    uncond = encode_prompts(model, [""])  # (1, 77, D)
    out = []
    for i in range(0, len(captions), batch):
        cond = encode_prompts(model, captions[i:i + batch])  # (b, 77, D)
        out.append(generate(model, cond, uncond.expand_as(cond), spec.frames, spec.height, spec.width,
                            num_steps or spec.num_steps, guidance or spec.guidance, seed + i))  # (b, F, 3, H, W)
    return torch.cat(out)  # (N, F, 3, H, W)


def main(argv=None):
    p = argparse.ArgumentParser(description="Detector accuracy of a toy-world model's samples, per attribute.")
    p.add_argument("--model", default="toy", help="'toy' (the committed toy/model/) or a folder toy/pretrain.py wrote")
    p.add_argument("--lora", help="a lora.safetensors that train.py wrote for this model; omit for the base model")
    p.add_argument("--repeats", type=int, default=2, help="videos per caption, each with its own seed")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    p.add_argument("--num-steps", type=int, default=None,
                   help="DDIM steps per video (default: the model's 10); fewer are faster and draw worse")
    p.add_argument("--split", choices=("train", "heldout", "both"), default="both",
                   help="the captions of the pairs seen in pretraining, of the held-out pairs, or both")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from infra.checks import check_flags
    from infra.lorafile import load_lora_file, read_lora_file
    from models import base_id, load_video_model, spec_of

    for flag, value in (("--repeats", args.repeats), ("--num-steps", args.num_steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be 1 or more, got {value}")
    check_flags(args)  # --seed, --guidance, --num-steps, --repeats: infra/checks.py's rules
    spec_of(args.model)  # an unknown name fails now, before anything loads

    if args.lora:
        read_lora_file(args.lora)  # a bad file fails now, before the model loads
    torch.set_num_threads(1)
    model = load_video_model(args.model)
    if args.lora:  # a LoRA of another base whose shapes fit: a warning, as sample.py gives (infra/lorafile.py)
        load_lora_file(model.unet, args.lora, base_id(model.spec))
    # The toy world's clip size and sampler (the registry's "toy" entry); a bare folder would
    # otherwise get ModelScope's defaults (16 frames, 25 steps, guidance 9).
    model.spec = replace(model.spec, height=SIZE, width=SIZE, frames=FRAMES, num_steps=10, guidance=3.0)
    print("chance   " + "  ".join(f"{k} {v:.2f}" for k, v in CHANCE.items()))
    for split in ("train", "heldout") if args.split == "both" else (args.split,):
        captions = [c.caption for c in all_clips(split)] * args.repeats
        videos = sample_model(model, captions, args.seed, num_steps=args.num_steps, guidance=args.guidance)
        acc = accuracy(videos, captions)
        print(f"{split:8s} " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()) + f"   ({len(captions)} videos)")


if __name__ == "__main__":
    run_cli(main)
