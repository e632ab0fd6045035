"""A Wan LoRA that ComfyUI loads (infra/comfyui.py): every key held to ComfyUI's own Wan key map,
the weight change ComfyUI and diffusers read from it the same as ours, Wan2.2 5B and A14B, the
sample.py --export-comfy flag and the file train.py writes beside lora.safetensors."""
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import sample
import train
from infra.cli import run_cli
from infra.comfyui import comfyui_lora, write_comfyui_lora
from infra.folder import remove_run_files
from infra.tiny import build_tiny_wan
from lora import inject_lora, save_lora
from models import load_video_model

RANK, ALPHA = 4, 8.0  # alpha != rank: a scale of 2 that a lost alpha would show
# ComfyUI's names for Wan (comfy/lora.py, model_lora_keys_unet: `diffusion_model.<module of the original
# Wan code>`), from diffusers' WanTransformer3DModel module names inside block N. Written out as facts,
# not taken from infra/comfyui.py, so a wrong entry there is caught here.
COMFY_BLOCK = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
               "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
               "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
               "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
COMFY_TOP = {"proj_out": "head.head"}
# diffusers' Wan converter refuses a head.head.alpha (it never reads one): there the scale is in lora_B.
WITHOUT_ALPHA = {"head.head"}
EVERY_MAPPED = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out")


def comfy_stem(module):
    """The ComfyUI key stem of a diffusers module path (without `transformer.`), or None."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m and m[2] in COMFY_BLOCK:
        return f"diffusion_model.blocks.{m[1]}.{COMFY_BLOCK[m[2]]}"
    return f"diffusion_model.{COMFY_TOP[module]}" if module in COMFY_TOP else None


def modules_of(ours):
    """The diffusers module paths of our LoRA file's keys."""
    return sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in ours})


def misfits(keys, modules):
    """What breaks ComfyUI's Wan key map in a file with `keys`, for a LoRA on the diffusers `modules`:
    a key that is not `<mapped stem>.lora_A.weight|lora_B.weight|alpha`, or a stem missing one of them."""
    stems = {comfy_stem(m) for m in modules}
    bad = [k for k in keys if not (re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|alpha)", k)
                                   and k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] in stems)]
    for stem in stems:
        wanted = ("lora_A.weight", "lora_B.weight") + (() if stem.endswith(tuple(WITHOUT_ALPHA)) else ("alpha",))
        bad += [f"{stem}.{w} (missing)" for w in wanted if f"{stem}.{w}" not in keys]
    return bad


def comfy_delta(comfy, stem):
    """The weight change ComfyUI applies (comfy/weight_adapter/lora.py): alpha / rank · B A, alpha absent: 1."""
    a, b = comfy[f"{stem}.lora_A.weight"], comfy[f"{stem}.lora_B.weight"]
    alpha = comfy.get(f"{stem}.alpha")
    return (alpha.item() / a.shape[0] if alpha is not None else 1.0) * (b @ a)


def our_delta(ours, module):
    return ALPHA / RANK * (ours[f"transformer.{module}.lora_B.weight"] @ ours[f"transformer.{module}.lora_A.weight"])


def lora_file(transformer, path, targets, seed=1):
    """A rank-4, alpha-8 LoRA on `targets` of `transformer`, A and B random (B A != 0), saved by save_lora."""
    params = inject_lora(transformer, rank=RANK, alpha=ALPHA, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_lora(transformer, path, prefix="transformer.", base="tiny-wan-test")
    return path


def converted(tmp_path, ours_path):
    out = write_comfyui_lora(ours_path, tmp_path / f"{ours_path.stem}_comfyui.safetensors")
    return load_file(ours_path), load_file(out), out


def check_both_loaders(ours, comfy, comfy_path):
    """ComfyUI's reading and diffusers' (WanPipeline.lora_state_dict) give our scale·B·A for every module."""
    from diffusers import WanPipeline

    theirs, meta = WanPipeline.lora_state_dict(str(comfy_path), return_lora_metadata=True)
    assert not meta or "lora_alpha" not in str(meta)  # else diffusers would scale the baked weights again
    assert sorted(theirs) == sorted(ours)  # back to diffusers' names, the same modules
    for module in modules_of(ours):
        want = our_delta(ours, module)
        torch.testing.assert_close(comfy_delta(comfy, comfy_stem(module)), want, rtol=1e-5, atol=1e-7)
        b, a = theirs[f"transformer.{module}.lora_B.weight"], theirs[f"transformer.{module}.lora_A.weight"]
        torch.testing.assert_close(b @ a, want, rtol=1e-5, atol=1e-7)  # diffusers: alpha = r, scale 1


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """The tiny Wan2.1 folder, the model loaded from it with a LoRA on its registry targets, and the file."""
    tmp = tmp_path_factory.mktemp("comfy")
    build_tiny_wan(tmp / "wan")
    model = load_video_model(str(tmp / "wan"))
    return tmp / "wan", model, lora_file(model.unet, tmp / "lora.safetensors", model.spec.lora_targets)


def test_keys_follow_comfyuis_wan_map_and_the_diffusers_layout_does_not(wan, tmp_path):
    folder, model, path = wan
    ours, comfy, out = converted(tmp_path, path)
    modules = modules_of(ours)
    assert len(modules) == 2 * 8  # two blocks, self- and cross-attention q, k, v, o
    assert misfits(list(comfy), modules) == []
    assert misfits(list(ours), modules) != []  # diffusers' names: not a key ComfyUI's Wan loader knows
    for module in modules:
        stem = comfy_stem(module)
        alpha = comfy[f"{stem}.alpha"]
        assert alpha.dtype == torch.float32 and alpha.dim() == 0 and alpha.item() == ALPHA
        assert torch.equal(comfy[f"{stem}.lora_A.weight"], ours[f"transformer.{module}.lora_A.weight"])
        assert torch.equal(comfy[f"{stem}.lora_B.weight"], ours[f"transformer.{module}.lora_B.weight"])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["base_model"] == "tiny-wan-test" and "lora_adapter_metadata" not in meta


def test_comfyui_and_diffusers_read_our_weight_change(wan, tmp_path):
    folder, model, path = wan
    check_both_loaders(*converted(tmp_path, path))
    # Every module of the map that the tiny T2V model has: feed-forward and output projection too.
    from diffusers import WanTransformer3DModel

    every = lora_file(WanTransformer3DModel.from_pretrained(folder / "transformer"), tmp_path / "every.safetensors",
                      EVERY_MAPPED)
    ours, comfy, out = converted(tmp_path, every)
    assert misfits(list(comfy), modules_of(ours)) == [] and "diffusion_model.head.head.lora_B.weight" in comfy
    check_both_loaders(ours, comfy, out)


def test_a_module_outside_the_map_is_named():
    tensors = {"transformer.condition_embedder.time_proj.lora_A.weight": torch.zeros(RANK, 8),
               "transformer.condition_embedder.time_proj.lora_B.weight": torch.zeros(8, RANK)}
    with pytest.raises(ValueError, match=r"transformer\.condition_embedder\.time_proj"):
        comfyui_lora(tensors, {"rank": str(RANK), "alpha": str(ALPHA), "prefix": "transformer."})


@pytest.mark.parametrize("version", ["2.2-5b", "2.2-a14b"])
def test_wan22_loras_convert(version, tmp_path):
    build_tiny_wan(tmp_path / "m", version=version)
    model = load_video_model(str(tmp_path / "m"))
    if version == "2.2-a14b":  # the LoRA is the low-noise expert's: transformer_2 of the folder
        with safe_open(str(tmp_path / "m" / "transformer_2" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert torch.equal(model.unet.proj_out.weight.detach(), f.get_tensor("proj_out.weight"))
        assert model.denoiser.low is model.unet
    path = lora_file(model.unet, tmp_path / "lora.safetensors", model.spec.lora_targets)
    ours, comfy, out = converted(tmp_path, path)
    assert misfits(list(comfy), modules_of(ours)) == []
    check_both_loaders(ours, comfy, out)


def test_sample_exports_for_comfyui_and_refuses_a_unet_lora(wan, tmp_path, capsys):
    folder, model, path = wan
    out = tmp_path / "for_comfy.safetensors"
    run_cli(sample.main, ["--lora", str(path), "--export-comfy", str(out)])
    assert load_file(out).keys() == load_file(write_comfyui_lora(path, tmp_path / "direct.safetensors")).keys()
    assert "ComfyUI" in capsys.readouterr().out and not (tmp_path / "runs").exists()
    unet = nn.ModuleDict({"to_q": nn.Linear(8, 8)})  # a UNet LoRA: `unet.` keys
    inject_lora(unet, rank=RANK, alpha=ALPHA)
    save_lora(unet, tmp_path / "unet_lora.safetensors", prefix="unet.")
    with pytest.raises(SystemExit) as e:
        run_cli(sample.main, ["--lora", str(tmp_path / "unet_lora.safetensors"), "--export-comfy",
                              str(tmp_path / "unet_comfy.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "converts to ComfyUI's names" in err and "unet." in err
    assert not (tmp_path / "unet_comfy.safetensors").exists()
    for argv in (["--export-comfy", str(tmp_path / "x.safetensors")],  # no --lora
                 ["--lora", str(path), "--export-comfy", str(tmp_path / "x.pt")],  # ComfyUI lists .safetensors
                 ["--lora", str(path), "--export-comfy", str(path)]):  # over the LoRA itself
        with pytest.raises(SystemExit) as e:
            run_cli(sample.main, argv)
        assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.pt").exists()


def test_a_wan_run_writes_the_comfyui_file_and_overwrite_removes_it(tmp_path):
    out = tmp_path / "run"
    run_cli(train.main, ["--model", "tiny-wan", "--reward", "brightness", "--prompts", "animals.txt",
                         "--num-steps", "2", "--frames", "5", "--height", "16", "--width", "16", "--max-steps", "1",
                         "--grad-accum", "1", "--num-videos", "1", "--eval-every", "0", "--output-dir", str(out)])
    ours, comfy = load_file(out / "lora.safetensors"), load_file(out / "lora_comfyui.safetensors")
    assert misfits(list(comfy), modules_of(ours)) == [] and len(comfy) == 3 * len(ours) // 2
    remove_run_files(out)
    assert not (out / "lora_comfyui.safetensors").exists()
