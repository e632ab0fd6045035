"""Generate videos from a base model, with or without a trained LoRA.

    python sample.py --model tiny --lora runs/tiny-colorfulness/lora.safetensors --prompts animals.txt
    python sample.py --model tiny --lora OUT/lora.safetensors --prompts animals.txt --side-by-side
    python sample.py --model modelscope --lora OUT/lora.safetensors --export-merged OUT/unet-merged
    python sample.py --model wan --lora runs/wan-hps/lora.safetensors --side-by-side

Each prompt gives an .mp4 and a .gif in --output-dir. With --side-by-side the base model's video
(left) and the aligned one (right) share a file, from the same seed, so the change is easy to see.
With --export-merged nothing is sampled: the denoiser, with the LoRA folded into its weights, is
written with save_pretrained, for use in diffusers' own pipelines (see `export_merged`).
"""
import argparse
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from infra.checks import check_device, check_flags, check_output_dir
from infra.cli import UserError, run_cli
from infra.files import TMP_MARK, atomic_write_text, read_prompts, write_error
from infra.folder import check_export_folder
from infra.video import slug, tile, write_video

DEFAULT_MODEL = "modelscope"  # train.py's default


def export_merged(model, lora_path, folder):
    """Fold the LoRA into the denoiser's weights and write it to `folder` with save_pretrained.

    diffusers cannot `load_lora_weights` into a UNet3DConditionModel (it lacks PeftAdapterMixin),
    so this is how an aligned ModelScope or Zeroscope reaches diffusers' own pipeline:
        unet = UNet3DConditionModel.from_pretrained(FOLDER)
        pipe = TextToVideoSDPipeline.from_pretrained("ali-vilab/text-to-video-ms-1.7b", unet=unet)
    For AnimateDiff the folder holds a UNetMotionModel (UNetMotionModel.from_pretrained(FOLDER), then
    AnimateDiffPipeline(..., unet=unet)); there the LoRA file also loads as it is, with
    `unet.load_lora_adapter(PATH, prefix="unet")`. For Wan the folder holds a WanTransformer3DModel
    (WanPipeline.from_pretrained(HUB_ID, transformer=WanTransformer3DModel.from_pretrained(FOLDER)));
    there the LoRA file needs no export: `WanPipeline.load_lora_weights(PATH)` reads it. Wan2.2 A14B's
    LoRA and export are its low-noise expert's: `load_lora_weights(PATH, load_into_transformer_2=True)`,
    or `WanPipeline.from_pretrained(HUB_ID, transformer_2=...from_pretrained(FOLDER))`. The weights keep
    the model's --dtype (bf16 on a GPU by default; pass --dtype float32 for a full-precision copy).
    Written to a temporary folder and renamed, so a crash never leaves half an export.
    """
    from infra.lorafile import load_lora_file
    from lora import merge_lora
    from models import base_id

    load_lora_file(model.unet, lora_path, base_id(model.spec))
    merge_lora(model.unet)  # W0 + (alpha / r) B A in every adapted layer; plain nn.Linear again
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TMP_MARK}", dir=folder.parent))
    try:
        model.unet.save_pretrained(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(tmp, e) from None
    old = folder.with_name(f".{folder.name}{TMP_MARK}old")
    shutil.rmtree(old, ignore_errors=True)  # what an export killed mid-replace left
    if folder.exists():  # an earlier export (check_export_folder made sure): replaced by renames only
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    expert = " as the pipeline's transformer_2 (the low-noise expert)" if model.denoiser is not model.unet else ""
    print(f"wrote the merged {type(model.unet).__name__} to {folder}; load it with "
          f"{type(model.unet).__name__}.from_pretrained({str(folder)!r}){expert}")


def parse_args(argv):
    from infra.setup import hyphenated

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Every flag also takes its underscore spelling (--num_prompts).")
    p.add_argument("--model", help="model name (tiny, modelscope, zeroscope, animatediff, wan, ...), local folder or "
                   f"hub id (default: the base model the --lora file names, else {DEFAULT_MODEL})")
    p.add_argument("--lora", help="a lora.safetensors written by train.py (default: none, the base model)")
    p.add_argument("--prompts", default="animals.txt",
                   help="prompts file: a path or a name under prompts/ (default: animals.txt)")
    p.add_argument("--num-prompts", type=int, default=4, help="how many prompts from the file, 0: all (default: 4)")
    p.add_argument("--output-dir", default="runs/samples", help="where the videos go (default: runs/samples)")
    p.add_argument("--side-by-side", action="store_true", help="base (left) and aligned (right) in one file")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default: 0)")
    p.add_argument("--num-steps", type=int, help="sampler steps, DDIM or Euler (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight (default: the model's)")
    p.add_argument("--negative-prompt", help="the prompt guidance steers away from (default: the model's; Wan: its authors')")
    p.add_argument("--frames", type=int, help="frames per video (default: the model's)")
    p.add_argument("--height", type=int, help="height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="width in pixels (default: the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the frozen model's dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--export-merged", metavar="DIR", help="write the denoiser with --lora merged in to DIR "
                   "(diffusers save_pretrained) instead of sampling")
    p.add_argument("--export-comfy", metavar="PATH", help="write the Wan --lora file in the layout ComfyUI's LoRA "
                   "loader reads to PATH (a .safetensors file) instead of sampling")
    return p.parse_args(hyphenated(argv))  # --output_dir as --output-dir


def main(argv=None):
    args = parse_args(argv)
    from infra.distributed import resolve_device
    from infra.lorafile import read_lora_file
    from infra.setup import is_out_of_memory
    from models import spec_of

    # Everything checked before the model loads: flags, device, the files read and the folders written.
    check_flags(args)
    check_device(args.device)
    prompts = read_prompts(args.prompts)
    prompts = prompts[: args.num_prompts] if args.num_prompts > 0 else prompts
    if args.side_by_side and not args.lora:
        raise UserError("--side-by-side compares the base with a LoRA: also pass --lora PATH")
    if args.export_merged and not args.lora:
        raise UserError("--export-merged folds a LoRA into the UNet: also pass --lora PATH")
    if args.export_comfy and not args.lora:
        raise UserError("--export-comfy converts a LoRA file for ComfyUI: also pass --lora PATH")
    if args.export_comfy and args.export_merged:
        raise UserError("--export-comfy and --export-merged each write an export instead of sampling: pass one of them")
    meta = read_lora_file(args.lora)[1] if args.lora else {}  # a bad file fails now, before anything loads
    if args.export_comfy:  # a file conversion: no model is loaded
        from infra.comfyui import export_comfyui

        return export_comfyui(args.lora, args.export_comfy)
    if args.model is None:  # the LoRA's own base, so a LoRA never meets another base by default
        base = meta.get("base_model", "")
        args.model = base or DEFAULT_MODEL
        print(f"--model {args.model}" + (f" (the base model {args.lora} was trained on)" if base else ""))
    spec_of(args.model)  # an unknown name fails now, before anything loads
    if args.export_merged:
        check_output_dir(Path(args.export_merged).parent, "--export-merged")
        check_export_folder(args.export_merged)
    else:
        check_output_dir(args.output_dir)
    device = resolve_device(args.device)
    try:
        make(args, prompts, device)
    except Exception as e:  # a failed allocation, the GPU's or the CPU's: the user's to lower
        if not is_out_of_memory(e):
            raise
        kind = "CPU memory (RAM)" if device.startswith("cpu") else "GPU memory"
        fix = ("free some memory, or pass --dtype bfloat16 for a half-size copy" if args.export_merged else
               "lower it with a smaller --height/--width or --frames")
        raise UserError(f"out of {kind}; {fix}") from None


def make(args, prompts, device):
    """Load the model, then export it merged or sample one video per prompt (written only once all are made)."""
    from infra.lorafile import load_lora_file
    from infra.setup import check_model_settings
    from models import base_id, load_video_model
    from vader import encode_prompts, generate, resolve_dtype

    model = load_video_model(args.model, device, resolve_dtype(args.dtype, device))
    if args.export_merged:
        export_merged(model, args.lora, args.export_merged)
        return
    spec = model.spec
    gen = {k: getattr(spec, k) if getattr(args, k) is None else getattr(args, k)
           for k in ("frames", "height", "width", "num_steps", "guidance")}
    check_model_settings(model, SimpleNamespace(**gen, grad_steps=0))
    low_memory = spec.recipe.get("low_memory", False)  # as train.py runs the model (Wan: on)
    negative = spec.negative_prompt if args.negative_prompt is None else args.negative_prompt
    cond, uncond = encode_prompts(model, prompts + [negative]).split([len(prompts), 1])  # (P, L, D), (1, L, D)

    def videos():
        """One video per prompt (seed + i), batched one at a time to bound memory."""
        out = []
        for i in tqdm(range(len(prompts)), desc="sampling", leave=False):
            out.append(generate(model, cond[i:i + 1], uncond, seed=args.seed + i, low_memory=low_memory,
                                **gen)[0])  # (F, 3, H, W)
        return out

    base = videos() if (args.side_by_side or not args.lora) else None
    if args.lora:
        load_lora_file(model.unet, args.lora, base_id(spec))
        aligned = videos()
    out_dir = Path(args.output_dir)
    for i, prompt in enumerate(prompts):
        if args.side_by_side:
            video = tile(torch.stack([base[i], aligned[i]]))  # (F, 3, H, 2W)
        else:
            video = aligned[i] if args.lora else base[i]
        write_video(video, out_dir / f"{i:03d}-{slug(prompt)}", spec.fps)
    atomic_write_text(out_dir / "prompts.txt", "".join(f"{i:03d}\t{p}\n" for i, p in enumerate(prompts)))
    print(f"wrote {len(prompts)} videos (.mp4 and .gif) to {out_dir}")


if __name__ == "__main__":
    run_cli(main)
