"""What a run writes as it goes: checkpoints you can trust, metrics.csv, the reward curve.

A checkpoint is a folder `checkpoints/step-000100/` holding
    lora.safetensors   the adapters (lora.save_lora)
    state.pt           optimizer state, step, and every random number generator's state
    config.json        the run's settings at that step
    metrics.csv        the metrics up to that step
    sharded/           under --shard only: the LoRA and AdamW's state as every process's slices,
                       through torch.distributed.checkpoint (infra/sharding.py); state.pt then
                       holds the step and the generators, and lora.safetensors the gathered LoRA
It is written under a temporary name and renamed into place in one step, so a kill or a full
disk at any instant leaves either the complete new checkpoint or none, and the previous ones
are untouched. `state.pt` holds only tensors, numbers and lists, so it loads with
`torch.load(weights_only=True)`: no code in the file ever runs. A run killed mid-save leaves a
`step-N.tmp` folder (and maybe `.NAME.tmp-*` files) behind; the next resume clears them away.
Before a resume uses a checkpoint it reads every file of it; a damaged newest checkpoint (a copy
cut short, a disk that filled up under another tool) is skipped with a warning for the newest
intact one.

Exact resume needs every source of randomness restored: the run's own torch.Generator (noise,
prompt order, K, decoded frames), and, for anything else that draws (LoRA dropout, a reward
model), the global torch, CUDA, NumPy and Python generators.
"""
import csv
import io
import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from infra.cli import UserError
from infra.files import TMP_MARK, WriteError, atomic_path, read_csv, read_json, read_tensor_state, write_error
from infra.folder import in_use
from infra.sharding import SHARDED, load_sharded, read_metadata, save_sharded

PREFIX = "step-"
METRICS = ("step", "reward_mean", "reward_std", "loss", "lr", "grad_norm", "grad_steps", "skipped", "eval_reward",
           "seconds")  # the columns of metrics.csv


def list_checkpoints(out):
    """The complete checkpoints of a run folder, oldest first (temporary folders excluded)."""
    folder = Path(out) / "checkpoints"
    return sorted(p for p in folder.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit())


def rng_state(generator):
    """Every generator's state, as tensors and plain lists (weights_only-loadable)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [version, list(keys), gauss],
    }


def set_rng_state(state, generator):
    """Restore what `rng_state` captured."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))


def save_checkpoint(out, step, unet, optimizer, generator, config_text, metrics_text, keep=0, prefix="unet.", base="",
                    sharded=None):
    """Write checkpoints/step-N atomically, then keep only the newest `keep` (0: keep all).

    `sharded` = (rank, world) under --shard, where every process calls this: each writes its slices
    into the temporary folder, and the main process (rank 0) writes the rest and renames.

    An OSError (a full disk, no permission) becomes a UserError that says the previous
    checkpoint is intact, which it is: nothing is renamed until every file is written. A step
    saved twice (a resumed run) is replaced by renames only, so a kill at any instant leaves
    step-N or step-N.old whole.
    """
    from lora import save_lora

    from infra.distributed import barrier
    from infra.sharding import whole_lora

    final = Path(out) / "checkpoints" / f"{PREFIX}{step:06d}"
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    main = sharded is None or sharded[0] == 0
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        state = {"step": step, "rng": rng_state(generator)}
        if sharded:
            barrier(sharded[1])  # the folder exists before any process writes into it
            save_sharded(tmp, unet, optimizer)
        else:
            state["optimizer"] = optimizer.state_dict()
        tensors = whole_lora(unet, prefix)  # gathered from every process under --shard
        if main:
            save_lora(unet, tmp / "lora.safetensors", prefix, base, tensors=tensors)
        if main:
            buffer = io.BytesIO()  # torch.save's own file writer turns a full disk into a RuntimeError
            torch.save(state, buffer)
            (tmp / "state.pt").write_bytes(buffer.getvalue())
            (tmp / "config.json").write_text(config_text)
            (tmp / "metrics.csv").write_text(metrics_text)
        if sharded:
            barrier(sharded[1])  # every process's slices are written
        if main:
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, WriteError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(out)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        reason = (write_error(final, e) if isinstance(e, OSError) else e).reason
        raise UserError(f"{reason}; {kept}; free some space or choose another --output-dir, then --resume") from None
    if keep > 0 and main:
        for stale in list_checkpoints(out)[:-keep]:
            shutil.rmtree(stale)
    return final


def remove_temporaries(out):
    """Clear what a killed run left half-written in `out`: `step-N.tmp` folders and `.NAME.tmp-*`
    files; a `step-N.old` (killed while replacing step-N) becomes step-N again if that is gone."""
    folder = Path(out) / "checkpoints"
    for old in folder.glob(f"{PREFIX}*.old"):
        final = old.with_suffix("")
        shutil.rmtree(old) if final.exists() else old.rename(final)
    for tmp in folder.glob(f"{PREFIX}*.tmp"):
        shutil.rmtree(tmp)
    for f in Path(out).rglob(f".*{TMP_MARK}*"):
        f.unlink()


def check_checkpoint(folder, check_config=None):
    """Read every file of a checkpoint as a resume would; a damaged one raises a UserError.
    `check_config(dict)` raises a UserError for a config.json that is not a run's settings."""
    from infra.lorafile import read_lora_file

    fix = "resume from another checkpoint, or start again without --resume"
    tensors, meta = read_lora_file(folder / "lora.safetensors")
    state = read_tensor_state(folder / "state.pt", "checkpoint state", fix)
    sharded = (folder / SHARDED).is_dir()  # its optimizer state is there, not in state.pt
    if sharded:
        read_metadata(folder / SHARDED)
    if not (isinstance(state, dict) and {"step", "rng", *(() if sharded else ("optimizer",))} <= set(state)):
        raise UserError(f"checkpoint state {folder / 'state.pt'} lacks its step, optimizer or RNG states; {fix}")
    if state["step"] != int(folder.name[len(PREFIX):]):
        raise UserError(f"checkpoint state {folder / 'state.pt'} is of step {state['step']}, not of {folder.name}; {fix}")
    config = read_json(folder / "config.json", "checkpoint config", (), fix)
    if check_config is not None:
        try:
            check_config(config)
        except UserError as e:
            raise UserError(f"checkpoint config {folder / 'config.json'} is not a run's settings ({e}); {fix}") from None
    check_files_agree(folder, config, tensors, meta, state, fix)
    read_metrics(folder / "metrics.csv")


def check_files_agree(folder, config, tensors, meta, state, fix):
    """A checkpoint's files must tell one story: config.json's LoRA rank and alpha are its
    lora.safetensors', its model the base that file names, and AdamW's moments in state.pt are of
    the LoRA's shapes. A hand-edited config or a file copied in from another run is a damaged
    checkpoint: resumed, it would fail at the first step, or carry a LoRA of one base on as another's."""
    from infra.lorafile import same_base

    rank, alpha = int(meta["rank"]), float(meta["alpha"])
    want_rank, want_alpha = config.get("lora_rank"), config.get("lora_alpha")
    if isinstance(want_rank, int) and not isinstance(want_rank, bool) and want_rank != rank:
        raise UserError(f"checkpoint config {folder / 'config.json'} has lora_rank {want_rank}, but its "
                        f"lora.safetensors is of rank {rank}; {fix}")
    want_alpha = want_rank if want_alpha is None else want_alpha  # None: alpha = r
    if isinstance(want_alpha, (int, float)) and not isinstance(want_alpha, bool) and not math.isclose(
            want_alpha, alpha, rel_tol=1e-6):
        raise UserError(f"checkpoint config {folder / 'config.json'} has lora_alpha {want_alpha}, but its "
                        f"lora.safetensors has alpha {alpha:g}; {fix}")
    base, model = meta.get("base_model", ""), config.get("model")
    if base and isinstance(model, str) and not same_base(model, base):
        raise UserError(f"checkpoint config {folder / 'config.json'} has the model {model}, but its lora.safetensors "
                        f"was trained on {base}; {fix}")
    moments = state.get("optimizer", {}).get("state", {}) if isinstance(state.get("optimizer"), dict) else {}
    shapes = sorted(tuple(m["exp_avg"].shape) for m in moments.values()
                    if isinstance(m, dict) and isinstance(m.get("exp_avg"), torch.Tensor))
    if shapes and shapes != sorted(tuple(t.shape) for t in tensors.values()):
        raise UserError(f"checkpoint state {folder / 'state.pt'} holds AdamW's moments of {len(shapes)} tensors that "
                        f"are not the shapes of its lora.safetensors' {len(tensors)}; {fix}")


def find_resume_point(target, check_config=None):
    """--resume TARGET -> (run folder, checkpoint folder), the checkpoint read whole first.

    TARGET is a run folder, whose newest intact checkpoint is used (damaged newer ones are named
    in a warning), or one checkpoint folder, which must be intact.
    """
    target = Path(target)
    one = target.name.startswith(PREFIX) and target.parent.name == "checkpoints"
    in_use(target.parent.parent if one else target)  # a live run's checkpoints come and go
    if one:
        check_checkpoint(target, check_config)
        return target.parent.parent, target
    found = list_checkpoints(target)
    if not found:
        if (target / "config.json").is_file():  # a run stopped before it saved anything
            raise UserError(f"--resume: no checkpoint in {target}: the run there stopped before its first one, so "
                            "there is nothing to resume; run the same command without --resume to start it again")
        raise UserError(f"--resume: no checkpoint in {target / 'checkpoints'}; start the run without --resume")
    damaged = []
    for ckpt in reversed(found):
        try:
            check_checkpoint(ckpt, check_config)
        except UserError as e:
            damaged.append(f"{ckpt.name}: {e}")
            continue
        if damaged:
            print(f"warning: resuming from {ckpt.name}, the newest intact checkpoint; skipped "
                  + " | ".join(damaged), file=sys.stderr)
        return target, ckpt
    raise UserError(f"--resume: no intact checkpoint in {target / 'checkpoints'}; tried " + " | ".join(damaged))


def load_checkpoint(folder, unet, optimizer, generator, sharded=False):
    """Restore the adapters, the optimizer and every RNG from a checkpoint; returns its step.

    `sharded` (--shard): the LoRA and AdamW's state come from the checkpoint's sharded/ folder,
    resharded for this run's number of processes, whatever number wrote them.
    """
    from infra.lorafile import load_lora_file

    fix = "resume from another checkpoint, or start again without --resume"
    if sharded != (folder / SHARDED).is_dir():
        saved = "with" if not sharded else "without"
        raise UserError(f"checkpoint {folder} was saved {saved} --shard; resume it {saved} --shard")
    state = read_tensor_state(folder / "state.pt", "checkpoint state", fix)  # tensors and numbers only, no code
    try:
        if sharded:
            load_sharded(folder, unet, optimizer)
        else:
            load_lora_file(unet, folder / "lora.safetensors")
            optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint state {folder / 'state.pt'} does not fit this run ({e}); {fix}") from None
    return state["step"]


def restore(resume, lr, unet, optimizer, generator, sharded=False):
    """(step, metrics rows) to continue from: checkpoint `resume`'s, or (0, []) when it is ''.

    A resumed run may change the learning rate, so `lr` replaces the one saved with the optimizer.
    """
    if not resume:
        return 0, []
    step = load_checkpoint(Path(resume), unet, optimizer, generator, sharded)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return step, read_metrics(Path(resume) / "metrics.csv")


def tidy_run_folder(out):
    """Before a run writes into `out`: clear what a killed run left half-written."""
    if Path(out).is_dir():
        remove_temporaries(out)


#### Logs: metrics.csv, the reward curve (the trackers of --report-to: infra/trackers.py)

def metrics_text(rows):
    """metrics.csv's contents; floats are written in full so a resumed run can match bit for bit.

    The columns are METRICS, then the evaluation rewards' (`eval_<name>`, `eval_<name>/<part>`)
    in the order they first appear; a row without one (a step with no evaluation) leaves it empty.
    """
    columns = list(METRICS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_metrics(path):
    """Rows of a metrics.csv, numbers parsed, empty cells kept as ''."""
    ints = ("step", "grad_steps", "skipped")
    rows = read_csv(path, "metrics log", METRICS, more=True)
    try:
        return [{k: v if v == "" else (int(v) if k in ints else float(v)) for k, v in row.items()} for row in rows]
    except ValueError as e:
        raise UserError(f"metrics log {path} holds a cell that is not a number ({e}); restore it from a copy") from None


@torch.no_grad()
def eval_columns(eval_rewards, frames, prompts, fps):
    """{column: value} of the evaluation rewards (rewards.load_eval_rewards) on videos (B, F, 3, H, W) made
    at `fps`: `eval_<name>`, the mean reward, or `eval_<name>/<part>` for each part of a reward with parts."""
    from infra.frames import frames_scored

    out = {}
    for name, fn in eval_rewards.items():
        seen = frames_scored(fn, frames, None, fps)
        if hasattr(fn, "parts"):
            out.update({f"eval_{name}/{part}": value for part, value in fn.parts(seen, prompts).items()})
        else:
            out[f"eval_{name}"] = fn(seen, prompts).float().mean().item()
    return out


def eval_groups(rows):
    """{panel: [column, ...]}: "eval_reward" (the trained reward on the held-out videos) and one
    panel per evaluation reward, its parts together."""
    groups = {}
    for k in rows[0] if rows else ():
        if k.startswith("eval_") and any(r.get(k, "") != "" for r in rows):
            groups.setdefault(k.split("/")[0], []).append(k)
    return groups


def eval_summary(rows):
    """Lines 'column first -> last' for every held-out measurement, from the first evaluation to the last."""
    held = [r for r in rows if r.get("eval_reward", "") != ""]
    if len(held) < 2:
        return []
    first, last = held[0], held[-1]
    columns = [c for cs in eval_groups(held).values() for c in cs if first[c] != "" and last[c] != ""]
    width = max(map(len, columns))
    return [f"held-out videos, step {first['step']} -> {last['step']}:"] + [
        f"  {c:{width}s} {first[c]:8.3f} -> {last[c]:.3f}" for c in columns]


ACCURACIES = ("eval_detector",)  # evaluation rewards whose parts are fractions right: drawn on 0..1
MIN_RELATIVE_SPAN = 0.5  # a panel's y-span is at least half its values' magnitude


def honest_span(values, accuracy=False):
    """The y-limits of a panel: 0..1 for accuracies; otherwise the values' range widened, about its
    middle, to at least MIN_RELATIVE_SPAN of their magnitude, so that values which barely move
    (a motion measure going 0.0204 -> 0.0196) are drawn as barely moving, not as a cliff."""
    if accuracy:
        return -0.03, 1.03
    lo, hi = min(values), max(values)
    span = max(hi - lo, MIN_RELATIVE_SPAN * max(abs(lo), abs(hi)), 1e-6)
    mid = (lo + hi) / 2
    return mid - 0.55 * span, mid + 0.55 * span


def plot_rewards(out, rows, reward_name):
    """reward_curve.png: training reward per step (mean ± std, and its trailing mean over 10 steps)
    and held-out reward where measured,
    beside one panel per evaluation reward, so the trained reward and its second opinions read together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {k: v for k, v in eval_groups(rows).items() if k != "eval_reward"}
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(6 + 4.5 * len(groups), 4), squeeze=False)
    ax = axes[0, 0]
    train = [r for r in rows if r["reward_mean"] != ""]
    steps = [r["step"] for r in train]
    mean = torch.tensor([r["reward_mean"] for r in train])
    std = torch.tensor([r["reward_std"] for r in train])
    ax.plot(steps, mean, color="C0", linewidth=0.8, alpha=0.6, label="train reward (mean of the batch)")
    ax.fill_between(steps, mean - std, mean + std, color="C0", alpha=0.15, label="±1 std")
    w = min(10, len(train))
    if w > 1:  # a batch of two videos is noisy; the trailing mean over w steps shows the trend
        total = torch.cat([torch.zeros(1, dtype=mean.dtype), mean.cumsum(0)])  # (n + 1,)
        ax.plot(steps[w - 1:], (total[w:] - total[:-w]) / w, color="C0", linewidth=2.5,
                label=f"train reward (mean of {w} steps)")
    held = [r for r in rows if r["eval_reward"] != ""]
    if held:
        ax.plot([r["step"] for r in held], [r["eval_reward"] for r in held], "o-", color="C1", label="held-out prompts")
    ax.set(xlabel="optimizer step", ylabel=reward_name, title=f"VADER: {reward_name}")
    ax.legend()
    for ax, (group, columns) in zip(axes[0, 1:], groups.items()):
        # Parts named "<set>_<measure>" (the detector's heldout_shape, seen_shape): one colour per
        # measure, one line style per set, so a measure's two sets read as a pair.
        parts = [c.split("/")[-1].rpartition("_") for c in columns]  # (set, "_", measure)
        sets, measures = list(dict.fromkeys(p[0] for p in parts)), list(dict.fromkeys(p[2] for p in parts))
        for c, (kind, _, measure) in zip(columns, parts):
            points = [(r["step"], r[c]) for r in rows if r.get(c, "") != ""]
            ax.plot(*zip(*points), marker="o", linestyle=("-", "--", ":", "-.")[sets.index(kind) % 4],
                    color=f"C{measures.index(measure) % 10}", label=c.split("/")[-1])
        ax.set(xlabel="optimizer step", title=f"held-out: {group[len('eval_'):]}")
        values = [r[c] for c in columns for r in rows if r.get(c, "") != ""]
        ax.set_ylim(*honest_span(values, accuracy=group in ACCURACIES))
        if len(columns) > 1:
            ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(out / "reward_curve.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
