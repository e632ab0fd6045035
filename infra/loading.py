"""A release loaded whole or not at all.

diffusers' and transformers' `from_pretrained` load a checkpoint that lacks some of the model's
tensors, or holds others, with a warning (which the scripts silence) and the missing ones left
at random: a damaged or mismatched folder would then run as a model that was never trained.
`strict(cls).from_pretrained(...)` raises instead, naming the tensors.
"""


class strict:
    """`strict(cls).from_pretrained(source, ...)`: cls.from_pretrained, refusing (ValueError) a
    checkpoint with missing, unexpected or mis-shaped tensors, the first few named."""

    def __init__(self, cls):
        self.cls = cls

    def from_pretrained(self, source, subfolder=None, **kwargs):
        model, info = self.cls.from_pretrained(source, subfolder=subfolder, output_loading_info=True, **kwargs)
        bad = {k.removesuffix("_keys"): [str(x[0] if isinstance(x, tuple) else x) for x in info.get(k) or []]
               for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        bad = {k: v for k, v in bad.items() if v}
        if bad:
            where = f"{source}/{subfolder}" if subfolder else str(source)
            raise ValueError(f"{where} does not hold a whole {self.cls.__name__}: "
                             + "; ".join(f"{k} {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for k, v in bad.items()))
        return model
