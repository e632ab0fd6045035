"""Wan's causal VAE under checkpointing, the Wan chapter's second half (read after wan.py).

A causal decoder decodes latent frame i from itself and a feature cache that latent frame i - 1
left behind (the last two frames of every causal conv's input), so its pieces cannot simply be
run again in backward: run again, a piece would read a later frame's cache. Two exact ways to
checkpoint it anyway:
- `checkpoint_with_cache`: each resnet and resampler of the decoder a checkpoint of its own that
  replays the cache it started from (always on, inside the whole decode's checkpoint);
- `decode_by_latent_frame`: the decode as one checkpoint a latent frame, taking and returning
  the cache, which waits in host memory between frames (--low-memory).
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint


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
    frames spread over the whole clip (vader.py). A cache's gradient crosses
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


def checkpoint_with_cache(forward, x, feat_cache=None, feat_idx=[0], **kwargs):  # noqa: B006 (diffusers' signature)
    """A causal decoder unit's forward (a resnet's, a resampler's) as an exact checkpoint of its own.

    A unit reads the feature cache its causal convolutions left at the previous latent frame
    (`feat_cache[i]`, the last two frames of each conv's input: one slot a conv, from
    `feat_idx` on) and overwrites it with this frame's, so run again in backward it would read a
    later frame's cache: a plain checkpoint would recompute something else. Every run here, the
    first and the recomputation, gets its slots as the unit found them, and the first run's
    updates go back into the decoder's cache. Backward through the decode's checkpoint
    (`wan.WanModel.decode_frames`) then keeps only each unit's input and recomputes one unit at a time, as
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
