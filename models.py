"""Video models: the registry, the family interface, and the UNet families that implement it.

A family answers the questions vader.py lists (how it encodes prompts, its latent shape, which
frames it decodes exactly and how, its `denoiser` and `schedule`), and those the harness asks:
how it is checkpointed and read from a diffusers-layout folder (`enable_checkpointing`,
`load_components`), which blocks FSDP shards under --shard (`shard_blocks`). The denoiser, in the
field `unet` whatever its kind (a LoRA file's keys take the family's `lora_prefix`), maps latents
(B, C, F, h, w) and text to a prediction of the same shape. The two UNet families share SD's VAE:
- "unet3d": ModelScope T2V and its fine-tunes (Zeroscope): a `UNet3DConditionModel`, OpenCLIP-H text.
- "animatediff": an SD 1.5 `UNet2DConditionModel` with AnimateDiff's motion modules inserted by
  `UNetMotionModel.from_unet2d(unet, adapter)`, CLIP ViT-L text.
Wan's flow-matching transformers and causal VAEs (Wan2.1, Wan2.2) are a chapter of their own: wan.py."""
import importlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from infra.cli import UserError, quiet_libraries
from infra.offload import swapped
from infra.files import first_line, model_configs
from infra.loading import strict
from infra.tiny import TINY_BUILDERS, tiny_folder
from lora import TARGETS
from sampler import Schedule
from vader import checkpoint_blocks

TOY_FOLDER = Path(__file__).resolve().parent / "toy" / "model"  # the toy world's model (toy/pretrain.py; committed)
# AnimateDiff's scheduler, as its diffusers docs load it: DDIM on the linear β schedule its motion
# modules were trained with (SD 1.5's own config says scaled_linear), "linspace" timesteps.
ANIMATEDIFF_SCHEDULER = dict(beta_schedule="linear", clip_sample=False, timestep_spacing="linspace", steps_offset=1)
# Wan's authors' negative prompt (`sample_neg_prompt` in wan/configs/shared_config.py, Wan2.1 and 2.2; diffusers: "")
WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
                "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


@dataclass(frozen=True)
class ModelSpec:
    """A video model's source, how to load it, and its generation defaults (flags override them)."""

    source: str  # hub id or local folder in the diffusers layout; "" for a built-in tiny model
    height: int
    width: int
    frames: int
    num_steps: int  # sampler steps (DDIM, or Euler for a flow model)
    guidance: float  # classifier-free guidance weight
    family: str = "unet3d"  # a key of FAMILIES
    adapter: str = ""  # animatediff only: the MotionAdapter's hub id or folder
    scheduler: dict = field(default_factory=dict)  # overrides of the source's scheduler/ config
    lora_targets: tuple = TARGETS  # the nn.Linear names that get LoRA adapters
    recipe: dict = field(default_factory=dict)  # training defaults that differ from the paper's
    variant: str = ""  # the hub's half-precision copy of the UNet and VAE, half the download; cast to --dtype
    guidance_high: float = None  # Wan2.2 A14B: the high-noise expert's guidance (--guidance is the trained one's)
    fps: int = 8  # the frame rate the model's videos are made for: what a reward reading the clip at its own rate needs
    negative_prompt: str = ""  # the prompt of guidance's unconditional pass (--negative-prompt); Wan's: WAN_NEGATIVE


TINY_RECIPE = {"lr": 1e-2, "grad_accum": 1, "batch_size": 2}  # random weights (infra/tiny.py): a large step
MODELS = {
    "tiny": ModelSpec("", 32, 32, 8, 10, 3.0, recipe=TINY_RECIPE),
    # Wan2.1, Wan2.2 TI2V-5B and Wan2.2 A14B in miniature (infra/tiny.py); 9 frames are 3 latent frames.
    "tiny-wan": ModelSpec("", 32, 32, 9, 10, 5.0, family="wan", recipe=TINY_RECIPE, fps=16),
    "tiny-wan22": ModelSpec("", 32, 32, 9, 10, 5.0, family="wan", scheduler={"flow_shift": 5.0}, recipe=TINY_RECIPE,
                             fps=24),
    "tiny-wan22-a14b": ModelSpec("", 32, 32, 9, 10, 3.0, family="wan", scheduler={"flow_shift": 12.0},
                                 guidance_high=4.0, recipe=TINY_RECIPE, fps=16),
    # The toy world (toy/world.py): a tiny UNet3D pretrained on clips of one coloured shape moving over a plain
    # background; its recipe, the demo, aligns it to the learned judge on the two colour/shape pairs it never saw.
    "toy": ModelSpec(str(TOY_FOLDER), 32, 32, 8, 10, 3.0,
                     recipe={"reward": "toy_judge", "prompts": "toy_heldout.txt", "eval_prompts": "toy_eval.txt",
                             "max_steps": 60, "lr": 3e-3, "grad_steps": 2, "grad_accum": 1, "batch_size": 2,
                             "eval_every": 60, "eval_videos": 32, "eval_rewards": "detector,toy_judge,dynamics"}),
    # VADER's ModelScope setting (Table 6 of 2407.08737 and its configs): 25 DDIM steps, guidance 9;
    # the pipeline's default 256x256 with 16 frames (VADER: 384x384). Formerly damo-vilab/....
    "modelscope": ModelSpec("ali-vilab/text-to-video-ms-1.7b", 256, 256, 16, 25, 9.0, variant="fp16"),
    # The ModelScope architecture fine-tuned for 576x320, 24 frames.
    "zeroscope": ModelSpec("cerspense/zeroscope_v2_576w", 320, 576, 24, 25, 9.0),
    # SD 1.5 (the official mirror of the withdrawn runwayml repository) plus the v1-5-2 motion adapter;
    # 512x512, 16 frames, 25 steps, guidance 7.5 as in its docs. Any SD 1.5 fine-tune can replace it.
    "animatediff": ModelSpec("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, 512, 16, 25, 7.5,
                             family="animatediff", adapter="guoyww/animatediff-motion-adapter-v1-5-2",
                             scheduler=ANIMATEDIFF_SCHEDULER, variant="fp16"),
    # Wan2.1 T2V 1.3B at 480x832 (wan.py), 33 frames (81 with --frames 81); 40 Euler steps as
    # VideoX-Fun's reward trainer samples, guidance 5 as the pipeline's; --low-memory by default.
    "wan": ModelSpec("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 480, 832, 33, 40, 5.0, family="wan",
                     recipe={"low_memory": True}, fps=16),
    # Wan2.1 T2V 14B, for several GPUs (--shard): the documented 480p setting (flow shift 3; 720p's is 5).
    "wan-14b": ModelSpec("Wan-AI/Wan2.1-T2V-14B-Diffusers", 480, 832, 81, 50, 5.0, family="wan",
                         scheduler={"flow_shift": 3.0}, recipe={"low_memory": True}, fps=16),
    # Wan2.2 TI2V-5B as documented: 704x1280 (H x W), 121 frames, 50 steps, guidance 5, flow shift 5.
    "wan22-5b": ModelSpec("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 704, 1280, 121, 50, 5.0, family="wan",
                          scheduler={"flow_shift": 5.0}, recipe={"low_memory": True}, fps=24),
    # Wan2.2 T2V-A14B as its t2v-A14B config: guidance 4 for the high-noise expert, 3 for the trained one.
    "wan22-a14b": ModelSpec("Wan-AI/Wan2.2-T2V-A14B-Diffusers", 480, 832, 81, 40, 3.0, family="wan",
                            scheduler={"flow_shift": 12.0}, guidance_high=4.0, recipe={"low_memory": True}, fps=16),
}
MODELS = {k: replace(s, negative_prompt=WAN_NEGATIVE) if s.family == "wan" else s for k, s in MODELS.items()}


#### The family interface, implemented for the UNet families

@dataclass
class VideoModel:
    """The frozen parts of a text-to-video latent diffusion model, plus its registry entry."""

    unet: torch.nn.Module  # the denoiser: (B, C, F, h, w) latents -> a prediction of the same shape
    vae: torch.nn.Module  # AutoencoderKL: per frame (N, 4, h, w) -> (N, 3, H, W)
    text_encoder: torch.nn.Module  # tokens (P, L) -> embeddings (P, L, D)
    tokenizer: object
    schedule: object  # sampler.Schedule (DDIM) or sampler.FlowSchedule
    spec: ModelSpec
    device: str = "cpu"  # where the denoiser and the VAE live

    lora_prefix = "unet."  # the key prefix of a LoRA file, as diffusers' pipelines load it
    denoiser = property(lambda self: self.unet)  # what sampler.sample runs (Wan2.2 A14B: its two experts)
    base_id = property(lambda self: base_id(self.spec))  # the name its LoRA files record
    schedule_class = Schedule
    parts = "unet/, vae/, text_encoder/, tokenizer/, scheduler/, and a motion adapter for an SD 1.5 UNet"

    # Pixels per latent cell (each SD VAE up block but the last doubles the resolution): what height and width divide by.
    vae_factor = property(lambda self: 2 ** (len(self.vae.config.block_out_channels) - 1))
    size_multiple = property(lambda self: self.vae_factor)
    temporal_factor = 1  # pixel frames per latent frame after the first: 1 for SD's per-frame VAE

    def latent_frames(self, frames):
        """Latent frames of an F-frame video: 1 + (F - 1) / temporal_factor (F for SD's VAE)."""
        return (frames - 1) // self.temporal_factor + 1

    latent_channels = property(lambda self: self.unet.config.in_channels)

    text_length = property(lambda self: self.tokenizer.model_max_length if self.tokenizer else 77)  # CLIP's 77 tokens

    def embed(self, prompts):
        """Prompts -> embeddings (b, L, D): CLIP's last hidden state. CLIP encoders were trained
        on prompts padded to the full length, and read the padding as is."""
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.text_length,
                                return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]  # (b, L, D)

    def text_encoder_on_device(self):
        """The text encoder visits the model's device for the prompts' one encoding, then waits on CPU."""
        return swapped(self.device, arriving=[self.text_encoder])

    prefix_frames = staticmethod(lambda frames, f: frames)  # the first frames f decoded ones come from: all F

    def decode_frames(self, z0, frame_idx, use_checkpoint=True, one_at_a_time=False):
        """Decode only the chosen frames of z0 (B, C, F, h, w) -> frames (B, f, 3, H, W) in [0, 1].

        SD's VAE is a 2D image decoder, so the f frames of each video are folded into the batch.
        `use_checkpoint` recomputes the decoder's activations in backward; `one_at_a_time`
        (--low-memory) makes each frame its own checkpoint, for B*f small decoder calls."""
        z = z0[:, :, frame_idx]  # (B, C, f, h, w)
        b, c, f, h, w = z.shape
        z = z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B*f, C, h, w)
        z = (z / self.vae.config.scaling_factor).to(self.vae.dtype)  # undo the latent scaling of LDM

        def run(z):  # (n, C, h, w) -> (n, 3, H, W) in about [-1, 1]
            if use_checkpoint and torch.is_grad_enabled():
                return checkpoint(lambda z: self.vae.decode(z).sample, z, use_reentrant=False)
            return self.vae.decode(z).sample

        x = torch.cat([run(zi) for zi in z.split(1)]) if one_at_a_time else run(z)  # (B*f, 3, H, W)
        x = (x.float() / 2 + 0.5).clamp(0, 1)  # (B*f, 3, H, W) in [0, 1]
        return x.view(b, f, *x.shape[1:])  # (B, f, 3, H, W)

    def shard_blocks(self):  # the denoiser's units of FSDP sharding under --shard (infra/sharding.py)
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]

    def enable_checkpointing(self):
        """Checkpoint every module inside the UNet's blocks and the VAE decoder's (`checkpoint_blocks`)."""
        checkpoint_blocks(self.unet)
        checkpoint_blocks(self.vae.decoder)

    @classmethod
    def load_components(cls, source, spec, dtype):
        """{unet, vae, text_encoder, tokenizer} from `source`, as diffusers' pipelines read them, each whole."""
        from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        kind = UNet3DConditionModel.load_config(source, subfolder="unet").get("_class_name")
        half = dict(torch_dtype=dtype, variant=spec.variant or None)
        if kind == "UNet3DConditionModel":
            unet = strict(UNet3DConditionModel).from_pretrained(source, subfolder="unet", **half)
        elif kind == "UNetMotionModel":  # an AnimateDiff pipeline saved whole: motion modules already inside
            unet = per_frame_text(strict(UNetMotionModel).from_pretrained(source, subfolder="unet", **half))
        else:  # an SD 1.5 image UNet plus a motion adapter
            unet2d = strict(UNet2DConditionModel).from_pretrained(source, subfolder="unet", **half)
            motion = strict(MotionAdapter).from_pretrained(spec.adapter, torch_dtype=dtype)
            unet = per_frame_text(UNetMotionModel.from_unet2d(unet2d, motion))
        vae = strict(AutoencoderKL).from_pretrained(source, subfolder="vae", **half)
        text_encoder = strict(CLIPTextModel).from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype)
        return dict(unet=unet, vae=vae, text_encoder=text_encoder,
                    tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"))


def _repeat_text(unet, args, kwargs):
    """Forward pre-hook: one prompt embedding a video (B, L, D) -> one a frame (B*F, L, D)."""
    x, text = args[0], kwargs["encoder_hidden_states"]  # (B, C, F, h, w), (B, L, D)
    if text.shape[0] == x.shape[0]:
        # UNetMotionModel folds frames as index b*F + f, so frame f of video b meets prompt b.
        kwargs["encoder_hidden_states"] = text.repeat_interleave(x.shape[2], dim=0)  # (B*F, L, D)
    return args, kwargs


def per_frame_text(unet):
    """Let a UNetMotionModel take (B, L, D) text embeddings, as UNet3D does, so the sampler serves both: it reads
    (B, C, F, h, w) and folds the frames into the batch itself, whatever its docstring says (tests/test_models.py
    checks), but does not repeat the text per frame. A hook, not a wrapper: module paths and LoRA keys stay diffusers'."""
    unet.register_forward_pre_hook(_repeat_text, with_kwargs=True)
    return unet


#### The registry of families, and loading

# family -> "module:class". A family outside this file is imported only when it is loaded.
FAMILIES = {"unet3d": "models:VideoModel", "animatediff": "models:VideoModel", "wan": "wan:WanModel"}
# The denoiser's class name (in unet/ or transformer/) -> (family, the registry entry whose defaults it takes).
DENOISERS = {"UNet3DConditionModel": ("unet3d", "modelscope"), "UNet2DConditionModel": ("animatediff", "animatediff"),
             "UNetMotionModel": ("animatediff", "animatediff"), "WanTransformer3DModel": ("wan", "wan")}


def family_class(family):
    """The class that implements `family`."""
    module, _, name = FAMILIES[family].partition(":")
    return getattr(importlib.import_module(module), name)


def spec_of(name):
    """The registry entry for `name`: a key of MODELS, a registered source, or a local folder or hub id,
    whose family and size are read off its configs (no weights are read)."""
    spec = MODELS.get(name) or next((s for s in MODELS.values() if s.source == name), None)
    if spec is not None:
        return spec
    if not (os.path.isdir(name) or "/" in name):
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}, a local folder, or a hub id")
    denoiser, vae, index = model_configs(name)
    kind = (denoiser or {}).get("_class_name")
    if kind not in DENOISERS or vae is None:
        found = f"a {kind} in its denoiser's folder" if kind else "no unet/ or transformer/ config"
        raise UserError(f"could not load the video model from {name!r} ({found if vae else 'no vae/ config'}); "
                        f"supported denoisers: {', '.join(DENOISERS)}. Check the folder or hub id and your connection")
    family, entry = DENOISERS[kind]
    if family == "wan":  # Wan's configs state no resolution: the defaults of its generation's entry
        return replace(MODELS[wan_entry(index, denoiser, vae)], source=name, variant="")
    spec = replace(MODELS[entry], source=name, family=family, variant="")  # its own files, whatever they are
    size = denoiser["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    local_adapter = Path(name) / "motion_adapter"  # AnimateDiff's pipeline layout carries its own
    return replace(spec, height=size, width=size,
                   adapter=str(local_adapter) if local_adapter.is_dir() else spec.adapter)


def wan_entry(index, transformer_config, vae_config):
    """The entry a Wan folder takes: A14B names two experts, TI2V-5B's VAE is residual, a 14B has 40 blocks."""
    if index.get("boundary_ratio") is not None:
        return "wan22-a14b"
    if vae_config.get("is_residual"):
        return "wan22-5b"
    return "wan-14b" if transformer_config.get("num_layers") == 40 else "wan"


def base_id(spec):
    """The name a LoRA file records as its base model: the hub id, or a folder's absolute path."""
    source = spec.source or next(k for k, s in MODELS.items() if s == spec)  # a built-in tiny model: its name
    return str(Path(source).resolve()) if os.path.isdir(source) else source


def load_video_model(name, device="cpu", dtype=torch.float32):
    """Load `name` (a key of MODELS, a folder or a hub id) frozen and checkpointed, by `from_pretrained`."""
    quiet_libraries()
    if name in TINY_BUILDERS:
        with tiny_folder(name) as folder:
            return _load(folder, MODELS[name], device, dtype)
    if name == "toy" and not (TOY_FOLDER / "unet").is_dir():
        raise UserError(f"the toy model's weights are missing from {TOY_FOLDER}; restore them with "
                        "`git checkout -- toy/model` or rebuild them with `python -m toy.pretrain`")
    spec = spec_of(name)
    return _load(spec.source, spec, device, dtype)


def _load(source, spec, device, dtype):
    from diffusers import DDIMScheduler
    from safetensors import SafetensorError

    cls = family_class(spec.family)
    try:
        parts = cls.load_components(source, spec, dtype)
        scheduler = dict(DDIMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError, SafetensorError) as e:  # missing or damaged files, bad configs, no network
        raise UserError(f"could not load the video model from {source!r} ({first_line(e)}); check the hub id or "
                        f"folder (it needs {cls.parts}) and your connection") from None
    for m in parts.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    # The text encoder (and a second expert) wait in CPU memory and visit the device only when needed.
    parts["unet"], parts["vae"] = parts["unet"].to(device), parts["vae"].to(device)
    model = cls(**parts, schedule=cls.schedule_class.from_config({**scheduler, **spec.scheduler}), spec=spec, device=device)
    model.enable_checkpointing()
    return model
