"""Wan2.1 and Wan2.2: a flow-matching transformer, a causal video VAE, and a text encoder too big to keep.

Read after the ModelScope path: VADER's step (train.py, vader.py) is the same; what changes is
behind the family interface of models.py: this file, and wan_vae.py for the causal VAE's checkpoints.
- The denoiser, `WanTransformer3DModel`: 30 blocks (for the 1.3B) of self-attention over every
  latent patch of every frame, cross-attention to the text, and an FFN. It predicts the
  velocity of a flow-matching ODE, sampled by sampler.py's Euler steps on Wan's shifted σ; classifier-free
  guidance combines velocities exactly as it combines ε.
- The VAE, `AutoencoderKLWan`, compresses 8x in space and 4x in time, and is causal in time:
  F = 1 + 4k pixel frames <-> 1 + k latent frames, and a latent frame is decoded from itself
  and a cache of what the frames before it left behind (`decode_frames`).
- The text encoder, UMT5-XXL: 5.7 B parameters that outweigh the transformer and VAE together,
  reading 512 tokens with an attention mask. It lives in CPU memory and visits the GPU alone.

Wan2.2 keeps all three and changes two things.
- TI2V-5B: a new VAE (`is_residual`, 48 latent channels) folds each 2x2 pixel patch into
  channels before three downsamplings, so a latent cell covers 16x16 pixels and 4 frames, still
  causally: the same exact prefix (`prefix_frames`) and checkpointing serve it. diffusers' pipeline
  gives its transformer one timestep per token (`expand_timesteps`), so that image-to-video can
  hold the conditioning frame at t = 0; in text to video every token has the same t, and one
  timestep per video (`_timestep_per_video`) gives the same velocity without a (B, tokens,
  6 x 3072) float32 modulation table in every block.
- T2V-A14B: two 14B transformers of Wan2.1 14B's shape, `transformer` for the noisiest steps
  (t >= boundary_ratio x 1000, from model_index.json) and `transformer_2` for the rest. VADER
  trains only the last K steps, so only the low-noise expert, this family's `unet`, gets a LoRA
  and a graph; the high-noise one runs without gradients (`TwoExperts`).
"""
import contextlib
import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.utils.checkpoint import checkpoint

from infra.files import model_index
from infra.loading import strict
from infra.offload import in_cpu_memory, sharded, swapped
from models import VideoModel
from sampler import FlowSchedule
from vader import checkpoint_units
from wan_vae import CAUSAL_UNITS, checkpoint_with_cache, decode_by_latent_frame

TEXT_LENGTH = 512  # WanPipeline pads or cuts every prompt to 512 UMT5 tokens


#### Wan's side of flow matching: the shifted σ schedule (the Euler step is sampler.py's)

def shift_sigma(sigma, shift):
    """σ' = s σ / (1 + (s - 1) σ): Esser et al. 2403.03206, Section 5.3.2 (timestep shifting).

    More pixels carry more redundant signal, so at a given σ a large video is less destroyed than
    a small image; s > 1 moves the steps towards high noise, where the video's layout is decided.
    Wan2.1 uses s = 3 at 480p (5 at 720p); s = 1 leaves σ unchanged.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass
class WanFlowSchedule(FlowSchedule):
    """The σ schedule of diffusers' FlowMatchEulerDiscreteScheduler, with Wan's shift."""

    shift: float = 1.0

    @classmethod
    def from_config(cls, config):
        """From FlowMatchEulerDiscreteScheduler's config (`shift`) or UniPC's (`flow_shift`): Wan's
        hub folder ships UniPC, a multistep solver; the training loop takes plain Euler steps on
        the same shifted σ, as the reward-gradient trainers for Wan do."""
        config = dict(config)
        return cls(config.get("num_train_timesteps", 1000), config.get("shift", config.get("flow_shift", 1.0)))

    def sigmas(self, num_steps):
        """diffusers' rule, kept for parity: N points spaced evenly between σ_max = 1 and the
        smallest training σ (1/T, already shifted), each shifted (again), then a final 0."""
        T, s = self.num_train_timesteps, self.shift
        lo = shift_sigma(1 / T, s)
        even = [1 + (lo - 1) * i / (num_steps - 1) for i in range(num_steps)] if num_steps > 1 else [1.0]
        return [shift_sigma(x, s) for x in even] + [0.0]


#### Wan2.2 A14B: two experts behind one denoiser

class TwoExperts:
    """A14B's denoiser as sampler.sample calls it: `high` for every step whose timestep is
    `boundary` or above, `low` (the trained expert, with the LoRA) for the rest.

    VADER trains only the last K steps, so only the low-noise expert gets a LoRA and a graph; every
    step before the first LoRA step has inputs that do not depend on θ, so a high-noise step with
    a graph would cost a 14B expert's activations for a gradient of exactly zero, and is refused.
    The high-noise expert has its own guidance weight. The sampler mixes the two halves of a
    guided batch (no gradients: [uncond; cond]) as out_u + w (out_c - out_u) with the trained
    expert's w, so a high-noise step returns its own guided output, out_u + w_high (out_c - out_u),
    in both halves, which that mix leaves exactly as it is (so the sampler's guidance must not be
    1, which skips the unconditional half: the scripts refuse it). `visit` holds the high-noise
    expert on the device from its first step to the first low-noise one.
    """

    def __init__(self, high, low, boundary, guidance, visit):
        self.high, self.low, self.boundary, self.guidance, self.visit = high, low, boundary, guidance, visit
        self.visiting = None  # the open `visit` while the high-noise expert has its turn

    def steps(self, schedule, num_steps):
        """How many of the N steps are the high-noise expert's."""
        return sum(t >= self.boundary for t, _ in schedule.steps(num_steps))

    def __call__(self, x, t, encoder_hidden_states):
        if t < self.boundary:
            if self.visiting is not None:
                self.visiting.__exit__(None, None, None)
                self.visiting = None
            return self.low(x, t, encoder_hidden_states=encoder_hidden_states)
        if torch.is_grad_enabled():
            raise ValueError("grad_steps reaches into the high-noise expert's steps: only the low-noise ones train")
        if self.visiting is None:  # its first step: the expert comes to the device
            self.visiting = self.visit()
            self.visiting.__enter__()
        out_u, out_c = self.high(x, t, encoder_hidden_states=encoder_hidden_states).sample.float().chunk(2)  # (B, ...)
        guided = out_u + self.guidance * (out_c - out_u)  # (B, C, F, h, w)
        return SimpleNamespace(sample=torch.cat([guided, guided]))  # (2B, C, F, h, w)


@dataclass
class WanModel(VideoModel):
    """Wan's transformer (in the field `unet`; Wan2.2 A14B's low-noise expert), causal VAE, UMT5 encoder
    and tokenizer; for A14B also the high-noise expert and the timestep where the two meet."""

    high_expert: torch.nn.Module = None  # Wan2.2 A14B's `transformer`, for t >= boundary
    boundary_ratio: float = None  # the experts meet at timestep boundary_ratio x num_train_timesteps

    lora_prefix = "transformer."  # diffusers' WanPipeline loads a LoRA's "transformer." keys
    schedule_class = WanFlowSchedule
    parts = ("transformer/, vae/, text_encoder/, tokenizer/, scheduler/; for Wan2.2 A14B also transformer_2/ and "
             "model_index.json")

    @property
    def vae_factor(self):
        return self.vae.config.scale_factor_spatial

    @property
    def size_multiple(self):
        """The VAE's factor times the transformer's 2x2 patches of latent cells."""
        return self.vae_factor * self.unet.config.patch_size[1]

    @property
    def temporal_factor(self):
        return self.vae.config.scale_factor_temporal

    @property
    def text_length(self):
        return TEXT_LENGTH

    def embed(self, prompts):
        """Prompts -> (b, 512, 4096). UMT5 reads the prompt with its attention mask, and WanPipeline
        zeroes the embeddings of the padding tokens before the transformer sees them; so here."""
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=TEXT_LENGTH,
                                return_tensors="pt")
        mask = tokens.attention_mask.to(self.text_encoder.device)  # (b, 512): 1 for the prompt's tokens
        emb = self.text_encoder(tokens.input_ids.to(mask.device), attention_mask=mask).last_hidden_state
        return emb * mask[..., None].to(emb.dtype)  # (b, 512, D), padding zeroed

    @contextlib.contextmanager
    def text_encoder_on_device(self):
        """The transformer and the VAE step out to CPU memory while UMT5 encodes on the device, so
        the three never share the GPU and a card holds each in turn. Under --shard the transformer
        is still in CPU memory here, whole, waiting to be sharded, and stays there."""
        on_device = [] if self.device == "cpu" else [m for m in (self.unet, self.vae) if not in_cpu_memory(m)]
        with swapped(self.device, [self.text_encoder], on_device):
            yield

    @functools.cached_property
    def denoiser(self):
        """The transformer, or for A14B its two experts (`TwoExperts`)."""
        if self.high_expert is None:
            return self.unet
        boundary = self.boundary_ratio * self.schedule.num_train_timesteps
        return TwoExperts(self.high_expert, self.unet, boundary, self.spec.guidance_high, self.high_expert_on_device)

    @contextlib.contextmanager
    def high_expert_on_device(self):
        """A14B's high-noise expert on the device for its steps. A card that would still have the
        expert's size free after taking it in keeps it there for good; on a smaller one it visits
        while the low-noise one (LoRA included) waits in CPU memory, so the card holds one expert
        at a time, for two copies of an expert each way per batch of videos. A sharded expert
        (--shard) stays where FSDP keeps it."""
        # No GPU, or a model on the "meta" device (bench.py memory): there the two experts' equal
        # weights count as if swapped, the high-noise one never and the low-noise one throughout.
        if torch.device(self.device).type in ("cpu", "meta") or not in_cpu_memory(self.high_expert) \
                or sharded(self.high_expert):
            yield
            return
        size = sum(p.nbytes for p in self.high_expert.parameters())
        if torch.device(self.device).type == "cuda" and torch.cuda.mem_get_info(self.device)[0] >= 2 * size:
            self.high_expert.to(self.device)
            yield
            return
        with swapped(self.device, [self.high_expert], [self.unet]):
            yield

    def prefix_frames(self, frames, f):
        """The shortest prefix of the video that holds f frames: a frame can only be decoded exactly
        by decoding every latent frame before it, so the f frames come from the first
        m = 1 + ceil((f - 1) / 4) latent frames, 1 + 4 (m - 1) pixel frames (f = 1: pixel frame 0
        alone, the cheapest; f = 5: 2 latent frames). The reward then sees only the start of the
        video, the price of exactness."""
        r = self.temporal_factor
        return min(frames, 1 + r * math.ceil((f - 1) / r))

    def decode_frames(self, z0, frame_idx, use_checkpoint=True, one_at_a_time=False):
        """Decode all m latent frames of z0 (B, C, m, h, w), keep pixel frames `frame_idx` of the 1 + 4 (m - 1).

        z0 may be the first m latent frames of a longer video (the prefix `prefix_frames` names): the
        frames returned equal those of a full decode, exactly, because the decoder only looks back.
        The whole decode is one checkpoint, recomputed in backward, and inside it each resnet and
        resampler is a checkpoint of its own that replays the feature cache it started from
        (wan_vae.checkpoint_with_cache: run again on its own, a unit would otherwise read the
        cache of a later frame).

        The checkpoint runs with `early_stop=False`. By default a recomputation stops as soon as
        it has rebuilt the tensors backward needs, here before the decode's final `clear_cache()`,
        and the causal cache would keep the recomputed activations alive through the rest of
        backward (the transformer's). With `one_at_a_time` (--low-memory) each latent frame of
        each video is its own checkpoint (wan_vae.decode_by_latent_frame).
        """
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=z0.device).view(1, -1, 1, 1, 1)  # (1, C, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=z0.device).view(1, -1, 1, 1, 1)
        z = (z0 * std + mean).to(self.vae.dtype)  # (B, C, m, h, w): undo Wan's per-channel normalisation

        def decode(z):
            return self.vae.decode(z).sample  # (n, 3, 1 + 4 (m - 1), H, W) in [-1, 1]

        def run(z):
            if not (use_checkpoint and torch.is_grad_enabled()):
                return decode(z)
            if one_at_a_time:
                return decode_by_latent_frame(self.vae, z)
            return checkpoint(decode, z, use_reentrant=False, early_stop=False)

        x = torch.cat([run(zi) for zi in z.split(1)]) if one_at_a_time else run(z)  # (B, 3, 1 + 4 (m - 1), H, W)
        x = x[:, :, frame_idx.to(x.device)]  # (B, 3, f, H, W)
        return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, f, 3, H, W) in [0, 1]

    def shard_blocks(self):
        """FSDP's units under --shard: the transformer blocks, diffusers' `_no_split_modules`."""
        return list(self.unet.blocks)

    def enable_checkpointing(self):
        """diffusers' own checkpointing of each transformer block (non-reentrant, only while autograd
        records), and inside each block its two attentions and its FFN as checkpoints of their own:
        when backward recomputes a block, it keeps only those three sub-layers' inputs, and then
        recomputes one sub-layer at a time, so the peak holds one sub-layer's activations (the
        FFN's 4x-wide hidden state, the attention's q, k, v), not the whole block's, for one more
        forward of each sub-layer per grad step. The VAE is checkpointed whole in `decode_frames`,
        and inside it each resnet and resampler (wan_vae.py). The timestep hook goes on both of
        A14B's experts (the high-noise one, never run with gradients, needs no checkpoints)."""
        self.unet.enable_gradient_checkpointing()
        checkpoint_units(unit for block in self.unet.blocks for unit in (block.attn1, block.attn2, block.ffn))
        checkpoint_units((m for m in self.vae.decoder.modules() if type(m).__name__ in CAUSAL_UNITS),
                         wrap=checkpoint_with_cache)
        for transformer in filter(None, (self.unet, self.high_expert)):
            transformer.register_forward_pre_hook(_timestep_per_video, with_kwargs=True)

    @classmethod
    def load_components(cls, source, spec, dtype):
        """As WanPipeline.from_pretrained reads them. `from_pretrained` keeps the transformer's norms,
        time embedding and modulation tables in float32 (its `_keep_in_fp32_modules`). A folder whose
        model_index.json names a `transformer_2` and a `boundary_ratio` is A14B: `transformer_2` is
        the low-noise expert, our `unet`; `transformer` stays in CPU memory until its steps."""
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        index = model_index(source)
        experts = index.get("boundary_ratio") is not None and (index.get("transformer_2") or [None])[0] is not None
        if spec.guidance_high is not None and not experts:  # A14B's entry, but one transformer in sight
            raise OSError(f"{source} has no model_index.json naming a transformer_2 and a boundary_ratio")
        low = "transformer_2" if experts else "transformer"
        def load(cls, subfolder):  # whole or not at all (infra/loading.py)
            return strict(cls).from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)

        parts = dict(unet=load(WanTransformer3DModel, low), vae=load(AutoencoderKLWan, "vae"),
                     text_encoder=load(UMT5EncoderModel, "text_encoder"),
                     tokenizer=AutoTokenizer.from_pretrained(source, subfolder="tokenizer"))
        if experts:
            parts["high_expert"] = load(WanTransformer3DModel, "transformer")
            parts["boundary_ratio"] = index["boundary_ratio"]
        return parts


def _timestep_per_video(transformer, args, kwargs):
    """Forward pre-hook: the sampler's timestep, a Python number, as the (B,) tensor Wan's embedding needs.

    UNets take a number and broadcast it themselves; WanTransformer3DModel reads `timestep.ndim`.
    """
    if len(args) < 2 or torch.is_tensor(args[1]):  # called by keyword (WanPipeline), or with a tensor already
        return args, kwargs
    x, t = args[0], args[1]  # (B, C, F, h, w), a float T·σ
    return (x, torch.full((x.shape[0],), float(t), device=x.device), *args[2:]), kwargs  # timestep (B,)
