"""A release loaded whole or not at all.

diffusers' and transformers' `from_pretrained` load a checkpoint that lacks some of the model's
tensors, or holds others, with a warning (which the scripts silence) and the missing ones left
at random: a damaged or mismatched folder would then run as a model that was never trained.
`strict(cls).from_pretrained(...)` raises instead, naming the tensors. `misfit` and `unfit_text`
are the same check and wording for a state dict read by hand (a reward's .pth, the toy judge).
"""


def few(keys, n=3):
    """The first `n` of some tensor names, and how many more: "a.bias, b.weight and 5 more"."""
    keys = sorted(str(k) for k in keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def misfit(expected, tensors):
    """(missing, unexpected, shapes) of a state dict `tensors` against a module's `expected` one;
    shapes: (name, in the file, in the model) of the tensors whose shape does not fit."""
    shapes = [(k, tuple(getattr(tensors[k], "shape", ())), tuple(v.shape)) for k, v in expected.items()
              if k in tensors and getattr(tensors[k], "shape", None) != v.shape]
    return set(expected) - set(tensors), set(tensors) - set(expected), shapes


def unfit_text(missing=(), unexpected=(), shapes=()):
    """'missing ...; unexpected ...; other shapes name (file) vs (model)', or '' when everything fits."""
    shapes = ", ".join(f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in sorted(shapes)[:3])
    found = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
             f"other shapes {shapes}" if shapes else ""]
    return "; ".join(f for f in found if f)


class strict:
    """`strict(cls).from_pretrained(source, ...)`: cls.from_pretrained, refusing (ValueError) a
    checkpoint with missing, unexpected or mis-shaped tensors, the first few named."""

    def __init__(self, cls):
        self.cls = cls

    def from_pretrained(self, source, subfolder=None, **kwargs):
        model, info = self.cls.from_pretrained(source, subfolder=subfolder, output_loading_info=True, **kwargs)
        text = unfit_text(info.get("missing_keys"), info.get("unexpected_keys"), info.get("mismatched_keys"))
        if text:
            where = f"{source}/{subfolder}" if subfolder else str(source)
            raise ValueError(f"{where} does not hold a whole {self.cls.__name__}: {text}")
        return model
