"""`python bench.py memory`: the GPU memory of every configuration, predicted on a CPU.

No GPU is needed to know what a training step keeps alive. Every configuration of
`bench.py speed` is built at real size on the meta device, its weights turned into fake tensors
(`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes and strides, no data), and then
the step train.py takes (train.train_step, through `benchmarks.speed.prepare`) and the plain
generation of the same video run on them. Every operator still runs, as metadata, so autograd,
checkpointing and the optimizer behave exactly as on a GPU; `LiveBytes` below counts the bytes of
the tensor storages alive after every operator, and the peak is the prediction.

What it cannot see: the CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, and the caching
allocator's fragmentation, which `torch.cuda.max_memory_allocated` (what `bench.py speed`
reports) does not count either; and kernels that keep temporaries of their own. Attention runs
through the fused kernel on both devices (flash attention on the CPU too), so no attention
matrix is stored in either. Under --low-memory, what autograd moves to the host is counted off
the device, as on a GPU.

FLOPs are counted on the same run with `torch.utils.flop_counter`'s formulas (FlopCounterMode
itself is not used: its module tracking keeps checkpointed activations alive); their ratio is the
floor on "step / generation" time, and a roofline estimate divides them by a GPU's dense bf16
peak at a stated utilisation (labelled an estimate: it is not a measurement).
"""
import argparse
import contextlib
import json
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from infra.cli import UserError
from infra.files import atomic_write_text

GIB = 2**30
# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity).
GPUS = {"RTX 4090": 165.2, "H100 SXM": 989.4}
UTILISATION = 0.4  # the share of that peak a UNet step reaches, for the estimate only
GOALS_GIB = {"modelscope-256": 5.5, "modelscope-384": 7.5, "zeroscope-576": 10.0, "animatediff-512": 9.0,
             "wan-480-33": 8.0, "wan-480-81": 16.0, "wan22-5b-704-121": 22.0, "wan22-5b-704-49": 16.0,
             "wan-480-33-vr": 16.0, "wan-480-81-vr": 24.0, "modelscope-256-vr": 12.0}  # an 8, 16 or 24 GB card
# Per process under --shard, (config, processes) -> GiB: 4 or 8 cards of 24 GB; one 80 GB card unsharded.
GOALS_PER_RANK_GIB = {("wan14b-480-33", 4): 22.0, ("wan14b-480-81", 8): 22.0, ("wan14b-480-81", 1): 70.0,
                      ("wan22a14b-480-81", 1): 70.0, ("wan22a14b-480-33", 4): 22.0, ("wan22a14b-480-81", 4): 22.0}
# Configs whose per-process table is printed unasked.
SHARDED_BY_DEFAULT = ("wan14b-480-33", "wan14b-480-81", "wan22a14b-480-33", "wan22a14b-480-81")


def add_parser(sub):
    from benchmarks.speed import SPEED_CONFIGS, SPEED_STEPS

    m = sub.add_parser("memory", help="predicted peak GPU memory and FLOPs of every configuration, on a CPU",
                       description="Run train.py's step and plain generation on fake tensors at real sizes; "
                                   "print and write the predicted peak memory, its breakdown, and FLOPs.")
    m.add_argument("--config", default="all", help=f"comma-separated names, or 'all': {', '.join(SPEED_CONFIGS)}")
    m.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="train.py's --low-memory; default: train.py's for the model (on for Wan)")
    m.add_argument("--num-steps", type=int, default=SPEED_STEPS, help="DDIM steps (as bench.py speed; the peak does not "
                   "depend on the no-grad ones, FLOPs do)")
    m.add_argument("--ranks", default="",
                   help="also predict the peak per process under train.py --shard on these numbers of processes, "
                        f"e.g. 1,2,4,8 (default: 1,2,4,8 for {', '.join(SHARDED_BY_DEFAULT)})")
    m.add_argument("--reward-only", action="store_true",
                   help="for the VideoReward configurations: the reward model's forward and backward alone, from "
                        "the configuration's decoded frames (what checkpointing inside it and its pixel budget save)")
    m.add_argument("--output-dir", default="runs/bench", help="where memory-<config>.json goes")
    m.set_defaults(run=run_memory)


#### Counting live bytes

class LiveBytes(TorchDispatchMode):
    """Live bytes of tensor storages, op by op: each storage is added when an op first returns
    it and subtracted when it is freed (a `weakref.finalize` on the storage), so views and
    in-place ops cost nothing and a freed activation is gone at once, as in the caching
    allocator's `memory_allocated`. `static` tensors (weights, LoRA, cached embeddings) are
    counted from the start under their category.

    At every new peak it notes where it is: the innermost module running (forward, or a
    checkpoint's recomputation) and the phase (forward, backward, optimizer), and, when the peak
    has grown by 1% since the last note, the bytes by category (so the breakdown is within 1%).
    """

    def __init__(self, static=(), labels=lambda: (), elsewhere=()):
        super().__init__()
        self.labels = labels  # () -> [(category, tensors)] known only as the step goes (gradients, AdamW state)
        self.elsewhere = {t.untyped_storage()._cdata for t in elsewhere}  # in host memory: never counted
        self.live, self.peak = {}, 0
        self.total, self.noted, self.flops = 0, 0, 0
        self.host = False  # True while tensors are made in host memory (--low-memory's offload)
        self.modules, self.phase, self.where, self.breakdown = [], "forward", "", {}
        self.part_peaks = {}  # "vae", "reward" or "rest" -> (peak bytes while inside it, the module then)
        self.categories = {}  # storage key -> category, for the static tensors and later labels
        for category, tensors in static:
            for t in tensors:
                self.add(t, category)
        self.hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
                      torch.nn.modules.module.register_module_forward_hook(self._leave, always_call=True)]

    def close(self):
        for h in self.hooks:
            h.remove()

    def _enter(self, module, args):
        self.modules.append(getattr(module, "_memory_name", type(module).__name__))

    def _leave(self, module, args, output):
        if self.modules:
            self.modules.pop()

    def add(self, t, category=None):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or self.host or key in self.elsewhere:
            return
        self.live[key] = storage.nbytes()
        if category:
            self.categories[key] = category
        self.total += self.live[key]
        weakref.finalize(storage, self._free, key)
        inside = self.modules[-1] if self.modules else ""
        part = "vae" if inside.startswith("vae") else "reward" if inside.startswith("reward") else "rest"
        if self.total > self.part_peaks.get(part, (0, ""))[0]:
            self.part_peaks[part] = (self.total, inside)
        if self.total > self.peak:
            self.peak = self.total
            backward = torch._C._current_autograd_node() is not None
            phase = "backward" if backward else self.phase
            self.where = f"{phase}{' (recomputing)' if backward and inside else ''}: {inside or '-'}"
            if self.peak >= 1.01 * self.noted:
                self.noted, self.breakdown = self.peak, self.by_category()

    def _free(self, key):
        self.total -= self.live.pop(key, 0)
        self.categories.pop(key, None)

    def by_category(self):
        """Live bytes now, by category; anything unlabelled is an activation (or a temporary)."""
        now = {t.untyped_storage()._cdata: c for c, tensors in self.labels() for t in tensors if t is not None}
        out = {}
        for key, n in self.live.items():
            c = self.categories.get(key) or now.get(key, "activations")
            out[c] = out.get(c, 0) + n
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and is_fake(args[0]):
            # .item() of a fake tensor has no value: the loss and the gradient norm are taken to be
            # finite (1.0), so the optimizer steps as it would on a healthy run.
            return 1.0 if args[0].dtype.is_floating_point else 1
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:  # FlopCounterMode's formulas (the mode itself doubles the memory)
            self.flops += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.add(t)
        return out


def is_fake(t):
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def name_modules(prefix, module):
    """Tag every submodule with its qualified name, for the "where" of a peak."""
    for name, m in module.named_modules():
        m._memory_name = f"{prefix}.{name}" if name else prefix


@contextlib.contextmanager
def host_offload(counter):
    """--low-memory's moves to host memory, seen by the counter: what autograd saves (`save_on_cpu`)
    the causal decoder's caches between latent frames (wan_vae.to_host), and the reward model
    while the rest runs backward (infra.offload.reward_leaves_in_backward) are copied to host memory (not
    counted) and come back to the device when needed (counted when they do)."""
    import infra.offload
    import wan_vae

    def to_host(t):
        counter.host = True
        try:
            return t.clone()
        finally:
            counter.host = False

    class save_on_host(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(to_host, lambda t: t.clone())

    def move_modules(modules, device):  # infra.offload.reward_leaves_in_backward's moves: host copies uncounted, device ones counted
        for m in modules:
            if getattr(m, "_in_host_memory", False) != (device == "cpu"):
                for t in (*m.parameters(), *m.buffers()):
                    t.data = to_host(t.data) if device == "cpu" else t.data.clone()
                m._in_host_memory = device == "cpu"

    originals = torch.autograd.graph.save_on_cpu, wan_vae.to_host, infra.offload.move_modules
    torch.autograd.graph.save_on_cpu, wan_vae.to_host, infra.offload.move_modules = save_on_host, to_host, move_modules
    try:
        yield
    finally:
        torch.autograd.graph.save_on_cpu, wan_vae.to_host, infra.offload.move_modules = originals


def add_compare_parser(sub):
    c = sub.add_parser("compare", help="measured (bench.py speed) against predicted (bench.py memory), side by side",
                       description="Read the speed-*.json and memory-*.json of one folder, as benchmarks/gpu_check.sh "
                                   "writes them on a GPU machine, and write gpu-check.md.")
    c.add_argument("--output-dir", default="runs/bench", help="the folder holding both kinds of JSON")
    c.set_defaults(run=run_compare)


#### One configuration

def simulate(name, low_memory=False, fake=True, num_steps=None):
    """Predicted peak bytes, breakdown and FLOPs of a configuration's training step and generation.

    With fake=False the same counter runs on real CPU tensors (for the tiny and toy models):
    the calibration of the fake run.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.speed import SMALL, SPEED_STEPS, prepare

    num_steps = num_steps or SPEED_STEPS
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    dtype = torch.float32 if name in SMALL else torch.bfloat16  # the small models' CPU dtype, real or fake
    step, generation, parts = prepare(name, "cpu", dtype, low_memory, mode, foreach=True, num_steps=num_steps)
    if fake:
        vision_attention_on_fake_tensors(name, parts["reward_modules"])
    with mode or contextlib.nullcontext():
        model, optimizer = parts["model"], parts["optimizer"]
        for prefix, module in (("unet", model.unet), ("vae", model.vae), *(("reward", m) for m in parts["reward_modules"])):
            name_modules(prefix, module)
        frozen = [t for m in (model.unet, model.vae, *parts["reward_modules"]) for t in (*m.parameters(), *m.buffers())]
        lora = {id(p) for p in parts["params"]}
        static = [("frozen weights", [t for t in frozen if id(t) not in lora]), ("LoRA", parts["params"]),
                  ("text embeddings", [parts["cond"], parts["uncond"]])]
        # Wan2.2 A14B's high-noise expert waits in host memory, and visits the GPU only while the
        # low-noise one (of equal size) is out: counting the low-noise one throughout is the same.
        high = getattr(model, "high_expert", None) or torch.nn.Module()
        elsewhere = [*high.parameters(), *high.buffers()]
        def labels():
            grads = [p.grad for p in parts["params"]]
            state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
            return [("LoRA gradients", grads), ("optimizer state", state)]

        result = {}
        for what, fn in (("step", step), ("generation", generation)):
            counter = LiveBytes(static, labels, elsewhere)
            hook = optimizer.register_step_pre_hook(lambda *a: setattr(counter, "phase", "optimizer"))
            start = time.perf_counter()
            with counter, host_offload(counter):
                fn()
            counter.close()
            hook.remove()
            result[what] = dict(peak_gib=counter.peak / GIB, where=counter.where, flops=counter.flops,
                                breakdown_gib={k: v / GIB for k, v in sorted(counter.breakdown.items())},
                                simulated_s=round(time.perf_counter() - start, 1))
            if what == "generation" and low_memory:  # vader.denoiser_in_cpu_memory: the decode runs without it
                away = sum(t.nbytes for t in (*model.unet.parameters(), *model.unet.buffers()))
                (vae, at), rest = counter.part_peaks.get("vae", (0, "")), counter.part_peaks.get("rest", (0, ""))
                if vae - away > rest[0]:
                    result[what].update(peak_gib=(vae - away) / GIB, where=f"forward: {at} (the denoiser in CPU memory)")
                else:
                    result[what].update(peak_gib=rest[0] / GIB, where=f"forward: {rest[1] or '-'}")
                result[what]["breakdown_gib"] = {}  # the counter's was taken with the denoiser on the device
            if what == "step" and "reward" in counter.part_peaks:  # the peak while the reward model runs or is recomputed
                result["step"]["reward_peak_gib"] = counter.part_peaks["reward"][0] / GIB
            if what == "step":  # gradients and AdamW's moments now exist: their sizes, for the table
                grads = sum(p.grad.nbytes for p in parts["params"] if p.grad is not None)
                state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
                result["step"]["gradients_gib"], result["step"]["optimizer_state_gib"] = grads / GIB, state / GIB
                # For the per-process prediction under --shard: the frozen denoiser, and its largest
                # FSDP unit (a block's weights, LoRA included), which is what an all-gather brings in.
                denoiser = sum(t.nbytes for t in (*model.unet.parameters(), *model.unet.buffers()) if id(t) not in lora)
                block = max(sum(p.nbytes for p in b.parameters()) for b in model.shard_blocks())
                result["step"]["denoiser_gib"], result["step"]["block_gib"] = denoiser / GIB, block / GIB
                # The training prompts' embeddings wait in host memory (infra/prompt_store.py): the step
                # counts one micro-batch's, so its peak is the same for any number of prompts.
                result["step"]["host_mib_per_prompt"] = parts["cond"][:1].nbytes / 2**20
    return result


def vision_attention_on_fake_tensors(name, reward_modules):
    """Let VideoReward's vision tower run on fake tensors, at the memory cost it has on a GPU.

    Qwen2-VL's vision tower attends within each pair of frames: it reads the video's grid
    (t, gh, gw) to lay out its rotary positions and the t segments of attention (`cu_seqlens`),
    then runs SDPA on one segment at a time. A fake grid has no values to read, so the grid is
    worked out here from the configuration, the positions and segments computed from it on real
    tensors and handed in, and the attention done by `segment_attention` (transformers' varlen
    path, with equal segments of known length): the same SDPA per segment, so the same memory.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import AttentionInterface
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    from benchmarks.speed import config_of
    from reward_models.videoreward import MAX_PIXELS, VideoRewardModel, smart_resize

    _, height, width, _, _, f, options = config_of(name)
    model = next((m for m in reward_modules if isinstance(m, VideoRewardModel)), None)
    if model is None:
        return
    h, w = smart_resize(height, width, model.patch * model.merge, max_pixels=(options or {}).get("max_pixels", MAX_PIXELS))
    t, gh, gw = -(-f // model.temporal), h // model.patch, w // model.patch
    with unset_fake_temporarily():
        grid = torch.tensor([[t, gh, gw]])  # one video per micro-batch, as the configurations run
        given = dict(position_ids=get_vision_position_ids(grid, model.merge), cu_seqlens=get_vision_cu_seqlens(grid),
                     max_seqlen=gh * gw)

    def segment_attention(module, q, k, v, attention_mask=None, scaling=None, dropout=0.0, max_length_q=None, **kw):
        b, heads, n, d = q.shape  # (1, heads, t gh gw, d) -> t segments of gh gw
        q, k, v = (x.view(b, heads, n // max_length_q, max_length_q, d).transpose(1, 2) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)  # (1, t, heads, L, d)
        return out.transpose(2, 3).reshape(b, n, heads, d), None

    AttentionInterface.register("flash_segments", segment_attention)
    model.qwen.visual.config._attn_implementation = "flash_segments"  # "flash": transformers' varlen branch
    model.qwen.visual.register_forward_pre_hook(lambda m, args, kwargs: (args, {**kwargs, **given}), with_kwargs=True)


def simulate_reward(name):
    """Peak bytes of a VideoReward configuration's reward alone: forward and backward from its f
    decoded frames (1, f, 3, H, W), weights counted; -> (peak GiB, weights GiB)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.speed import config_of, materialize_fake, random_videoreward

    _, height, width, _, _, f, options = config_of(name)
    if options is None:
        raise UserError(f"--reward-only: {name} is not a VideoReward configuration (their names end in -vr...)")
    reward, modules = random_videoreward("meta", torch.bfloat16, **options)
    vision_attention_on_fake_tensors(name, modules)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in modules:
            materialize_fake(m)
        weights = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        frames = torch.rand(1, f, 3, height, width, requires_grad=True)
        counter = LiveBytes([("frozen weights", weights)])
        with counter:
            reward(frames, ["a prompt"]).sum().backward()
        counter.close()
    return counter.peak / GIB, sum(t.nbytes for t in weights) / GIB


def register_cpu_attention_flops():
    """FlopCounterMode counts CUDA's fused attention but not the CPU's; the FLOPs are the same."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    forward, backward = aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward in fc.flop_registry:
        return

    @fc.register_flop_formula(forward)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#### Several processes under --shard

def per_rank(step, n):
    """The peak GiB of one process of n under train.py --shard, from the one-process simulation
    `step` (simulate()["step"]), by parts:

        peak(n) = denoiser / n                      the frozen weights, sharded
                + (VAE + reward)                    replicated on every process
                + (LoRA + gradients + AdamW) / n    sharded with their blocks
                + 2 x block                         gathered in flight (n > 1): the block running
                                                    and the next one, prefetched
                + activations                       each process's own micro-batch, unchanged

    The activations are the one-process peak minus every weight and state alive at it; LoRA,
    gradients and AdamW's moments are counted whole even where the first step's peak comes
    before AdamW allocates them, so a later step's peak is covered. Counting the gathered blocks
    at the activations' peak is an upper bound: at the VAE decoder's peak no block is gathered.
    """
    b = step["breakdown_gib"]
    frozen = b.get("frozen weights", 0.0)
    trainable_at_peak = sum(b.get(k, 0.0) for k in ("LoRA", "LoRA gradients", "optimizer state"))
    trainable = b.get("LoRA", 0.0) + step["gradients_gib"] + step["optimizer_state_gib"]
    parts = {"sharded denoiser": step["denoiser_gib"] / n, "replicated VAE + reward": frozen - step["denoiser_gib"],
             "LoRA + gradients + AdamW": trainable / n, "gathered blocks": 2 * step["block_gib"] if n > 1 else 0.0,
             "activations": step["peak_gib"] - frozen - trainable_at_peak}
    return dict(parts, peak=sum(parts.values()))


def next_lever(parts):
    """What to reach for when a goal is missed: the largest part, and the engine feature that splits it."""
    largest = max((k for k in parts if k != "peak"), key=parts.get)
    if largest == "activations":
        return ("activations hold the most, and sharding the weights does not split them: each process keeps its "
                "own video's; the next lever is sequence (context) parallelism of the attention over the video's "
                "tokens (torch.distributed.tensor.experimental.context_parallel), or fewer frames")
    return f"{largest} hold the most; more processes split them further"


def print_per_rank(name, step, ranks, output_dir):
    """The per-process table of one configuration, and memory-<config>-ranks.json."""
    print(f"\n{name} under train.py --shard, predicted peak GiB per process (one process: no sharding):\n"
          "| processes | sharded denoiser | replicated VAE + reward | LoRA + gradients + AdamW | gathered blocks | "
          "activations | peak per process | goal |\n|" + " --- |" * 8)
    rows = []
    for n in ranks:
        parts = per_rank(step, n)
        goal = GOALS_PER_RANK_GIB.get((name, n))
        met = "" if goal is None else (f"≤ {goal}: met" if parts["peak"] <= goal else f"≤ {goal}: missed")
        print(f"| {n} | " + " | ".join(f"{parts[k]:.2f}" for k in parts if k != "peak")
              + f" | **{parts['peak']:.2f}** | {met} |")
        if goal is not None and parts["peak"] > goal:
            print(f"  missed on {n}: {next_lever(parts)}")
        rows.append(dict(processes=n, goal_gib=goal, **{k: round(v, 4) for k, v in parts.items()}))
    record = dict(config=name, formula=per_rank.__doc__.split("\n\n")[1], where=step["where"], rows=rows)
    atomic_write_text(Path(output_dir) / f"memory-{name}-ranks.json", json.dumps(record, indent=2) + "\n")


def parse_ranks(text):
    """--ranks: comma-separated whole numbers of processes, each at least 1."""
    try:
        ranks = [int(r) for r in text.split(",")]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise UserError(f"--ranks takes numbers of processes like 1,2,4,8, got {text!r}")
    return ranks


#### The command

def run_memory(a):
    from benchmarks.speed import config_names, config_of, low_memory_for

    from infra.checks import check_flags, check_output_dir

    names = config_names(a.config)
    if a.num_steps < 1:
        raise UserError(f"--num-steps must be at least 1, got {a.num_steps}")
    check_flags(a)  # --num-steps at most the schedule's 1000
    check_output_dir(a.output_dir)
    ranks, sharded = parse_ranks(a.ranks or "1,2,4,8"), []
    if a.reward_only:
        print("| config | reward alone: peak GiB | its weights | its activations |\n| --- | --- | --- | --- |")
        for name in names:
            peak, weights = simulate_reward(name)
            print(f"| {name} | {peak:.2f} | {weights:.2f} | {peak - weights:.2f} |", flush=True)
        return
    register_cpu_attention_flops()
    gpus = " | ".join(f"step s on {g} (estimate)" for g in GPUS)
    print(f"| config | low-memory | step peak GiB | goal | generation peak GiB | peak at | TFLOP step | "
          f"TFLOP generation | step / generation | {gpus} |\n|" + " --- |" * (9 + len(GPUS)))
    for name in names:
        low_memory = low_memory_for(name, a.low_memory)
        r = simulate(name, low_memory, num_steps=a.num_steps)
        step, gen = r["step"], r["generation"]
        ratio = step["flops"] / gen["flops"]
        estimates = " | ".join(f"{step['flops'] / (peak * 1e12 * UTILISATION):.2f}" for peak in GPUS.values())
        goal = GOALS_GIB.get(name)
        print(f"| {name} | {'yes' if low_memory else 'no'} | {step['peak_gib']:.2f} | "
              f"{f'≤ {goal}' if goal else ''} | {gen['peak_gib']:.2f} | {step['where']} | {step['flops'] / 1e12:.1f} | "
              f"{gen['flops'] / 1e12:.1f} | {ratio:.2f} | {estimates} |", flush=True)
        record = dict(config=name, low_memory=low_memory, num_steps=a.num_steps, device="fake tensors (CPU simulation)",
                      dtype="bfloat16", step=step, generation=gen, flops_ratio=ratio,
                      estimate=dict(utilisation=UTILISATION, gpus_tflops=GPUS,
                                    step_s={g: step["flops"] / (p * 1e12 * UTILISATION) for g, p in GPUS.items()}))
        stem = f"memory-{name}" + ("-low-memory" if low_memory else "")
        atomic_write_text(Path(a.output_dir) / f"{stem}.json", json.dumps(record, indent=2) + "\n")
        if a.ranks or name in SHARDED_BY_DEFAULT:
            sharded.append((name, step))
        print(f"  {name}: prompt embeddings wait in host memory, {step['host_mib_per_prompt']:.2f} MiB a prompt; "
              "the step peak holds a micro-batch's, whatever the number of prompts")
        if "reward_peak_gib" in step and config_of(name)[6] is not None:  # VideoReward: its own share is a lever's
            print(f"  {name}: {step['reward_peak_gib']:.2f} GiB at most while the reward model runs or is recomputed")
    for name, step in sharded:
        print_per_rank(name, step, ranks, a.output_dir)
    print(f"\nbreakdowns, the phase and module of each peak: {a.output_dir}/memory-*.json")


def run_compare(a):
    """gpu-check.md: per configuration, the measured peak (max_memory_allocated) and time against
    the prediction; a ratio far from 1 is what the simulator cannot see, or a bug in it."""
    from infra.checks import check_output_dir

    out = Path(a.output_dir)
    check_output_dir(out)  # read from, and gpu-check.md written into
    rows = []
    for measured_path in sorted(out.glob("speed-*.json")):
        predicted_path = out / measured_path.name.replace("speed-", "memory-", 1)
        if not predicted_path.exists():
            continue
        m, p = (json.loads(f.read_text()) for f in (measured_path, predicted_path))
        if m["step_peak_gb"] is None:  # measured on a CPU: no GPU memory to compare
            continue
        cells = [m["config"], "yes" if m["low_memory"] else "no", m["device"]]
        for what in ("step", "generation"):
            meas, pred = m[f"{what}_peak_gb"], p[what]["peak_gib"]
            cells += [f"{meas:.2f}", f"{pred:.2f}", f"{meas / pred:.2f}"]
        cells += [f"{m['step_s']:.2f}", f"{m['ratio']:.2f}", f"{p['flops_ratio']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        raise UserError(f"{out} holds no pair of GPU speed-*.json and memory-*.json; run benchmarks/gpu_check.sh "
                        "on a GPU machine")
    table = ("| config | low-memory | GPU | step GiB measured | predicted | measured / predicted | generation GiB "
             "measured | predicted | measured / predicted | step s | step / generation, time | FLOPs |\n|"
             + " --- |" * 12 + "\n" + "\n".join(rows) + "\n")
    atomic_write_text(out / "gpu-check.md", table)
    print(table + f"\nwrote {out}/gpu-check.md")
