"""Stand-ins for released artefacts that cannot hide a mapping bug.

A miniature of a release (a reward model's weights, a model folder) is written in the release's
own format and key names, at a tiny size. Freshly initialised, most of its tensors sit at their
defaults: biases 0, norms 1, a logit scale at its init value. A converter that drops a bias, or
merges it with itself, then changes nothing, and a parity test passes on a broken mapping.
`away_from_defaults` moves every parameter off its default; `defaults_left` finds any that stayed.
"""
import torch


@torch.no_grad()
def away_from_defaults(module, seed=0, scale=0.05):
    """Add N(0, scale) to every floating parameter of `module`, in place (fixed seed): no bias stays
    0, no norm weight stays 1, no scalar stays at its initial value. Buffers (positions, rotary
    frequencies) are computed, not learned, and stay as they are. Returns the module."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.is_floating_point():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return module


def defaults_left(tensors, reference=None):
    """Names of the floating tensors of a state dict that are constant (every element equal: a zero
    bias, a unit norm) or, with `reference` (a freshly initialised state dict of the same model),
    equal to their fresh value."""
    found = []
    for k, v in tensors.items():
        if not torch.is_tensor(v) or not v.is_floating_point() or v.numel() == 0:
            continue
        if v.numel() > 1 and bool((v == v.flatten()[0]).all()):
            found.append(k)
        elif reference is not None and k in reference and torch.equal(v, reference[k].to(v.dtype)):
            found.append(k)
    return found
