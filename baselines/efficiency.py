"""VADER against DDPO and GRPO: how much reward each learning signal buys per reward query.

    python bench.py efficiency                      # tiny model, brightness, 3 seeds
    python bench.py efficiency --seeds 0            # the classroom version, a few minutes

The paper's central claim (VADER, arXiv 2407.08737; AlignProp, 2310.03739): backpropagating the
reward's gradient learns with far fewer reward queries than a gradient-free policy-gradient
method: the paper's baseline DDPO (2305.13301, baselines/ddpo.py), and today's, GRPO
(2402.03300 as DanceGRPO and Flow-GRPO apply it, baselines/grpo.py). BENCHMARKS.md holds the
measured numbers.
"""
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from baselines.report import lr_grid_table, markdown_table, plot_efficiency, summarise, write_csv
from infra.cli import UserError
from infra.files import atomic_write_text
from train import Config

#### efficiency: reward gradients against DDPO and GRPO
#
# All methods train the same LoRA (same rank, same seed, same initial A) of the same model on
# the same reward and prompts, and are stopped after the same number of reward queries (one
# query = one video scored). Both are evaluated the same way: the mean reward of a fixed set of
# videos (EVAL_SEED, deterministic DDIM, every frame decoded, as sample.py generates them),
# at log-spaced query counts. The training reward of the last batch is logged beside it.

EVAL_SEED = 10_000  # seeds of the evaluation videos, far from any training seed


def add_parser(sub):
    """The `efficiency` subcommand; defaults are sized for a 2-core CPU (a few minutes)."""
    e = sub.add_parser("efficiency", help="VADER vs DDPO and GRPO: reward against reward queries and seconds",
                       description="Train VADER (K = 1 and a larger K), DDPO and GRPO with the same budget of reward "
                                   "queries; write a table, a CSV and a plot.")
    e.add_argument("--model", default="tiny", help="a name in models.MODELS (tiny, toy) or a folder")
    e.add_argument("--reward", default="brightness", help="a reward in rewards.REWARDS (weight-free: offline)")
    e.add_argument("--prompts", default="animals.txt", help="prompts file: a path or a name under prompts/")
    e.add_argument("--num-prompts", type=int, default=4, help="use the first P prompts, so DDPO sees each one often")
    e.add_argument("--budget", type=int, default=64, help="reward queries (videos scored) per training run")
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run of each method per seed")
    e.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r for both methods (VADER: 16)")
    e.add_argument("--num-steps", type=int, default=4, help="DDIM steps N (fewer than the model's, for a CPU)")
    e.add_argument("--frames", type=int, default=4, help="frames per video F (fewer than the model's, for a CPU)")
    e.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (1: one UNet pass a step)")
    e.add_argument("--decode-frames", type=int, default=1, help="f, frames decoded for each training reward query")
    e.add_argument("--grad-steps", type=int, default=1, help="K of the main VADER run (VADER: 1)")
    e.add_argument("--large-k", type=int, default=None, help="K of the truncation ablation run (default: N)")
    e.add_argument("--batch-size", type=int, default=2, help="VADER: videos per optimizer step")
    e.add_argument("--vader-lr", type=float, default=None, help="VADER's AdamW lr (default: the model's recipe)")
    e.add_argument("--ddpo-lr", type=float, default=1e-3, help="DDPO's AdamW lr (best of 3e-4..3e-2 on tiny)")
    e.add_argument("--ddpo-batch", type=int, default=8, help="DDPO: videos sampled per epoch (2 PPO steps each)")
    e.add_argument("--clip-range", type=float, default=1e-4, help="PPO's clip range ε (DDPO: 1e-4)")
    e.add_argument("--eta", type=float, default=1.0, help="η of the stochastic DDIM policy of DDPO and GRPO (DDPO: 1)")
    e.add_argument("--grpo-lr", type=float, default=1e-3, help="GRPO's AdamW lr")
    e.add_argument("--grpo-group", type=int, default=4, help="GRPO: G, videos of one prompt scored together")
    e.add_argument("--grpo-groups", type=int, default=2, help="GRPO: prompts per epoch (G of each, 2 PPO steps)")
    e.add_argument("--grpo-window", type=int, nargs=2, metavar=("FIRST", "N"), default=None,
                   help="GRPO trains only steps FIRST..FIRST+N-1 of the chain (MixGRPO); default: all")
    e.add_argument("--lr-grid", type=float, nargs="+", default=None, metavar="LR",
                   help="tune each method's lr first: one run per lr on the first seed, the best final reward wins")
    e.add_argument("--eval-videos", type=int, default=4, help="fixed videos scored at every evaluation point")
    e.add_argument("--eval-points", type=int, default=8, help="log-spaced evaluation points, one batch to budget")
    e.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    e.add_argument("--output-dir", default="runs/efficiency", help="where the CSVs, table and plot go")
    e.set_defaults(run=run_efficiency)


def check_efficiency_args(a):
    """Bad values are the user's to fix: one line naming the flag."""
    from baselines.ddpo import DDPOConfig
    from infra.checks import check_device, check_flags, check_output_dir, number

    for name in ("num_prompts", "budget", "lora_rank", "num_steps", "frames", "batch_size", "ddpo_batch",
                 "grpo_group", "grpo_groups", "eval_videos", "eval_points"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    grpo_batch = a.grpo_group * a.grpo_groups
    if a.budget < max(a.batch_size, a.ddpo_batch, grpo_batch):
        raise UserError(f"--budget ({a.budget}) is smaller than one batch (--batch-size {a.batch_size}, "
                        f"--ddpo-batch {a.ddpo_batch}, GRPO's {grpo_batch}); raise --budget")
    if a.budget % a.batch_size or a.budget % a.ddpo_batch or a.budget % grpo_batch:
        raise UserError(f"--budget ({a.budget}) must be a multiple of --batch-size ({a.batch_size}), --ddpo-batch "
                        f"({a.ddpo_batch}) and GRPO's --grpo-group x --grpo-groups ({grpo_batch}), so every method "
                        "stops at exactly the budget")
    if a.grpo_window is not None and not (0 <= a.grpo_window[0] and a.grpo_window[1] >= 1
                                          and sum(a.grpo_window) <= a.num_steps):
        raise UserError(f"--grpo-window {a.grpo_window[0]} {a.grpo_window[1]} does not fit --num-steps "
                        f"{a.num_steps}; FIRST + N must be at most {a.num_steps}")
    for name, k in (("grad-steps", a.grad_steps), ("large-k", a.large_k)):
        if not 1 <= k <= a.num_steps:
            raise UserError(f"--{name} must be between 1 and --num-steps ({a.num_steps}), got {k}")
    if not 1 <= a.decode_frames <= a.frames:
        raise UserError(f"--decode-frames must be between 1 and --frames ({a.frames}), got {a.decode_frames}")
    if a.ddpo_batch % DDPOConfig.updates_per_epoch:
        raise UserError(f"--ddpo-batch must be a multiple of {DDPOConfig.updates_per_epoch} (the PPO steps that "
                        f"share an epoch's videos), got {a.ddpo_batch}")
    bad = next((lr for lr in a.lr_grid or () if not (number(lr) and lr > 0)), None)
    if bad is not None:
        raise UserError(f"--lr-grid values must be finite numbers above 0, got {bad}")
    for name in ("eta", "clip_range", "ddpo_lr", "grpo_lr", "vader_lr"):
        value = getattr(a, name)
        if value is not None and not (number(value) and value > 0):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number above 0, got {value}")
    check_flags(a)  # --seeds, --guidance, --num-steps, --frames, --lora-rank: infra/checks.py's rules
    check_device(a.device)
    check_output_dir(a.output_dir)


def vader_update(model, reward_fn, params, optimizer, scaler, prompts, cond, uncond, a, generator, k):
    """One optimizer step of train.py (train.train_step) on one micro-batch of `a.batch_size` prompts.

    Returns the rewards (B,) of the videos it queried.
    """
    from infra.setup import batch_drawer
    from train import train_step

    draw_batch = batch_drawer(model, a, prompts, cond, generator)
    return train_step(model, reward_fn, params, optimizer, scaler, draw_batch, uncond, a, generator, k)[1]


def train_run(method, lr, seed, model, reward_fn, prompts, cond, uncond, evaluate, a, ddpo_cfg, grpo_cfg):
    """Train a fresh LoRA with `method` ("VADER K=k", "DDPO" or "GRPO") until the query budget is spent.

    All use train.py's AdamW (its weight decay) and gradient clipping; only the lr differs.
    Returns one row per evaluation point: queries, training seconds so far (evaluation excluded),
    the evaluation reward and change, and the mean reward of the last training batch.
    """
    from baselines.ddpo import PromptStats, ddpo_epoch
    from baselines.grpo import grpo_epoch
    from lora import inject_lora
    from vader import loss_scaler

    torch.manual_seed(seed)  # the LoRA's initial A: the same for every method of this seed
    run_model = replace(model, unet=copy.deepcopy(model.unet))  # the base stays clean for the next run
    params = inject_lora(run_model.unet, a.lora_rank)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=Config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    if method == "DDPO":
        stats = PromptStats(ddpo_cfg.buffer_size, ddpo_cfg.min_count)

        def update():
            return ddpo_epoch(run_model, reward_fn, params, optimizer, stats, prompts, cond, uncond, a, ddpo_cfg,
                              generator)[0]
    elif method == "GRPO":
        def update():
            return grpo_epoch(run_model, reward_fn, params, optimizer, prompts, cond, uncond, a, grpo_cfg,
                              generator)[0]
    else:
        k = int(method.split("K=")[1])
        scaler = loss_scaler(run_model.unet.dtype, a.device)

        def update():
            return vader_update(run_model, reward_fn, params, optimizer, scaler, prompts, cond, uncond, a, generator, k)

    points = eval_schedule(min(a.batch_size, a.ddpo_batch, grpo_cfg.samples_per_epoch), a.budget, a.eval_points)
    rows = [dict(method=method, seed=seed, queries=0, seconds=0.0, train_reward=float("nan"), **evaluate(run_model))]
    queries, seconds = 0, 0.0
    while queries < a.budget:
        start = time.perf_counter()
        rewards = update()
        seconds += time.perf_counter() - start
        queries += len(rewards)
        if queries >= points[0] or queries >= a.budget:
            points = [p for p in points if p > queries] or [a.budget]
            rows.append(dict(method=method, seed=seed, queries=queries, seconds=round(seconds, 2),
                             train_reward=rewards.mean().item(), **evaluate(run_model)))
    print(f"  seed {seed} {method:>9}: eval reward {rows[0]['eval_reward']:.4f} -> {rows[-1]['eval_reward']:.4f} "
          f"in {queries} queries, {seconds:.1f} s of training")
    return rows


def toy_captions(prompts):
    """Whether every prompt is a toy-world caption, which the detector can check a video against."""
    from toy.world import COLOURS, DIRECTIONS, SHAPES, SIZES, Clip

    try:
        clips = [Clip.parse(p) for p in prompts]
    except ValueError:
        return False
    return all(c.colour in COLOURS and c.shape in SHAPES and c.size in SIZES and c.direction in DIRECTIONS
               for c in clips)


def eval_schedule(first, budget, n):
    """n query counts, log-spaced from one batch to the budget: dense where VADER moves fastest."""
    return sorted({round(first * (budget / first) ** (i / max(n - 1, 1))) for i in range(n)})


def run_efficiency(a):
    from baselines.ddpo import DDPOConfig
    from baselines.grpo import GRPOConfig, trained_steps
    from infra.files import read_prompts
    from models import load_video_model
    from rewards import load_reward
    from vader import encode_prompts, generate

    a.large_k = a.num_steps if a.large_k is None else a.large_k
    check_efficiency_args(a)
    prompts = read_prompts(a.prompts)[:a.num_prompts]
    reward_fn = load_reward(a.reward, device=a.device)
    if a.decode_frames < reward_fn.min_frames:
        raise UserError(f"the {a.reward} reward needs --decode-frames {reward_fn.min_frames} or more")
    model = load_video_model(a.model, a.device)
    a.height, a.width = model.spec.height, model.spec.width
    a.grad_accum, a.grad_clip, a.low_memory = 1, Config.grad_clip, False  # train.py's step, one micro-batch
    a.vader_lr = a.vader_lr or model.spec.recipe.get("lr", Config.lr)  # as train.py picks it
    ddpo_cfg = DDPOConfig(eta=a.eta, samples_per_epoch=a.ddpo_batch, clip_range=a.clip_range,
                          grad_clip=Config.grad_clip)
    grpo_cfg = GRPOConfig(group_size=a.grpo_group, groups_per_epoch=a.grpo_groups, clip_range=a.clip_range, eta=a.eta,
                          window=tuple(a.grpo_window) if a.grpo_window else None, grad_clip=Config.grad_clip)
    cond, uncond = encode_prompts(model, prompts), encode_prompts(model, [""])  # (P, 77, D), (1, 77, D)
    eval_idx = torch.arange(a.eval_videos) % len(prompts)
    eval_prompts = [prompts[i] for i in eval_idx]  # E strings
    eval_cond = cond[eval_idx.to(cond.device)]  # (E, 77, D)

    def videos(m):
        return generate(m, eval_cond, uncond, a.frames, a.height, a.width, a.num_steps, a.guidance,
                        seed=EVAL_SEED)  # (E, F, 3, H, W)

    base = videos(model)  # (E, F, 3, H, W)
    base_reward = reward_fn(base, eval_prompts).mean().item()

    detector = toy_captions(prompts)

    def evaluate(m):
        video = videos(m)  # (E, F, 3, H, W)
        scores = dict(eval_reward=reward_fn(video, eval_prompts).mean().item(), change=(video - base).abs().mean().item())
        if detector:  # the toy world's weight-free detector: an opinion no method optimises
            from toy.world import accuracy

            scores.update({f"{k}_accuracy": v for k, v in accuracy(video, eval_prompts).items()})
        return scores

    methods = [f"VADER K={a.grad_steps}", f"VADER K={a.large_k}", "DDPO", "GRPO"]
    methods = list(dict.fromkeys(methods))  # one VADER run when --large-k equals --grad-steps
    print(f"model {a.model}: {a.frames} frames of {a.height}x{a.width}, {a.num_steps} DDIM steps, "
          f"guidance {a.guidance} | reward {a.reward} on {a.decode_frames} frame(s) | {len(prompts)} prompts "
          f"| LoRA rank {a.lora_rank}")
    print(f"budget {a.budget} reward queries per run | VADER: {a.batch_size} videos per step, lr {a.vader_lr} "
          f"| DDPO: {a.ddpo_batch} videos per epoch, {ddpo_cfg.updates_per_epoch} PPO steps, lr {a.ddpo_lr}, "
          f"ε {a.clip_range}, η {a.eta} | GRPO: {a.grpo_groups} groups of {a.grpo_group} per epoch, lr {a.grpo_lr}, "
          f"steps {list(trained_steps(grpo_cfg.window, a.num_steps))} "
          f"| eval: {a.eval_videos} fixed videos, base reward {base_reward:.4f}"
          + (", base detector accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in evaluate(model).items()
                                                      if k.endswith("accuracy")) if detector else ""))
    lrs = {m: {"DDPO": a.ddpo_lr, "GRPO": a.grpo_lr}.get(m, a.vader_lr) for m in methods}
    out = Path(a.output_dir)
    grid_table, tuned = "", {}  # tuned: (method, lr) -> the rows of its run on the first seed
    if a.lr_grid:
        print(f"tuning: each method at lr {', '.join(map(str, a.lr_grid))} on seed {a.seeds[0]}")
        for m in methods:
            for lr in a.lr_grid:
                tuned[m, lr] = train_run(m, lr, a.seeds[0], model, reward_fn, prompts, cond, uncond, evaluate, a,
                                         ddpo_cfg, grpo_cfg)
        grid = [dict(method=m, lr=lr, final_reward=r[-1]["eval_reward"]) for (m, lr), r in tuned.items()]
        lrs = {m: max((g for g in grid if g["method"] == m), key=lambda g: g["final_reward"])["lr"] for m in methods}
        write_csv(out / "efficiency_lr_grid.csv", grid)
        grid_table = lr_grid_table(grid, methods, a)
    rows = []
    for seed in a.seeds:
        for m in methods:
            if seed == a.seeds[0] and (m, lrs[m]) in tuned:  # a run is deterministic: the grid's is this one
                rows += tuned[m, lrs[m]]
            else:
                rows += train_run(m, lrs[m], seed, model, reward_fn, prompts, cond, uncond, evaluate, a, ddpo_cfg,
                                  grpo_cfg)
    summary = summarise(rows, methods, a.seeds, base_reward)
    write_csv(out / "efficiency_curves.csv", rows)
    write_csv(out / "efficiency_summary.csv", summary)
    table = grid_table + markdown_table(summary, methods, a, base_reward) + "\nlearning rates: " + ", ".join(
        f"{m} {lrs[m]:g}" for m in methods) + "\n"
    atomic_write_text(out / "efficiency.md", table)
    plot_efficiency(out / "efficiency.png", rows, methods, base_reward, a.reward)
    print("\n" + table)
    print(f"wrote {out}/efficiency_curves.csv, efficiency_summary.csv, efficiency.md, efficiency.png")
