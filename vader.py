"""The VADER glue: load a text-to-video model, decode a few frames, compute the loss.

VADER (Prabhudesai et al., arXiv 2407.08737) aligns a video diffusion model to a reward by
plain gradient ascent on   J(θ) = E_{prompt, z_T} [ r( decode( DDIM_θ(z_T, prompt) ), prompt ) ]
with the gradient taken through the sampler's last K steps (sampler.py), through the VAE
decoder, and through a frozen reward model (rewards.py), into LoRA weights θ (lora.py).

Two tricks keep that affordable, both here:
- Frame subsampling: decoding all F frames through the VAE with gradients is the largest
  memory cost, so only f of them are decoded (random ones each step); the reward sees those.
- Cached prompt embeddings: the text encoder runs once per prompt, then leaves the GPU.
"""
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from common import UserError
from sampler import Schedule, sample

PROMPTS_DIR = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class ModelSpec:
    """A video model's source and its generation defaults (flags override them)."""

    source: str  # hub id or local folder in the diffusers layout; "" for the built-in tiny model
    height: int
    width: int
    frames: int
    num_steps: int  # DDIM steps
    guidance: float  # classifier-free guidance weight
    recipe: dict = field(default_factory=dict)  # training defaults that differ from the paper's


MODELS = {
    # Built from small configs with a fixed seed: random weights, no download, runs on a CPU.
    # Its recipe: a larger learning rate, because a random model's LoRA starts far from any
    # useful direction, and no gradient accumulation, so the demo finishes in a minute or two.
    "tiny": ModelSpec("", 32, 32, 8, 10, 3.0, recipe={"lr": 1e-2, "grad_accum": 1, "batch_size": 2}),
    # The toy world (toy.py): coloured shapes moving over a plain background, pretrained on a CPU
    # by pretrain_toy.py and committed in toy_model/ (fp16, diffusers layout). Its recipe: a
    # large learning rate and no accumulation, so `--reward redness` visibly recolours the
    # shapes within two minutes on a laptop CPU.
    "toy": ModelSpec(str(Path(__file__).parent / "toy_model"), 32, 32, 8, 10, 3.0,
                     recipe={"lr": 1e-2, "grad_accum": 1, "batch_size": 2}),
    # VADER's ModelScope setting (Table 6 of 2407.08737 and its configs): 25 DDIM steps,
    # guidance 9; the pipeline's default resolution is 256x256 with 16 frames.
    "modelscope": ModelSpec("ali-vilab/text-to-video-ms-1.7b", 256, 256, 16, 25, 9.0),
    # The ModelScope architecture fine-tuned for 576x320, 24 frames.
    "zeroscope": ModelSpec("cerspense/zeroscope_v2_576w", 320, 576, 24, 25, 9.0),
}


@dataclass
class VideoModel:
    """The frozen parts of a text-to-video latent diffusion model, plus its defaults."""

    unet: torch.nn.Module  # UNet3DConditionModel: ε_θ(x_t, t, text) on (B, C, F, h, w)
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
# ModelScope's scheduler settings (REAL_MODELS.md), so the tiny model samples like the real one.
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

def resolve_device(device="auto"):
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype, device):
    """The frozen base's dtype: 'auto' -> bf16 on a GPU that has it, fp16 on one that lacks it, fp32 on CPU."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_video_model(name, device="cpu", dtype=torch.float32):
    """Load `name`: a key of MODELS, a local folder in the diffusers layout, or a hub id.

    All three take the same `from_pretrained` path; the tiny model is first written to a
    temporary folder. Every component is frozen and in eval mode.
    """
    quiet_libraries()
    spec = MODELS.get(name)
    if name == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            build_tiny_model(tmp)
            return _load_components(tmp, spec, device, dtype)
    if spec is None and not (os.path.isdir(name) or "/" in name):
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}, a local folder, or a hub id")
    return _load_components(spec.source if spec else name, spec, device, dtype)


def _load_components(source, spec, device, dtype):
    """Load the five components from `source`; `spec` None means: read the defaults off the configs."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        unet = UNet3DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        schedule = Schedule.from_config(DDIMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not load the video model from {source!r} ({first}); check the hub id or "
            "folder (it needs unet/, vae/, text_encoder/, tokenizer/, scheduler/) and your connection"
        ) from None
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    if spec is None:  # a folder or hub id of the ModelScope family: its size from its configs
        size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        spec = replace(MODELS["modelscope"], source=source, height=size, width=size)
    return VideoModel(unet, vae, text_encoder, tokenizer, schedule, spec)


def read_prompts(arg):
    """Prompts from a file: a path, or a file name under prompts/. One a line; '#' starts a comment."""
    path = Path(arg)
    if not path.exists() and (PROMPTS_DIR / arg).exists():
        path = PROMPTS_DIR / arg
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in PROMPTS_DIR.glob("*.txt")))
        raise UserError(f"prompts file {arg!r} not found; pass a path or one of prompts/: {known}")
    prompts = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts; write one prompt a line")
    return prompts


@torch.no_grad()
def encode_prompts(model, prompts, batch=32):
    """Text embeddings (P, 77, D) for P prompts, on the text encoder's device.

    VADER's prompts come from a fixed list, so each is encoded once, before training, and the
    text encoder is not needed again (train.py moves it off the GPU).
    """
    device = next(model.text_encoder.parameters()).device
    out = []
    for i in range(0, len(prompts), batch):
        ids = model.tokenizer(prompts[i:i + batch], padding="max_length", truncation=True,
                              max_length=model.tokenizer.model_max_length, return_tensors="pt").input_ids
        out.append(model.text_encoder(ids.to(device))[0])  # (b, 77, D): the last hidden state
    return torch.cat(out)  # (P, 77, D)


#### Frame-subsampled decoding and the loss

def choose_frames(num_frames, f, generator=None, random_frames=True):
    """Indices of the f frames to decode: random and sorted (training), or evenly spaced."""
    if random_frames:
        return torch.randperm(num_frames, generator=generator)[:f].sort().values
    return torch.linspace(0, num_frames - 1, f).round().long()


def decode_frames(model, z0, frame_idx, use_checkpoint=True):
    """Decode only the chosen frames of z0 (B, C, F, h, w) -> frames (B, f, 3, H, W) in [0, 1].

    The VAE is a 2D image decoder, so the f frames of each video are folded into the batch.
    With `use_checkpoint`, the decoder's activations are recomputed during backward instead of
    stored: for ModelScope at 256x256 they are several GB per frame.
    """
    z = z0[:, :, frame_idx]  # (B, C, f, h, w)
    b, c, f, h, w = z.shape
    z = z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B*f, C, h, w)
    z = (z / model.vae.config.scaling_factor).to(model.vae.dtype)  # undo the latent scaling of LDM

    def decode(z):
        return model.vae.decode(z).sample  # (B*f, 3, H, W) in about [-1, 1]

    x = checkpoint(decode, z, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else decode(z)
    x = (x.float() / 2 + 0.5).clamp(0, 1)  # (B*f, 3, H, W) in [0, 1]
    return x.view(b, f, *x.shape[1:])  # (B, f, 3, H, W)


def initial_noise(model, batch, frames, height, width, generator, device):
    """z_T ~ N(0, I), (B, C, F, h, w), drawn on the CPU so a seed gives the same video on any device."""
    if height % model.vae_factor or width % model.vae_factor:
        raise UserError(f"height and width must be multiples of {model.vae_factor} (the VAE's factor), got {height}x{width}")
    shape = (batch, model.latent_channels, frames, height // model.vae_factor, width // model.vae_factor)
    return torch.randn(shape, generator=generator).to(device)  # (B, C, F, h, w)


def vader_loss(model, reward_fn, prompts, cond, uncond, cfg, generator, grad_steps, shard=(0, 1)):
    """One VADER forward pass for a batch: sample with truncated backprop, decode f frames, score.

    cond/uncond: (B, 77, D) cached text embeddings. `cfg` supplies frames, height, width,
    num_steps, guidance, decode_frames. Returns (loss, rewards (B,) detached, frames (B, f, 3, H, W)).
    The loss is -mean(r): gradient ascent on the reward (VADER's "-r" form).
    `shard` = (rank, world size) under torchrun: every process draws the noise of the whole
    global batch (world * B videos) from the same generator and keeps its own B, so the
    processes see exactly the videos one process with the global batch would.
    """
    device = cond.device
    rank, world = shard
    b = len(prompts)
    z_T = initial_noise(model, b * world, cfg.frames, cfg.height, cfg.width, generator, device)  # (world*B, C, F, h, w)
    z_T = z_T[rank * b:(rank + 1) * b]  # (B, C, F, h, w)
    z0 = sample(model.unet, z_T, cond, uncond, model.schedule, cfg.num_steps, cfg.guidance, grad_steps)
    idx = choose_frames(cfg.frames, cfg.decode_frames, generator).to(device)
    frames = decode_frames(model, z0, idx)  # (B, f, 3, H, W)
    rewards = reward_fn(frames, prompts).float()  # (B,)
    return -rewards.mean(), rewards.detach(), frames.detach()


@torch.no_grad()
def generate(model, cond, uncond, frames, height, width, num_steps, guidance, seed, progress=None):
    """Plain generation (no gradients, all frames decoded): (B, F, 3, H, W) in [0, 1].

    Video i of the batch uses seed `seed + i`, so a video depends only on its own seed and
    prompt, not on what else is in the batch.
    """
    device = cond.device
    z_T = torch.cat([
        initial_noise(model, 1, frames, height, width, torch.Generator().manual_seed(seed + i), device)
        for i in range(len(cond))
    ])  # (B, C, F, h, w)
    z0 = sample(model.unet, z_T, cond, uncond, model.schedule, num_steps, guidance, progress=progress)
    return decode_frames(model, z0, torch.arange(frames, device=device))  # (B, F, 3, H, W)
