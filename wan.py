"""Wan2.1 and Wan2.2: a flow-matching transformer, a causal video VAE, and a text encoder too big to keep.

Read after the ModelScope path: VADER's step (train.py, vader.py) is the same; what changes is
behind the family interface of models.py, and this file is all of it.
- The denoiser, `WanTransformer3DModel`: 30 blocks (for the 1.3B) of self-attention over every
  latent patch of every frame, cross-attention to the text, and an FFN. It predicts the
  velocity of a flow-matching ODE, sampled by sampler.FlowSchedule's Euler steps; classifier-free
  guidance combines velocities exactly as it combines ε.
- The VAE, `AutoencoderKLWan`, compresses 8x in space and 4x in time, and is causal in time:
  F = 1 + 4k pixel frames <-> 1 + k latent frames, and a latent frame is decoded from itself
  and a cache of what the frames before it left behind (`decode_frames`).
- The text encoder, UMT5-XXL: 5.7 B parameters that outweigh the transformer and VAE together,
  reading 512 tokens with an attention mask. It lives in CPU memory and visits the GPU alone.

Wan2.2 keeps all three and changes two things.
- TI2V-5B: a new VAE (`is_residual`, 48 latent channels) folds each 2x2 pixel patch into
  channels before three downsamplings, so a latent cell covers 16x16 pixels and 4 frames, still
  causally: the same exact prefix, `frame_pool` and checkpointing serve it. diffusers' pipeline
  gives its transformer one timestep per token (`expand_timesteps`), so that image-to-video can
  hold the conditioning frame at t = 0; in text to video every token has the same t, and one
  timestep per video (`_timestep_per_video`) gives the same velocity without a (B, tokens,
  6 x 3072) float32 modulation table in every block.
- T2V-A14B: two 14B transformers of Wan2.1 14B's shape, `transformer` for the noisiest steps
  (t >= boundary_ratio x 1000, from model_index.json) and `transformer_2` for the rest. VADER
  trains only the last K steps, so only the low-noise expert, this family's `unet`, gets a LoRA
  and a graph; the high-noise one runs without gradients (`HighNoise`).
"""
import contextlib
import functools
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from infra.files import model_index
from models import VideoModel
from sampler import FlowSchedule
from vader import checkpoint_units, sharded, visiting

TEXT_LENGTH = 512  # WanPipeline pads or cuts every prompt to 512 UMT5 tokens


@dataclass
class HighNoise:
    """Wan2.2 A14B's first expert, as sampler.sample takes it: it runs every step whose timestep is
    `boundary` or above, with its own guidance."""

    expert: torch.nn.Module
    boundary: float  # a timestep: boundary_ratio x num_train_timesteps
    guidance: float
    visit: object = contextlib.nullcontext  # a context that holds `expert` on the device for its steps


@dataclass
class WanModel(VideoModel):
    """Wan's transformer (in the field `unet`; Wan2.2 A14B's low-noise expert), causal VAE, UMT5 encoder
    and tokenizer; for A14B also the high-noise expert and the timestep where the two meet."""

    high_expert: torch.nn.Module = None  # Wan2.2 A14B's `transformer`, for t >= boundary
    boundary_ratio: float = None  # the experts meet at timestep boundary_ratio x num_train_timesteps

    lora_prefix = "transformer."  # diffusers' WanPipeline loads a LoRA's "transformer." keys
    schedule_class = FlowSchedule
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
        if self.device == "cpu":
            yield
            return
        with visiting(self.device, [self.text_encoder], [m for m in (self.unet, self.vae) if not _in_cpu_memory(m)]):
            yield

    @property
    def high_noise(self):
        """The first steps' expert for the sampler (`HighNoise`), or None for one transformer."""
        if self.high_expert is None:
            return None
        boundary = self.boundary_ratio * self.schedule.num_train_timesteps
        return HighNoise(self.high_expert, boundary, self.spec.guidance_high, self.high_expert_on_device)

    @contextlib.contextmanager
    def high_expert_on_device(self):
        """A14B's high-noise expert on the device for its steps. A card that would still have the
        expert's size free after taking it in keeps it there for good; on a smaller one it visits
        while the low-noise one (LoRA included) waits in CPU memory, so the card holds one expert
        at a time, for two copies of an expert each way per batch of videos. A sharded expert
        (--shard) stays where FSDP keeps it."""
        # No GPU, or the memory simulator's "meta" model: there the two experts' equal weights count as
        # if swapped, the high-noise one never and the low-noise one throughout.
        if torch.device(self.device).type in ("cpu", "meta") or not _in_cpu_memory(self.high_expert) \
                or sharded(self.high_expert):
            yield
            return
        size = sum(p.nbytes for p in self.high_expert.parameters())
        if torch.device(self.device).type == "cuda" and torch.cuda.mem_get_info(self.device)[0] >= 2 * size:
            self.high_expert.to(self.device)
            yield
            return
        with visiting(self.device, [self.high_expert], [self.unet]):
            yield

    def frame_pool(self, frames, f):
        """The shortest prefix of the video that holds f frames: a frame can only be decoded exactly
        by decoding every latent frame before it, so the f frames come from the first
        m = 1 + ceil((f - 1) / 4) latent frames, 1 + 4 (m - 1) pixel frames (f = 1: pixel frame 0
        alone, the cheapest; f = 5: 2 latent frames). The reward then sees only the start of the
        video, the price of exactness."""
        r = self.temporal_factor
        return min(frames, 1 + r * math.ceil((f - 1) / r))

    def decode_frames(self, z0, frame_idx, use_checkpoint=True, one_at_a_time=False):
        """Decode all m latent frames of z0 (B, C, m, h, w), keep pixel frames `frame_idx` of the 1 + 4 (m - 1).

        z0 may be the first m latent frames of a longer video (the prefix `frame_pool` names): the
        frames returned equal those of a full decode, exactly, because the decoder only looks back.
        The whole decode is one checkpoint, recomputed in backward, and inside it each resnet and
        resampler is a checkpoint of its own that replays the feature cache it started from
        (`_with_cache`: run again on its own, a unit would otherwise read the cache of a later
        frame).

        The checkpoint runs with `early_stop=False`. By default a recomputation stops as soon as
        it has rebuilt the tensors backward needs, here before the decode's final `clear_cache()`,
        and the causal cache would keep the recomputed activations alive through the rest of
        backward (the transformer's). With `one_at_a_time` (--low-memory) each latent frame of
        each video is its own checkpoint (`decode_by_latent_frame`).
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
        and inside it each resnet and resampler of the decoder (`_with_cache`).
        Also the timestep hook, on both experts of A14B (the high-noise one needs no checkpointing:
        it never runs with gradients)."""
        self.unet.enable_gradient_checkpointing()
        checkpoint_units(unit for block in self.unet.blocks for unit in (block.attn1, block.attn2, block.ffn))
        checkpoint_units((m for m in self.vae.decoder.modules() if type(m).__name__ in CAUSAL_UNITS), wrap=_with_cache)
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
        parts = dict(unet=WanTransformer3DModel.from_pretrained(source, subfolder=low, torch_dtype=dtype),
                     vae=AutoencoderKLWan.from_pretrained(source, subfolder="vae", torch_dtype=dtype),
                     text_encoder=UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype),
                     tokenizer=AutoTokenizer.from_pretrained(source, subfolder="tokenizer"))
        if experts:
            parts["high_expert"] = WanTransformer3DModel.from_pretrained(source, subfolder="transformer",
                                                                          torch_dtype=dtype)
            parts["boundary_ratio"] = index["boundary_ratio"]
        return parts


def registry_entry(source, transformer_config, vae_config):
    """The registry entry whose defaults a Wan folder or hub id takes, read off its configs: A14B
    names two experts, TI2V-5B's VAE is residual, a 14B transformer has 40 blocks."""
    if model_index(source).get("boundary_ratio") is not None:
        return "wan22-a14b"
    if vae_config.get("is_residual"):
        return "wan22-5b"
    return "wan-14b" if transformer_config.get("num_layers") == 40 else "wan"


def decode_by_latent_frame(vae, z):
    """The causal decode of z (B, C, m, h, w) as m checkpoints, one a latent frame -> (B, 3, 1 + 4 (m - 1), H, W).

    diffusers' `_decode` loop written out: latent frame i goes through the decoder with the feature
    cache latent frame i - 1 left (the last two frames of every causal conv's input). Each frame's
    decode is a checkpoint that takes that cache as input and returns the new one beside its
    pixels, so backward recomputes one latent frame's decode at a time, where one checkpoint
    around the whole decode holds all m frames' activations at once when it is recomputed.

    What backward must keep are the m - 1 caches between frames, and at full resolution each is
    about as large as a frame's activations. They wait in host memory (`to_host`; on a CPU that
    is where they are) and come back a conv at a time while their frame is recomputed: the device
    then holds one latent frame's decode however long the video, which is what lets a reward see
    frames spread over the whole clip (`vader.decode_random_frames`). A cache's gradient crosses
    back the same way: one copy of every cache each way per video, and host memory for all of
    them (BENCHMARKS.md). The frames are bit for bit the full decode's, the gradients equal to
    float32 rounding (the caches' gradients add up in another order). Backward must be
    `.backward()`, as train.py's: `torch.autograd.grad` does not pass the reentrant checkpoints below.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    x = vae.post_quant_conv(z)  # a 1x1x1 convolution: it looks at no other frame
    cache, frames = [None] * vae._cached_conv_counts["decoder"], []
    # With several latent frames each checkpoint is reentrant: one node of the graph, which runs
    # only once the gradients of both its pixels and its cache have arrived, and then recomputes
    # and backpropagates its whole latent frame before the next node starts. A non-reentrant
    # checkpoint is recomputed at the first of its saved tensors that backward reaches, and the
    # pixels' gradient reaches every latent frame's at once, so several frames would be
    # recomputed together. Alone, a latent frame has no cache to wait for.
    reentrant = x.shape[2] > 1
    for i in range(x.shape[2]):
        out, *cache = checkpoint(_decode_latent_frame, vae.decoder, x[:, :, i:i + 1], i == 0, *cache,
                                 use_reentrant=reentrant, **({} if reentrant else {"early_stop": False}))
        cache = [to_host(c) if torch.is_tensor(c) else c for c in cache]
        frames.append(out)
    out = torch.cat(frames, dim=2)  # (B, 3 or 12, 1 + 4 (m - 1), H', W')
    if vae.config.patch_size is not None:  # Wan2.2's VAE: 12 channels of 2x2 pixel patches -> 3
        out = unpatchify(out, vae.config.patch_size)
    return out.clamp(-1, 1)  # as `_decode` clamps


def to_host(t):
    """A copy of t in host memory; autograd carries its gradient back to t's device."""
    return t.to("cpu")


def _decode_latent_frame(decoder, x, first, *cache):
    """One latent frame x (B, C, 1, h, w) through the causal decoder: (its pixels, the cache it leaves).

    A cache entry in host memory comes back to the device where its conv reads it (diffusers'
    causal conv moves it), so one entry at a time, and its gradient leaves as soon as that
    conv's backward has made it."""
    cache = list(cache)
    return (decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first), *cache)


CAUSAL_UNITS = ("WanResidualBlock", "WanResample")  # the decoder's units that read and advance the feature cache


def _with_cache(forward, x, feat_cache=None, feat_idx=[0], **kwargs):  # noqa: B006 (diffusers' signature)
    """A causal decoder unit's forward (a resnet's, a resampler's) as an exact checkpoint of its own.

    A unit reads the feature cache its causal convolutions left at the previous latent frame
    (`feat_cache[i]`, the last two frames of each conv's input: one slot a conv, from
    `feat_idx` on) and overwrites it with this frame's, so run again in backward it would read a
    later frame's cache: a plain checkpoint would recompute something else. Every run here, the
    first and the recomputation, gets its slots as the unit found them, and the first run's
    updates go back into the decoder's cache. Backward through the decode's checkpoint
    (`decode_frames`) then keeps only each unit's input and recomputes one unit at a time, as
    SD's VAE is checkpointed per resnet.

    The unit's cached tensors go in as the checkpoint's inputs, not a closure's: a checkpoint saves
    its inputs for backward as autograd saves any tensor, so inside the decode's own checkpoint
    they are dropped after its first run and kept only while it is recomputed.
    """
    if feat_cache is None or not torch.is_grad_enabled():
        return forward(x, feat_cache, feat_idx, **kwargs)
    start, size = feat_idx[0], len(feat_cache)
    own = range(start, start + _cache_slots(forward.__self__))
    found = {i: feat_cache[i] for i in own}  # tensors, or the markers diffusers uses ("Rep", None)
    held, first = [i for i in own if torch.is_tensor(found[i])], {}

    def run(x, *tensors):
        cache = [None] * size
        cache[start:start + len(own)] = [found[i] for i in own]
        for i, t in zip(held, tensors):
            cache[i] = t
        out = forward(x, cache, [start], **kwargs)
        if "done" not in first:  # the first run's updates go on to the next unit; a recomputation's are dropped
            first.update({i: cache[i] for i in own})
        return out

    out = checkpoint(run, x, *(found[i] for i in held), use_reentrant=False, early_stop=False)
    for i in own:
        feat_cache[i] = first.pop(i)
    feat_idx[0], first["done"] = start + len(own), True
    found.update({i: None for i in held})  # the closure keeps only the markers
    return out


@functools.cache
def _cache_slots(unit):
    """How many cache slots a decoder unit uses: one for each causal conv that looks back in time."""
    return sum(type(m).__name__ == "WanCausalConv3d" and m.kernel_size[0] > 1 for m in unit.modules())


def _in_cpu_memory(module):
    """Whether a module's weights are in CPU memory (one without weights is taken to be on the device)."""
    p = next(module.parameters(), None)
    return p is not None and p.device.type == "cpu"


def _timestep_per_video(transformer, args, kwargs):
    """Forward pre-hook: the sampler's timestep, a Python number, as the (B,) tensor Wan's embedding needs.

    UNets take a number and broadcast it themselves; WanTransformer3DModel reads `timestep.ndim`.
    """
    if len(args) < 2 or torch.is_tensor(args[1]):  # called by keyword (WanPipeline), or with a tensor already
        return args, kwargs
    x, t = args[0], args[1]  # (B, C, F, h, w), a float T·σ
    return (x, torch.full((x.shape[0],), float(t), device=x.device), *args[2:]), kwargs  # timestep (B,)
