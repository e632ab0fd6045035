"""Video models: the registry, loading each family, and fitting one on a 24 GB GPU.

Three families of latent video diffusion models, all called as model(x_t, t, text) on latents
(B, C, F, h, w) and returning a prediction of the same shape (ε for the UNets, a velocity for Wan):
- "unet3d": ModelScope T2V 1.7B and its fine-tunes (Zeroscope). A `UNet3DConditionModel`
  (spatial and temporal layers, 1.41 B parameters), Stable Diffusion's VAE, and an OpenCLIP-H
  text encoder (1024-d embeddings).
- "animatediff": a Stable Diffusion 1.5 `UNet2DConditionModel` with AnimateDiff's motion modules
  inserted by diffusers' `UNetMotionModel.from_unet2d(unet, adapter)`, SD's VAE, and CLIP ViT-L's
  text encoder (768-d). UNetMotionModel folds the frames into the batch itself
  (`sample.permute(0, 2, 1, 3, 4).reshape(B*F, C, h, w)` in its forward) and unfolds them at the
  end, so it takes the same (B, C, F, h, w) latents as UNet3D; its docstring says (B, F, C, h, w),
  but the code is what counts, and tests/test_models.py checks it. Unlike UNet3D it does not
  repeat the text embeddings per frame (AnimateDiff's pipeline does); `per_frame_text` does.
- "wan": Wan2.1 T2V, a flow-matching video transformer (`WanTransformer3DModel`, 1.42 B
  parameters for the 1.3B model: 30 blocks of self-attention over every latent patch of every
  frame, cross-attention to the text, and an FFN), a causal 3D VAE (`AutoencoderKLWan`: 8x
  spatial and 4x temporal compression, F pixel frames <-> 1 + (F - 1) / 4 latent frames) and a
  UMT5-XXL text encoder (5.7 B parameters, 4096-d embeddings of 512 tokens). It samples with
  sampler.FlowSchedule and decodes with vader.decode_causal.

Everything that makes training fit one GPU (precision, three kinds of checkpointing) is stated
once, in vader.py's "Precision and memory" section; the checkpointing inside the UNet lives here.
"""
import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from infra.cli import UserError, quiet_libraries
from infra.files import first_line
from lora import TARGETS
from sampler import FlowSchedule, Schedule

# The toy world's pretrained model (toy/pretrain.py writes it; committed with the code).
TOY_FOLDER = Path(__file__).resolve().parent / "toy" / "model"
# AnimateDiff's scheduler, as its diffusers docs load it: DDIM on the linear β schedule its motion
# modules were trained with (SD 1.5's own config says scaled_linear), "linspace" timesteps.
# clip_sample is listed for fidelity to those docs; our sampler never clips x0 anyway.
ANIMATEDIFF_SCHEDULER = dict(beta_schedule="linear", clip_sample=False, timestep_spacing="linspace", steps_offset=1)
# Wan2.1's scheduler/ (UniPC on flow sigmas, shift 3 for 480p): the tiny Wan writes the same, and
# sampler.FlowSchedule reads its flow_shift.
WAN_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
WAN_TEXT_LENGTH = 512  # WanPipeline pads or cuts every prompt to 512 UMT5 tokens
CLIP_TEXT_LENGTH = 77  # CLIP's context length


@dataclass(frozen=True)
class ModelSpec:
    """A video model's source, how to load it, and its generation defaults (flags override them)."""

    source: str  # hub id or local folder in the diffusers layout; "" for the built-in tiny model
    height: int
    width: int
    frames: int
    num_steps: int  # sampler steps (DDIM, or Euler for a flow model)
    guidance: float  # classifier-free guidance weight
    family: str = "unet3d"  # "unet3d" (ModelScope layout), "animatediff" (SD 1.5 UNet + motion adapter) or "wan"
    adapter: str = ""  # animatediff only: the MotionAdapter's hub id or folder
    scheduler: dict = field(default_factory=dict)  # overrides of the source's scheduler/ config
    lora_targets: tuple = TARGETS  # the nn.Linear names that get LoRA adapters
    recipe: dict = field(default_factory=dict)  # training defaults that differ from the paper's


MODELS = {
    # Built from small configs with a fixed seed: random weights, no download, runs on a CPU.
    # Its recipe: a larger learning rate, because a random model's LoRA starts far from any
    # useful direction, and no gradient accumulation, so the demo finishes in a minute or two.
    "tiny": ModelSpec("", 32, 32, 8, 10, 3.0, recipe={"lr": 1e-2, "grad_accum": 1, "batch_size": 2}),
    # Wan2.1's family in miniature (infra/tiny.py), with the same recipe: 9 frames are 3 latent frames.
    "tiny-wan": ModelSpec("", 32, 32, 9, 10, 5.0, family="wan", recipe={"lr": 1e-2, "grad_accum": 1, "batch_size": 2}),
    # The toy world (toy/world.py): a tiny UNet3D pretrained on captioned clips of one coloured
    # shape moving over a plain background ("a big green square moving left"). Its weights are in
    # the repository, so it draws real content offline. Its recipe is gentler than the random
    # model's: a pretrained model's LoRA needs small steps to change what it draws without
    # breaking it, and two grad steps give the gradient more of the chain to act on. Its
    # held-out videos are also read by the toy world's weight-free detector (toy/rewards.py) and
    # its learned judge (toy/judge.py), each apart for the held-out and the seen pairs.
    "toy": ModelSpec(str(TOY_FOLDER), 32, 32, 8, 10, 3.0,
                     recipe={"lr": 5e-4, "grad_steps": 2, "grad_accum": 1, "batch_size": 2,
                             "eval_rewards": "detector,toy_judge,dynamics"}),
    # VADER's ModelScope setting (Table 6 of 2407.08737 and its configs): 25 DDIM steps,
    # guidance 9; the pipeline's default resolution is 256x256 with 16 frames (VADER: 384x384).
    # Also reachable by its old id damo-vilab/text-to-video-ms-1.7b, which the hub redirects.
    "modelscope": ModelSpec("ali-vilab/text-to-video-ms-1.7b", 256, 256, 16, 25, 9.0),
    # The ModelScope architecture fine-tuned for 576x320, 24 frames.
    "zeroscope": ModelSpec("cerspense/zeroscope_v2_576w", 320, 576, 24, 25, 9.0),
    # SD 1.5 (the official mirror of runwayml/stable-diffusion-v1-5, which was taken down) plus
    # the v1-5-2 motion adapter; 512x512, 16 frames, 25 steps and guidance 7.5 as in its docs.
    # Any SD 1.5 fine-tune in the diffusers layout can replace the source (--model FOLDER).
    "animatediff": ModelSpec("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, 512, 16, 25, 7.5,
                             family="animatediff", adapter="guoyww/animatediff-motion-adapter-v1-5-2",
                             scheduler=ANIMATEDIFF_SCHEDULER),
    # Wan2.1 T2V 1.3B at its 480p size, 480x832. 33 frames (9 latent frames) by default: the memory
    # simulator (bench.py memory) puts a K = 1 step within a 12 GB card there, and the model's full
    # 81 frames within 16 GiB (--frames 81). Its recipe turns --low-memory on: each grad step is
    # checkpointed whole, so the transformer's 30 block inputs, kept for each guidance pass, are
    # gone while the VAE decoder's backward (the peak) runs; the extra transformer forward costs
    # 3.6% more FLOPs a step at 25 steps, less at 40. 40 Euler steps on the shifted σ schedule, as the
    # public reward-LoRA trainer for Wan (VideoX-Fun) samples; the pipeline's 50 UniPC steps would
    # cost a quarter more. Guidance 5, the pipeline's. LoRA on the attention projections (attn1,
    # self; attn2, cross) of the 30 blocks: 240 linears, 11.8 M parameters at r = 16, VADER's
    # choice. The FFNs hold most of a block's weights; adapting them too (VideoX-Fun does) would
    # add 10.1 M parameters at r = 16, and nothing here has measured that it aligns better.
    "wan": ModelSpec("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 480, 832, 33, 40, 5.0, family="wan",
                     recipe={"low_memory": True}),
}


def describe(spec):
    """A registry entry in one line, for the start-up banner."""
    source = spec.source or "built in, random weights"
    if spec.family == "animatediff":
        source += f" + motion adapter {spec.adapter}"
    scheduler = ", ".join(f"{k}={v}" for k, v in spec.scheduler.items()) or "the source's own"
    recipe = ", ".join(f"{k}={v}" for k, v in spec.recipe.items()) or "the paper's"
    sampler = "flow-matching Euler" if spec.family == "wan" else "DDIM"
    return (f"{spec.family}: {source} | {spec.frames} frames of {spec.height}x{spec.width}, {spec.num_steps} {sampler} "
            f"steps, guidance {spec.guidance} | scheduler: {scheduler} | LoRA targets {', '.join(spec.lora_targets)} "
            f"| training defaults: {recipe}")


@dataclass
class VideoModel:
    """The frozen parts of a text-to-video latent diffusion model, plus its defaults.

    `unet` is the denoiser whatever its kind (the name is the one every LoRA file and
    checkpoint of the UNet families was written with): a UNet, or Wan's transformer.
    """

    unet: torch.nn.Module  # UNet3D, UNetMotionModel or WanTransformer3DModel: (B, C, F, h, w) -> same
    vae: torch.nn.Module  # AutoencoderKL (per frame: (N, 4, h, w) -> (N, 3, H, W)) or AutoencoderKLWan (per video)
    text_encoder: torch.nn.Module  # CLIPTextModel or UMT5EncoderModel: tokens (P, L) -> embeddings (P, L, D)
    tokenizer: object
    schedule: object  # sampler.Schedule (DDIM) or sampler.FlowSchedule
    spec: ModelSpec
    device: str = "cpu"  # where the denoiser and the VAE live

    @property
    def wan(self):
        return self.spec.family == "wan"

    @property
    def vae_factor(self):
        """Pixels per latent cell: each SD VAE down block but the last halves the resolution; Wan's says."""
        if self.wan:
            return self.vae.config.scale_factor_spatial
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self):
        """Height and width must be multiples of this: Wan's transformer also cuts latents in 2x2 patches."""
        return self.vae_factor * (self.unet.config.patch_size[1] if self.wan else 1)

    @property
    def temporal_factor(self):
        """Pixel frames per latent frame after the first (Wan: 4); 1 for the per-frame SD VAE."""
        return self.vae.config.scale_factor_temporal if self.wan else 1

    def latent_frames(self, frames):
        """Latent frames of an F-frame video: F, or 1 + (F - 1) / 4 for Wan's causal VAE."""
        return (frames - 1) // self.temporal_factor + 1

    @property
    def latent_channels(self):
        return self.unet.config.in_channels

    @property
    def text_length(self):
        """Tokens per prompt: the 512 UMT5 tokens WanPipeline uses, else the tokenizer's own length
        (CLIP's 77; the toy model's 8; 77 for the benchmarks' models, which have no tokenizer)."""
        if self.wan:
            return WAN_TEXT_LENGTH
        return self.tokenizer.model_max_length if self.tokenizer is not None else CLIP_TEXT_LENGTH

    @property
    def lora_prefix(self):
        """The key prefix of a LoRA file: diffusers' pipelines load "transformer." into Wan's transformer."""
        return "transformer." if self.wan else "unet."

    @contextlib.contextmanager
    def text_encoder_on_device(self):
        """Run the text encoder on the model's device, for the prompts' one encoding.

        The UNet families keep it there from loading (train.py moves it off after encoding). Wan's
        UMT5-XXL (5.7 B parameters, 10.6 GiB in bf16) outweighs the transformer and VAE together,
        so it lives in CPU memory and visits the device alone: the transformer and VAE step out to
        the CPU while it encodes. The three never share the GPU, so a 12 GB card holds each in turn.
        """
        if not self.wan or self.device == "cpu":
            yield
            return
        for m in (self.unet, self.vae):
            m.to("cpu")
        self.text_encoder.to(self.device)
        try:
            yield
        finally:
            self.text_encoder.to("cpu")
            for m in (self.unet, self.vae):
                m.to(self.device)


#### Scheduler facts

# ModelScope's scheduler settings (its hub folder's scheduler/scheduler_config.json), so the tiny
# model samples like the real one.
MODELSCOPE_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
    clip_sample=False,
)


#### Loading

def _repeat_text(unet, args, kwargs):
    """Forward pre-hook: one prompt embedding a video (B, L, D) -> one a frame (B*F, L, D)."""
    x, text = args[0], kwargs["encoder_hidden_states"]  # (B, C, F, h, w), (B, L, D)
    if text.shape[0] == x.shape[0]:
        # UNetMotionModel folds frames as index b*F + f, so frame f of video b meets prompt b.
        kwargs["encoder_hidden_states"] = text.repeat_interleave(x.shape[2], dim=0)  # (B*F, L, D)
    return args, kwargs


def per_frame_text(unet):
    """Let a UNetMotionModel take (B, L, D) text embeddings, as UNet3D does, so the sampler serves both.

    A hook, not a wrapper module, so module paths (and LoRA and save_pretrained keys) stay diffusers'.
    """
    unet.register_forward_pre_hook(_repeat_text, with_kwargs=True)
    return unet


def resolve_device(device="auto"):
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype, device):
    """The frozen base's dtype: 'auto' -> bf16 on a GPU that has it, fp16 on one that lacks it, fp32 on CPU.

    Half precision halves the frozen weights (ModelScope's UNet: 2.8 GB instead of 5.6) and their
    activations. bf16 has float32's exponent range, so gradients flowing back through it cannot
    underflow; fp16 (pre-Ampere GPUs) needs loss scaling for that (vader.loss_scaler).
    """
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_video_model(name, device="cpu", dtype=torch.float32):
    """Load `name`: a key of MODELS, a local folder in the diffusers layout, or a hub id.

    All three take the same `from_pretrained` path; a tiny model is first written to a
    temporary folder (infra/tiny.py). Every component is frozen and in eval mode, and the
    denoiser's blocks are checkpointed (`checkpoint_blocks`, or Wan's own checkpointing).
    """
    quiet_libraries()
    if name in ("tiny", "tiny-wan"):
        from safetensors import SafetensorError

        from infra.tiny import build_tiny_model, build_tiny_wan

        with tempfile.TemporaryDirectory() as tmp:
            try:
                (build_tiny_wan if name == "tiny-wan" else build_tiny_model)(tmp)
            except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
                raise UserError(f"could not write the tiny model to {tmp} ({first_line(e)}); free some space "
                                "in the temporary folder (or point TMPDIR elsewhere)") from None
            return _load_components(tmp, MODELS[name], device, dtype)
    if name == "toy" and not (TOY_FOLDER / "unet").is_dir():
        raise UserError(f"the toy model's weights are missing from {TOY_FOLDER}; restore them with "
                        "`git checkout -- toy/model` or rebuild them with `python -m toy.pretrain`")
    spec = MODELS.get(name) or next((s for s in MODELS.values() if s.source == name), None)
    if spec is None and not (os.path.isdir(name) or "/" in name):
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}, a local folder, or a hub id")
    return _load_components(spec.source if spec else name, spec, device, dtype)


def _load_unet(source, spec, dtype):
    """The denoiser of either family, read from source/unet; returns (unet, family)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel

    kind = UNet3DConditionModel.load_config(source, subfolder="unet").get("_class_name")
    if kind == "UNet3DConditionModel":
        return UNet3DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype), "unet3d"
    if kind == "UNetMotionModel":  # an AnimateDiff pipeline saved whole: motion modules already inside
        unet = UNetMotionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
        return per_frame_text(unet), "animatediff"
    if kind != "UNet2DConditionModel":
        raise UserError(f"{source}/unet holds a {kind}; supported: UNet3DConditionModel (ModelScope family), "
                        "UNet2DConditionModel or UNetMotionModel (AnimateDiff)")
    # An image UNet: SD 1.5 plus a motion adapter. A local folder may carry its own adapter in
    # motion_adapter/ (AnimateDiff's pipeline layout); otherwise the registry's adapter is used.
    local = Path(source) / "motion_adapter"
    adapter = spec.adapter if spec else (str(local) if local.is_dir() else MODELS["animatediff"].adapter)
    unet2d = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
    motion = MotionAdapter.from_pretrained(adapter, torch_dtype=dtype)
    return per_frame_text(UNetMotionModel.from_unet2d(unet2d, motion)), "animatediff"


def _is_wan(source):
    """Whether an unregistered folder or hub id holds Wan's layout (a WanTransformer3DModel in transformer/)."""
    from diffusers import WanTransformer3DModel

    if os.path.isdir(source):
        return os.path.isdir(os.path.join(source, "transformer"))
    try:
        return WanTransformer3DModel.load_config(source, subfolder="transformer").get("_class_name") == "WanTransformer3DModel"
    except OSError:  # no such file on the hub (a UNet model), or no connection: the UNet path will say
        return False


def _load_wan(source, dtype):
    """Wan's transformer, VAE, UMT5 text encoder and tokenizer, as WanPipeline.from_pretrained reads them.

    `from_pretrained` keeps the transformer's norms, time embedding and modulation tables in
    float32 (its `_keep_in_fp32_modules`: 3.1 M of 1.42 B parameters); the rest is in `dtype`.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    transformer = WanTransformer3DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype)
    vae = AutoencoderKLWan.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
    text_encoder = UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype)
    return transformer, vae, text_encoder, AutoTokenizer.from_pretrained(source, subfolder="tokenizer")


def _load_components(source, spec, device, dtype):
    """Load the five components from `source`; `spec` None means: read the defaults off the configs."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTokenizer

    family = spec.family if spec else ("wan" if _is_wan(source) else None)
    try:
        if family == "wan":
            unet, vae, text_encoder, tokenizer = _load_wan(source, dtype)
        else:
            unet, family = _load_unet(source, spec, dtype)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler = dict(DDIMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError, SafetensorError) as e:  # missing or damaged files, bad configs, no network
        parts = ("transformer/, vae/, text_encoder/, tokenizer/, scheduler/" if family == "wan" else
                 "unet/, vae/, text_encoder/, tokenizer/, scheduler/, and a motion adapter for an SD 1.5 UNet")
        raise UserError(f"could not load the video model from {source!r} ({first_line(e)}); check the hub id or "
                        f"folder (it needs {parts}) and your connection") from None
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    unet.to(device)
    vae.to(device)
    # Wan's UMT5 stays in CPU memory and visits the device only to encode (VideoModel.text_encoder_on_device).
    text_encoder.to("cpu" if family == "wan" else device)
    checkpoint_family(unet, vae, family)
    if spec is None:  # a folder or hub id: its family's defaults, its size from its configs (Wan's: 480x832)
        if family == "wan":
            spec = replace(MODELS["wan"], source=source)
        else:
            size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
            spec = replace(MODELS["modelscope" if family == "unet3d" else "animatediff"], source=source,
                           height=size, width=size)
    schedule = (FlowSchedule if family == "wan" else Schedule).from_config({**scheduler, **spec.scheduler})
    return VideoModel(unet, vae, text_encoder, tokenizer, schedule, spec, device)


def checkpoint_family(unet, vae, family):
    """A family's activation checkpointing, the same for loaded weights and the benchmarks' random ones.

    The UNets: `checkpoint_blocks` on the UNet and on the VAE's decoder. Wan: diffusers' own
    checkpointing of each of the transformer's blocks (non-reentrant, only while autograd
    records); its causal VAE is checkpointed whole by vader.decode_causal instead. Wan's
    transformer also gets the hook that hands it the timestep as a tensor.
    """
    if family == "wan":
        unet.enable_gradient_checkpointing()
        unet.register_forward_pre_hook(_timestep_per_video, with_kwargs=True)
    else:
        checkpoint_blocks(unet)
        checkpoint_blocks(vae.decoder)


def _timestep_per_video(transformer, args, kwargs):
    """Forward pre-hook: the sampler's timestep, a Python number, as the (B,) tensor Wan's embedding needs.

    UNets take a number and broadcast it themselves; WanTransformer3DModel reads `timestep.ndim`.
    """
    if len(args) < 2 or torch.is_tensor(args[1]):  # called by keyword (WanPipeline), or with a tensor already
        return args, kwargs
    x, t = args[0], args[1]  # (B, C, F, h, w), a float T·σ
    return (x, torch.full((x.shape[0],), float(t), device=x.device), *args[2:]), kwargs  # timestep (B,)


#### Activation checkpointing inside the UNet

def _checkpointed(forward, *args, **kwargs):
    """Run a module's forward under non-reentrant checkpointing whenever autograd is recording."""
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpoint_blocks(unet, enabled=True):
    """Checkpoint every module inside the UNet's blocks: keep only its input, recompute it in backward.

    Without it, a grad step of ModelScope at 384x384x16 keeps every resnet, attention and
    feed-forward output of the whole UNet, for a batch of 16 frames, until backward: the largest
    memory cost of training. The units checkpointed are the modules of every block's lists (each
    resnet, spatial attention, temporal conv, temporal attention or motion module, up- and
    downsampler) and `transformer_in`: only their inputs stay, and backward recomputes one unit
    at a time, so the peak holds one resnet's or one attention's activations. Whole blocks as
    units would hold a whole block (at 384x384, 13.5 of a 17.6 GiB peak in the highest-resolution
    up block). Cost: one more forward of the UNet per grad step (about 4 forward-equivalents
    instead of 3, counting backward as 2), the same as for whole blocks: every unit is recomputed
    once. diffusers' UNet3DConditionModel has no gradient checkpointing of its own, and
    UNetMotionModel's wraps only resnets and motion modules (spatial attention's activations
    stay), so the project does it for both. It acts only while autograd records, i.e. in the K
    grad steps; no-grad steps and generation run plainly. Module paths and state-dict keys are
    unchanged (each unit's `forward` attribute is wrapped, not the unit), so LoRA files and
    `save_pretrained` are unaffected. `enabled=False` restores the plain forwards.

    The VAE's decoder (its mid block and up blocks, no down blocks) is passed here too: decoding
    runs under a checkpoint of its own (vader.decode_frames), and inside it these units make
    backward hold one decoder resnet's activations at a time instead of the whole decoder's
    (at 512x512, 2 GiB of one frame's), for one more decoder forward.
    """
    blocks = [*getattr(unet, "down_blocks", ()), unet.mid_block, *unet.up_blocks]
    units = [getattr(unet, "transformer_in", None)]
    units += [m for block in filter(None, blocks) for child in block.children()
              if isinstance(child, torch.nn.ModuleList) for m in child]
    for unit in filter(None, units):
        unit.__dict__.pop("forward", None)  # back to the class's own forward
        if enabled:
            unit.forward = functools.partial(_checkpointed, unit.forward)
