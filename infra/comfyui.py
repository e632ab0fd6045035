"""A Wan LoRA in the layout ComfyUI loads: the original Wan module names, and alpha as a tensor.

lora.save_lora writes diffusers' layout (`transformer.blocks.0.attn1.to_q.lora_A.weight`, rank and
alpha in the metadata). ComfyUI's LoRA loader (comfy/lora.py, `model_lora_keys_unet`) has no Wan
branch for diffusers' names: for Wan it takes `diffusion_model.<module>` keys in the original Wan
code's names (`blocks.0.self_attn.q`), `lora_A.weight`/`lora_B.weight`, and a scalar `<module>.alpha`
tensor per module (scale alpha / rank; none means 1). It reads no metadata.

diffusers' WanLoraLoaderMixin reads the same file (`_convert_non_diffusers_wan_lora_to_diffusers`,
which bakes alpha / rank into the weights), so the converted file loads in both. The one module
where the two disagree is the output projection (`proj_out`, Wan's `head.head`): diffusers'
converter never consumes a `head.head.alpha` and refuses the file, so there the scale is folded
into lora_B and no alpha written, which means the same to ComfyUI (no alpha: scale 1).

The metadata is kept (base_model, rank, alpha) but for `lora_adapter_metadata`, the LoraConfig
diffusers builds its scaling from: the converted weights already carry alpha / rank, so diffusers
must take alpha = r for them. A UNet LoRA is not converted: ComfyUI has no key map for the UNet3D's
or the motion modules' diffusers names.
"""
import re
from pathlib import Path

import torch
from safetensors.torch import save

from infra.cli import UserError
from infra.files import TMP_MARK, atomic_path, check_name

WAN_PREFIX = "transformer."  # wan.WanVideoModel.lora_prefix
COMFY_PREFIX = "diffusion_model."
# diffusers' WanTransformer3DModel module inside a block -> the original Wan module (ComfyUI's names).
BLOCK_MODULES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",  # I2V's image keys/values
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
TOP_MODULES = {"proj_out": "head.head"}
NO_ALPHA = ("head.head",)  # diffusers' converter refuses a `.alpha` here: the scale goes into lora_B


def comfy_module(module):
    """The ComfyUI (original Wan) name of a diffusers module path inside the transformer, or None."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if match and match[2] in BLOCK_MODULES:
        return f"blocks.{match[1]}.{BLOCK_MODULES[match[2]]}"
    return TOP_MODULES.get(module)


def comfyui_lora(tensors, meta):
    """(tensors, metadata) in ComfyUI's Wan layout from a diffusers-layout Wan LoRA (`tensors`, as
    save_lora writes them, and its safetensors metadata `meta` with rank and alpha): per module
    `diffusion_model.<Wan module>.lora_A.weight`, `.lora_B.weight` and a float32 scalar `.alpha`.
    A UNet LoRA, or a module outside the map, is a ValueError naming it."""
    prefix = meta.get("prefix", WAN_PREFIX)
    if prefix == "unet." or any(k.startswith("unet.") for k in tensors):
        raise ValueError("this is a UNet LoRA (diffusers `unet.` keys); only a Wan LoRA (`transformer.` keys) converts "
                         "to ComfyUI's names: load a UNet LoRA with diffusers, or export the merged UNet (--export-merged)")
    rank, alpha = int(meta["rank"]), float(meta["alpha"])
    out = {}
    for key in sorted(tensors):
        if not key.startswith(WAN_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{key} is not a Wan LoRA key ({WAN_PREFIX}<module>.lora_A.weight or .lora_B.weight)")
        module, _, half = key[len(WAN_PREFIX):].rpartition(".lora_")
        stem = comfy_module(module)
        if stem is None:
            raise ValueError(f"the LoRA adapts {WAN_PREFIX}{module}, which has no name in ComfyUI's Wan loader "
                             f"(it knows blocks.N.{{{', '.join(BLOCK_MODULES)}}} and {', '.join(TOP_MODULES)})")
        value = tensors[key].float()
        if stem in NO_ALPHA:
            value = value * (alpha / rank) if half == "B.weight" else value
        else:
            out[f"{COMFY_PREFIX}{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        out[f"{COMFY_PREFIX}{stem}.lora_{half}"] = value.contiguous()
    kept = {k: v for k, v in meta.items() if k != "lora_adapter_metadata"}
    return out, {**kept, "format": "comfyui", "prefix": COMFY_PREFIX}


def check_comfy_path(path, lora_path, flag="--export-comfy"):
    """UserError, before any work, for a PATH the export cannot go to: not a .safetensors name (ComfyUI's
    LoRA list shows only model files), a name the operating system refuses (with room for the temporary
    name beside it), a folder, or the --lora file itself."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{flag} {path}: ComfyUI lists LoRA files by their extension; pass a name ending in "
                        ".safetensors (e.g. lora_comfyui.safetensors)")
    check_name(path, flag, last_room=len(".") + len(TMP_MARK) + 8)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass the path of the file to write")
    if path.exists() and path.resolve() == Path(lora_path).resolve():
        raise UserError(f"{flag} {path} is the --lora file itself, which it would replace; pass another path")


def write_comfyui_lora(src_path, dst_path):
    """Read our LoRA file `src_path` (infra.lorafile.read_lora_file) and write it in ComfyUI's Wan layout
    to `dst_path` (atomically). Anything that does not convert is a one-line UserError."""
    from infra.lorafile import read_lora_file

    tensors, meta = read_lora_file(src_path)
    try:
        out, out_meta = comfyui_lora(tensors, meta)
    except ValueError as e:
        raise UserError(f"{src_path}: {e}") from None
    data = save(out, metadata=out_meta)
    with atomic_path(dst_path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(dst_path)


def export_comfyui(lora_path, path, flag="--export-comfy"):
    """sample.py --export-comfy: the checks, then the ComfyUI file of a Wan LoRA file written to `path`."""
    from infra.checks import check_output_dir

    check_output_dir(Path(path).parent, flag)
    check_comfy_path(path, lora_path, flag)
    path = write_comfyui_lora(lora_path, path)
    print(f"wrote {path} for ComfyUI's LoRA loader (on the Wan model; Wan2.2 A14B: on the low-noise model)")
