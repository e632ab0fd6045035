"""Video models: the registry, loading either family, and fitting one on a 24 GB GPU.

Two families of latent video diffusion models, both called as ε_θ(x_t, t, text) on latents
(B, C, F, h, w) and returning ε of the same shape:
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

Everything that makes training fit one GPU (precision, three kinds of checkpointing) is stated
once, in vader.py's "Precision and memory" section; the checkpointing inside the UNet lives here.
"""
import functools
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from infra.cli import UserError
from infra.files import first_line
from lora import TARGETS
from sampler import Schedule

# The toy world's pretrained model (toy/pretrain.py writes it; committed with the code).
TOY_FOLDER = Path(__file__).resolve().parent / "toy" / "model"
# AnimateDiff's scheduler, as its diffusers docs load it: DDIM on the linear β schedule its motion
# modules were trained with (SD 1.5's own config says scaled_linear), "linspace" timesteps.
# clip_sample is listed for fidelity to those docs; our sampler never clips x0 anyway.
ANIMATEDIFF_SCHEDULER = dict(beta_schedule="linear", clip_sample=False, timestep_spacing="linspace", steps_offset=1)


@dataclass(frozen=True)
class ModelSpec:
    """A video model's source, how to load it, and its generation defaults (flags override them)."""

    source: str  # hub id or local folder in the diffusers layout; "" for the built-in tiny model
    height: int
    width: int
    frames: int
    num_steps: int  # DDIM steps
    guidance: float  # classifier-free guidance weight
    family: str = "unet3d"  # "unet3d" (ModelScope layout) or "animatediff" (SD 1.5 UNet + motion adapter)
    adapter: str = ""  # animatediff only: the MotionAdapter's hub id or folder
    scheduler: dict = field(default_factory=dict)  # overrides of the source's scheduler/ config
    lora_targets: tuple = TARGETS  # the nn.Linear names that get LoRA adapters
    recipe: dict = field(default_factory=dict)  # training defaults that differ from the paper's


MODELS = {
    # Built from small configs with a fixed seed: random weights, no download, runs on a CPU.
    # Its recipe: a larger learning rate, because a random model's LoRA starts far from any
    # useful direction, and no gradient accumulation, so the demo finishes in a minute or two.
    "tiny": ModelSpec("", 32, 32, 8, 10, 3.0, recipe={"lr": 1e-2, "grad_accum": 1, "batch_size": 2}),
    # The toy world (toy/world.py): a tiny UNet3D pretrained on captioned clips of one coloured
    # shape moving over a plain background ("a big green square moving left"). Its weights are in
    # the repository, so it draws real content offline. Its recipe is gentler than the random
    # model's: a pretrained model's LoRA needs small steps to change what it draws without
    # breaking it, and two grad steps give the gradient more of the chain to act on. Its
    # held-out videos are also read by the toy world's weight-free detector (toy/rewards.py).
    "toy": ModelSpec(str(TOY_FOLDER), 32, 32, 8, 10, 3.0,
                     recipe={"lr": 5e-4, "grad_steps": 2, "grad_accum": 1, "batch_size": 2,
                             "eval_rewards": "detector,dynamics"}),
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
}


def describe(spec):
    """A registry entry in one line, for the start-up banner."""
    source = spec.source or "built in, random weights"
    if spec.family == "animatediff":
        source += f" + motion adapter {spec.adapter}"
    scheduler = ", ".join(f"{k}={v}" for k, v in spec.scheduler.items()) or "the source's own"
    recipe = ", ".join(f"{k}={v}" for k, v in spec.recipe.items()) or "the paper's"
    return (f"{spec.family}: {source} | {spec.frames} frames of {spec.height}x{spec.width}, {spec.num_steps} DDIM "
            f"steps, guidance {spec.guidance} | scheduler: {scheduler} | LoRA targets {', '.join(spec.lora_targets)} "
            f"| training defaults: {recipe}")


@dataclass
class VideoModel:
    """The frozen parts of a text-to-video latent diffusion model, plus its defaults."""

    unet: torch.nn.Module  # UNet3DConditionModel or UNetMotionModel: ε_θ(x_t, t, text) on (B, C, F, h, w)
    vae: torch.nn.Module  # AutoencoderKL: decodes one frame (N, 4, h, w) -> (N, 3, H, W)
    text_encoder: torch.nn.Module  # CLIPTextModel: tokens (P, 77) -> embeddings (P, 77, D)
    tokenizer: object
    schedule: Schedule
    spec: ModelSpec

    @property
    def vae_factor(self):
        """Pixels per latent cell: each VAE down block but the last halves the resolution."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self):
        return self.unet.config.in_channels


#### Tiny model: small configs, fixed seed

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
# scaling_factor 1: a random encoder's latents are not ~N(0, 1/0.18215²) like SD's.
TINY_VAE = dict(
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=1.0,
)
TINY_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=32,
)
# ModelScope's scheduler settings (its hub folder's scheduler/scheduler_config.json), so the tiny
# model samples like the real one.
MODELSCOPE_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
    clip_sample=False,
)


def quiet_libraries():
    """Silence diffusers' and transformers' per-file progress bars and warnings.

    For the tiny model they are pure noise (and would break the one-line error contract on
    stderr); the hub's download progress comes from huggingface_hub and stays visible.
    """
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def write_clip_tokenizer(folder):
    """Save a transformers CLIPTokenizer built from the CLIP BPE vocabulary open_clip ships.

    The hub is out of reach in tests and on a fresh laptop, but open_clip bundles the same
    49,408-token vocabulary OpenAI's CLIP uses, so the tiny model gets a real tokenizer offline.
    open_clip spells the special tokens <start_of_text>, transformers <|startoftext|>.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    tok.save_pretrained(Path(folder) / "tokenizer")


def build_tiny_model(folder, seed=0):
    """Write the tiny model to `folder` in the diffusers layout (unet/, vae/, text_encoder/, ...).

    The same seed gives the same weights every time; the global RNG is left untouched.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    quiet_libraries()
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet3DConditionModel(**TINY_UNET).save_pretrained(folder / "unet")
        AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
        CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).save_pretrained(folder / "text_encoder")
    DDIMScheduler(**MODELSCOPE_SCHEDULER).save_pretrained(folder / "scheduler")
    write_clip_tokenizer(folder)


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

    All three take the same `from_pretrained` path; the tiny model is first written to a
    temporary folder. Every component is frozen and in eval mode, and the UNet's blocks are
    checkpointed (`checkpoint_blocks`).
    """
    quiet_libraries()
    if name == "tiny":
        from safetensors import SafetensorError

        with tempfile.TemporaryDirectory() as tmp:
            try:
                build_tiny_model(tmp)
            except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
                raise UserError(f"could not write the tiny model to {tmp} ({first_line(e)}); free some space "
                                "in the temporary folder (or point TMPDIR elsewhere)") from None
            return _load_components(tmp, MODELS["tiny"], device, dtype)
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


def _load_components(source, spec, device, dtype):
    """Load the five components from `source`; `spec` None means: read the defaults off the configs."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        unet, family = _load_unet(source, spec, dtype)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler = dict(DDIMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError, SafetensorError) as e:  # missing or damaged files, bad configs, no network
        raise UserError(
            f"could not load the video model from {source!r} ({first_line(e)}); check the hub id or folder (it needs "
            "unet/, vae/, text_encoder/, tokenizer/, scheduler/, and a motion adapter for an SD 1.5 UNet) "
            "and your connection"
        ) from None
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    checkpoint_blocks(unet)
    checkpoint_blocks(vae.decoder)
    if spec is None:  # a folder or hub id: its family's defaults, its size from its configs
        size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        spec = replace(MODELS["modelscope" if family == "unet3d" else "animatediff"], source=source,
                       height=size, width=size)
    schedule = Schedule.from_config({**scheduler, **spec.scheduler})
    return VideoModel(unet, vae, text_encoder, tokenizer, schedule, spec)


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
