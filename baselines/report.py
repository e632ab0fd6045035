"""What `bench.py efficiency` writes: the per-seed summary, the tables for BENCHMARKS.md, the plot, CSVs.

The targets are the final eval rewards of the gradient-free baselines (DDPO, GRPO); every method
is measured by the queries and seconds it needs to reach them.
"""
import csv
import io

import torch

from infra.files import atomic_path, atomic_write_text

def queries_to(rows, target, column="queries"):
    """`column` at the first evaluation point after training began whose reward reaches `target`; NaN if none."""
    return next((r[column] for r in rows if r["queries"] > 0 and r["eval_reward"] >= target), float("nan"))


BASELINES = ("DDPO", "GRPO")  # the gradient-free methods whose final rewards are the targets


def summarise(rows, methods, seeds, base_reward):
    """Per seed and method: final reward, and queries and seconds to reach each baseline's final reward.

    A seed whose baseline run ends at or below the base model has no target from it (NaN): every
    method "reaches" such a reward at its first evaluation, which would measure nothing.
    """
    out = []
    for seed in seeds:
        runs = {m: [r for r in rows if r["method"] == m and r["seed"] == seed] for m in methods}
        row = {m: dict(method=m, seed=seed, final_reward=runs[m][-1]["eval_reward"],
                       final_change=runs[m][-1]["change"],
                       **{f"final_{k}": v for k, v in runs[m][-1].items() if k.endswith("_accuracy")})
               for m in methods}
        for b in (b for b in BASELINES if b in methods):
            target = runs[b][-1]["eval_reward"]
            target = target if target > base_reward else float("nan")
            for m in methods:
                row[m].update({f"target_{b}": target, f"queries_to_{b}": queries_to(runs[m], target),
                               f"seconds_to_{b}": queries_to(runs[m], target, "seconds")})
        out += row.values()
    return out


def spread(values, missing="n/a"):
    """'mean ± std' over the seeds that have a value (population std; one seed shows ± 0); NaN = `missing`."""
    t = torch.tensor(values, dtype=torch.float64)
    t = t[~t.isnan()]
    if len(t) == 0:
        return missing
    missed = f" ({len(values) - len(t)} of {len(values)} seeds: {missing})" if len(t) < len(values) else ""
    return f"{t.mean():.4g} ± {t.std(unbiased=False):.2g}{missed}"


def markdown_table(summary, methods, a, base_reward):
    """The table for BENCHMARKS.md, with each baseline's ratio of queries (and seconds) to its target."""
    baselines = [b for b in BASELINES if b in methods]
    lines = [f"Base model eval reward: {base_reward:.4f} ({a.reward}). Targets = the eval reward each baseline "
             f"ends with after {a.budget} queries (per seed; n/a where it did not improve on the base, or a method "
             f"never reached it). Mean ± std over seeds {', '.join(map(str, a.seeds))}.", "",
             f"| method | final reward at {a.budget} queries | "
             + " | ".join(f"queries to {b}'s | training s to {b}'s" for b in baselines)
             + " | change from base (mean abs pixel) |", "| --- " * (3 + 2 * len(baselines)) + "|"]
    columns = ["final_reward", *(f"{k}_to_{b}" for b in baselines for k in ("queries", "seconds")), "final_change"]
    accuracies = [k for k in summary[0] if k.endswith("_accuracy")]  # the detector's, for toy-world prompts
    columns += accuracies
    if accuracies:
        lines[-2] = lines[-2].rstrip(" |") + " | " + " | ".join(f"final {k[6:].replace('_', ' ')}" for k in accuracies) + " |"
        lines[-1] += " --- |" * len(accuracies)
    for m in methods:
        s = [r for r in summary if r["method"] == m]
        lines.append(f"| {m} | " + " | ".join(spread([r[k] for r in s]) for k in columns) + " |")
    lines.append("")
    for b in baselines:
        base_runs = [r for r in summary if r["method"] == b]
        for m in (m for m in methods if m.startswith("VADER")):
            vader = [r for r in summary if r["method"] == m]
            q = [d[f"queries_to_{b}"] / v[f"queries_to_{b}"] for d, v in zip(base_runs, vader)]
            sec = [d[f"seconds_to_{b}"] / v[f"seconds_to_{b}"] for d, v in zip(base_runs, vader)]
            gain = [(v["final_reward"] - base_reward) / (d["final_reward"] - base_reward)
                    if d["final_reward"] > base_reward else float("nan") for d, v in zip(base_runs, vader)]
            lines.append(f"{b} / {m}: {spread(q)} times the reward queries (per seed: "
                         f"{', '.join(f'{x:.3g}' for x in q)}), {spread(sec)} times the training seconds, to reach "
                         f"{b}'s final reward. {m} / {b}: {spread(gain, f'n/a, {b} did not improve')} times the "
                         f"reward gained over the base model at {a.budget} queries.")
    return "\n".join(lines) + "\n"


def lr_grid_table(grid, methods, a):
    """Final eval reward of every (method, lr) of the tuning runs; the best of each method in bold."""
    lines = [f"Learning-rate grid: final eval reward at {a.budget} queries, seed {a.seeds[0]} (bold: chosen).", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in a.lr_grid) + " |", "| --- " * (1 + len(a.lr_grid)) + "|"]
    for m in methods:
        cells = [g["final_reward"] for g in grid if g["method"] == m]
        best = max(cells)
        lines.append(f"| {m} | " + " | ".join(f"**{c:.4f}**" if c == best else f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines) + "\n\n"


def plot_efficiency(path, rows, methods, base_reward, reward_name):
    """Mean over seeds with a min-max band: reward vs queries, vs seconds; change vs queries; and, for
    toy-world prompts, a second row: the detector's shape accuracy vs queries and seconds, and its
    colour, size and direction accuracy (their mean) vs queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    detector = "shape_accuracy" in rows[0]
    panels = [("queries", "eval_reward", f"eval reward ({reward_name})"),
              ("seconds", "eval_reward", f"eval reward ({reward_name})"),
              ("queries", "change", "change from base videos (mean |Δ pixel|)")]
    if detector:
        panels += [("queries", "shape_accuracy", "detector: shape accuracy"),
                   ("seconds", "shape_accuracy", "detector: shape accuracy"),
                   ("queries", "other_accuracy", "detector: colour, size, direction (mean)")]
    fig, axes = plt.subplots(len(panels) // 3, 3, figsize=(15, 4 * (len(panels) // 3)), squeeze=False)
    axes = axes.flatten()
    for m in methods:
        seeds = sorted({r["seed"] for r in rows if r["method"] == m})
        # The query counts of a method are the same for every seed, so runs line up point by point.
        runs = [[r for r in rows if r["method"] == m and r["seed"] == s and r["queries"] > 0] for s in seeds]
        if detector:
            runs = [[dict(r, other_accuracy=(r["colour_accuracy"] + r["size_accuracy"] + r["direction_accuracy"]) / 3)
                     for r in run] for run in runs]
        curve = {k: torch.tensor([[r[k] for r in run] for run in runs], dtype=torch.float64)
                 for k in {k for panel in panels for k in panel[:2]}}
        for ax, (x, y, _) in zip(axes, panels):
            xs = curve[x].mean(dim=0)
            ax.plot(xs, curve[y].mean(dim=0), marker="o", ms=3, label=m)
            ax.fill_between(xs, curve[y].min(dim=0).values, curve[y].max(dim=0).values, alpha=0.2)
    base = rows[0]
    for ax, (_, y, _) in zip(axes, panels):
        level = base_reward if y == "eval_reward" else base.get(y) if y != "other_accuracy" else None
        if level is not None and y != "change":
            ax.axhline(level, color="grey", ls="--", lw=1, label="base model")
    for ax, (x, _, yl) in zip(axes, panels):
        ax.set_xscale("log", base=2)  # VADER's gains come in its first few steps; a log axis shows them
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="reward queries (videos scored)" if x == "queries" else "training seconds (this CPU)", ylabel=yl)
        ax.legend(fontsize=8)
    fig.suptitle("VADER (reward gradients) vs DDPO and GRPO (policy gradients): mean over seeds, band = min..max")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_csv(path, rows):
    """Rows of dicts to a CSV file, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
