"""How the command line reaches the rewards: weighted sums, --reward-options, and which term takes which option.

rewards.load_reward builds what these functions parse; nothing here loads a model. A weight, and an
option's value that reads as a number, must be finite: nan or inf would make every reward, and so
every gradient, nan. An option whose factory's default is a number takes only a number.
"""
import inspect
import math

from infra.cli import UserError


def accepted_options(factory):
    """The option names a reward factory takes, or None when it passes **options through."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) - {"device", "dtype"}


def check_options(name, factory, options):
    """UserError if `options` holds one that reward `name`'s factory does not take."""
    accepted = accepted_options(factory)
    unknown = set() if accepted is None else set(options) - accepted
    if unknown:
        raise UserError(
            f"reward {name!r} takes no option {', '.join(sorted(unknown))}; "
            f"its options: {', '.join(sorted(accepted)) or 'none'}"
        )
    params = inspect.signature(factory).parameters
    for key, value in sorted(options.items()):
        default = params[key].default if key in params else None
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"--reward-options {key}={value}: reward {name!r} takes a number for {key} "
                            f"(default {default}); write e.g. {key}={default}")


def reward_terms(spec, options, factory_of):
    """[(name, weight, its options)] of a reward spec ("hps" or "aesthetic:1,hps:2"): every name known
    (an unknown one fails before anything is built), each option routed to the terms that take it."""
    terms = parse_reward_spec(spec)
    names = [n for n, _ in terms]
    for n in names:
        factory_of(n)
    per_term = route_options(spec, names, options, factory_of)
    for n in names:
        check_options(n, factory_of(n), per_term[n])
    return [(n, w, per_term[n]) for n, w in terms]


def parse_reward_spec(spec):
    """'aesthetic:1.0,hps:2.0' -> [('aesthetic', 1.0), ('hps', 2.0)]; 'hps' -> [('hps', 1.0)]."""
    terms = []
    for part in spec.split(","):
        name, has_weight, weight = part.strip().partition(":")
        try:
            value = float(weight) if has_weight else 1.0
        except ValueError:
            raise UserError(
                f"reward weight {weight!r} in {spec!r} is not a number; write e.g. aesthetic:1.0,hps:2.0"
            ) from None
        if not math.isfinite(value):
            raise UserError(
                f"reward weight {weight.strip()!r} in {spec!r} is not a finite number (it would make every reward "
                "nan or inf); write e.g. aesthetic:1.0,hps:2.0"
            )
        terms.append((name.strip(), value))
    return terms


def route_options(spec, names, options, factory_of):
    """{term: its options} for a sum of rewards `names`.

    "hps.version" goes to the hps term only (and wins over a plain one); a plain option
    ("weights") goes to every term that takes it and is an error when none does. A single reward
    takes its options plainly ("version") or qualified ("hps.version").
    """
    per_term = {n: {} for n in names}
    takes = {n: accepted_options(factory_of(n)) for n in names}  # None: passes everything on
    for key, value in sorted(options.items(), key=lambda kv: "." in kv[0]):  # qualified ones win
        target, dot, option = key.rpartition(".")
        if dot and target in per_term:
            takers = [target]
        elif dot:  # "hps.version" for a term that is itself a sum (aesthetic_hps) goes on whole
            takers, option = [n for n in names if takes[n] is None], key
            if not takers:
                raise UserError(f"option {key!r} names no term of reward {spec!r} (terms: {', '.join(names)})")
        elif len(names) == 1:
            takers = names  # a lone reward reports its own "takes no option" error
        else:
            takers = [n for n in names if takes[n] is None or option in takes[n]]
        if not takers:
            raise UserError(f"no term of reward {spec!r} takes option {key!r}")
        for n in takers:
            per_term[n][option] = value
    return per_term


def parse_options(text):
    """--reward-options 'label=dancing,log_prob=true' -> {'label': 'dancing', 'log_prob': True} (numbers, booleans parsed)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise UserError(f"--reward-options wants key=value pairs, got {item!r}")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
            continue
        for cast in (int, float, str):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                pass
        if isinstance(out[key], float) and not math.isfinite(out[key]):
            raise UserError(f"--reward-options {key}={value}: not a finite number (nan or inf would make every "
                            f"reward nan); give {key} a finite value")
    return out
