"""A training run's bookkeeping, kept out of train.py's loop: the folder, the logs, the videos, the stops.

`Run` owns what happens around the optimizer steps: the start-up banner, config.json, the
before/after videos and the held-out evaluations, one metrics.csv row a step, the count of
non-finite steps in a row, the checkpoint cadence, Ctrl-C and SIGTERM, and the end of the run.
"""
import json
from dataclasses import asdict

import torch
from tqdm import tqdm

from infra.cli import UserError, stop_signals
from infra.distributed import all_gather
from infra.files import atomic_write_text
from infra.folder import check_run_folder, claim, remove_run_files
from infra.runlog import (METRICS, eval_columns, eval_summary, list_checkpoints, metrics_text, plot_rewards, restore,
                          save_checkpoint, tidy_run_folder)
from infra.trackers import open_tracker
from infra.video import plot_before_after, tile, write_strip, write_video
from infra.frames import frames_scored
from infra.setup import is_out_of_memory
from infra.sharding import whole_lora
from lora import save_lora
from vader import generate


def describe(spec):
    """A registry entry in one line, for the start-up banner."""
    source = spec.source or "built in, random weights"
    if spec.adapter:
        source += f" + motion adapter {spec.adapter}"
    scheduler = ", ".join(f"{k}={v}" for k, v in spec.scheduler.items()) or "the source's own"
    recipe = ", ".join(f"{k}={v}" for k, v in spec.recipe.items()) or "the paper's"
    return (f"{spec.family}: {source} | scheduler: {scheduler} | LoRA targets {', '.join(spec.lora_targets)} "
            f"| training defaults: {recipe}")


def print_banner(cfg, model, dtype, device, world, prompts, held_out, params, spread=False):
    """The derived numbers of the run, printed once at start-up."""
    print(f"model {cfg.model}: {cfg.frames} frames of {cfg.height}x{cfg.width}, {cfg.num_steps} sampler steps, "
          f"guidance {cfg.guidance} | base {str(dtype).replace('torch.', '')}, LoRA float32 | device {device}"
          + (f" x {world} processes" if world > 1 else ""))
    print(f"registry entry {describe(model.spec)}" + (" | --low-memory" if cfg.low_memory else ""))
    experts = model.denoiser if model.denoiser is not model.unet else None
    if experts is not None:  # Wan2.2 A14B (wan.TwoExperts)
        high = experts.steps(model.schedule, cfg.num_steps)
        print(f"two experts: steps 1-{high} (t >= {experts.boundary:g}) the high-noise one, guidance "
              f"{experts.guidance}, no LoRA, no gradients; steps {high + 1}-{cfg.num_steps} the low-noise "
              f"one, guidance {cfg.guidance}, with the LoRA")
    pool = cfg.frames if spread else model.prefix_frames(cfg.frames, cfg.decode_frames)
    print(f"reward {cfg.reward} | {len(prompts)} prompts ({len(held_out)} held out) | "
          f"{cfg.batch_size * cfg.grad_accum * world} videos per optimizer step ({cfg.batch_size} x "
          f"{cfg.grad_accum} accumulated x {world} processes) | grad through the last "
          f"{'1..' if cfg.random_grad_steps else ''}{cfg.grad_steps} of {cfg.num_steps} steps | "
          f"{cfg.decode_frames} of {cfg.frames} frames decoded"
          + (" (spread over the clip, at the reward's frame rate)" if spread else "")
          + (f" (from the first {pool}: the VAE decodes a frame only after those before it)" if pool < cfg.frames else ""))
    print(f"LoRA rank {cfg.lora_rank}: {sum(p.numel() for p in params):,} trainable parameters | lr {cfg.lr} | "
          f"output {cfg.output_dir}")


def make_videos(model, cfg, prompts, cond, uncond, path_stem, n, reward_fn=None, eval_fns=None, write=True):
    """Generate n videos, video i of prompt i (cycling through them) with seed i, tiled in rows of
    at most 8; with a reward, returns the held-out columns: its mean and the evaluation rewards'.
    Without `write` nothing is written (the other processes of a sharded run, which must take
    part in every pass of the sharded denoiser)."""
    idx = torch.arange(n) % len(prompts)
    video = generate(model, cond[idx.to(cond.device)].to(model.device), uncond, cfg.frames, cfg.height, cfg.width,
                     cfg.num_steps, cfg.guidance, seed=0, low_memory=cfg.low_memory)  # (n, F, 3, H, W)
    if write:
        write_video(tile(video, per_row=8), path_stem, model.spec.fps, rows=-(-n // 8))  # (F, 3, rows*H, 8*W)
    if reward_fn is None and write:  # before/after: also a still of every frame, for before_after.png
        write_strip(video, path_stem.with_suffix(".png"))
    if reward_fn is not None:
        names = [prompts[i] for i in idx]
        with torch.no_grad():
            seen = frames_scored(reward_fn, video, cfg.decode_frames, model.spec.fps)
            return {"eval_reward": reward_fn(seen, names).float().mean().item(),
                    **eval_columns(eval_fns, video, names, model.spec.fps)}


class Run:
    """The run folder and everything written into it, on the main process; the other processes
    only take part in the all-gathers, and, under --shard (`together`), in everything that runs
    the sharded denoiser or writes a checkpoint: videos, evaluations, saves.

    Used as `with Run(...) as run:` from before the models load to the end: entering claims the
    folder (infra/folder.py) and catches Ctrl-C and SIGTERM, so a stop at any moment ends at the
    next safe point with the folder resumable (a checkpoint) or, before anything was written,
    as it was.
    """

    def __init__(self, cfg, out, rank, world, device):
        self.cfg, self.out, self.world, self.device = cfg, out, world, device
        self.main, self.rank = rank == 0, rank
        self.together = cfg.shard and world > 1
        self.rows, self.bad_in_a_row, self.stop, self.bar = [], 0, [], None
        self.began, self.saved, self.lock = False, None, None

    def __enter__(self):
        if self.main:
            self.lock = claim(self.out)
            try:  # under the lock, look again: another run may have just written here
                self.state = check_run_folder(self.out, self.cfg.resume, self.cfg.overwrite)
            except UserError:
                self.lock.release(began=False)
                raise
        self.signals = stop_signals()
        self.stop = self.signals.__enter__()
        return self

    def __exit__(self, *exc):
        self.signals.__exit__(*exc)
        oom = exc[1] is not None and is_out_of_memory(exc[1])
        if self.bar is not None:
            self.bar.leave = self.bar.leave and not oom  # on a terminal the bar's line clears: the error is the line left
            self.bar.close()
        if getattr(self, "tracker", None) is not None:  # --report-to: closed however the run ends
            self.tracker.close(failed=exc[1] is not None)
        if self.lock is not None:
            self.lock.release(self.began)
        if oom:
            raise self.out_of_memory() from None

    def out_of_memory(self):
        """A failed allocation anywhere in the run (loading, the videos, a step; a GPU's or the CPU's),
        as one line that says where, what to lower, and how to go on. The lock is released by then,
        and a run that saved no checkpoint starts again with the same command (check_run_folder)."""
        from infra.setup import out_of_memory

        steps = sum(1 for r in self.rows if r.get("reward_mean", "") != "")
        where = ("while loading" if not self.began else
                 f"after step {self.rows[-1]['step']}" if steps else "before the first step finished")
        saved = list_checkpoints(self.out) if self.main and self.began else []
        if saved:
            then = f"then --resume {self.out} continues from its checkpoint {saved[-1].name}"
        elif self.began:
            then = "then the same command starts the run again (it saved no checkpoint)"
        else:
            then = "nothing was written"
        return out_of_memory(self.cfg, self.device, where, then)

    def signal(self):
        """The signal that stopped the run, as this process saw it."""
        return self.stop[0] if self.stop else "a signal to another process"

    def stopped(self):
        """True on every process when a signal reached any of them."""
        return bool(all_gather(torch.tensor([float(bool(self.stop))], device=self.device), self.world).max())

    def start(self, model, optimizer, generator, videos, lora_params, banner):
        """Restore a resumed run's state, write config.json, print the banner, make the before-videos
        and the step-0 evaluation. `videos(name, n, scored)` generates and writes n videos. Returns the step.
        A signal that came while the models loaded ends the run here, before anything is written."""
        self.model, self.optimizer, self.generator, self.videos = model, optimizer, generator, videos
        if self.stopped():
            return 0
        self.began = True
        if self.main:
            if self.state:
                print(f"{self.out}: " + ("replacing the run there (--overwrite)" if self.state == "overwrite" else
                                         "starting again the run there, which stopped before its first checkpoint"))
                remove_run_files(self.out)
            tidy_run_folder(self.out)
        step, self.rows = restore(self.cfg.resume, self.cfg.lr, model.unet, optimizer, generator, self.cfg.shard)
        self.saved = step if self.cfg.resume else None
        self.config_text = json.dumps(asdict(self.cfg), indent=2) + "\n"
        self.tracker = None
        if self.main:
            atomic_write_text(self.out / "config.json", self.config_text)
            self.tracker = open_tracker(self.cfg, self.out, step)
            if self.tracker is not None:  # every clip written into videos/ goes to the tracker too
                self.videos = self.tracker.videos(videos)
            banner(lora_params)
        if self.main or self.together:
            if not self.main_says((self.out / "videos" / "before.mp4").exists()):
                self.videos("before", self.cfg.num_videos, False)
            if not self.rows and self.cfg.eval_every and not (self.stopped() if self.together else self.stop):
                self.rows.append({**dict.fromkeys(METRICS, ""), "step": 0, **self.evaluate(0)})
                if self.tracker:
                    self.tracker(self.rows[-1])
        self.bar = tqdm(total=self.cfg.max_steps, initial=step, desc="training", unit="step", disable=not self.main)
        return step

    def main_says(self, flag):
        """The main process's `flag` on every process that runs together (only the main sees the folder)."""
        if not self.together:
            return flag
        return bool(all_gather(torch.tensor([float(flag)], device=self.device), self.world)[0])

    def evaluate(self, step):
        """Held-out rewards at fixed seeds, with their videos, every --eval-every steps and at the last
        step: {metrics.csv column: value}, or {} when this step has no evaluation."""
        cfg = self.cfg
        if not ((self.main or self.together) and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps)):
            return {}
        return self.videos(f"eval-step-{step:06d}", cfg.eval_videos, True) or {}

    def checkpoint_due(self, step):
        """Whether --save-every asks for a checkpoint after this step."""
        return bool(self.cfg.save_every and step % self.cfg.save_every == 0)

    def save_checkpoint(self, step):
        """checkpoints/step-N (infra/runlog.py), on every process under --shard."""
        if self.main or self.cfg.shard:
            save_checkpoint(self.out, step, self.model.unet, self.optimizer, self.generator, self.config_text,
                            metrics_text(self.rows), self.cfg.keep_checkpoints, self.model.lora_prefix,
                            self.model.base_id, (self.rank, self.world) if self.cfg.shard else None)
        self.saved = step

    def record(self, step, loss, rewards, grad_norm, k, finite, seconds, scores):
        """After a step: its metrics row (with the evaluation's `scores`) and the non-finite count; a run
        of --max-bad-steps non-finite steps stops with a checkpoint."""
        cfg = self.cfg
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        r = all_gather(rewards.to(self.device), self.world)
        row = dict(step=step, reward_mean=r.mean().item(), reward_std=r.std(unbiased=False).item(), loss=loss,
                   lr=cfg.lr, grad_norm=grad_norm, grad_steps=k, skipped=int(not finite), eval_reward="")
        self.rows.append({**row, **scores, "seconds": round(seconds, 3)})
        if self.main:
            atomic_write_text(self.out / "metrics.csv", metrics_text(self.rows))
            if self.tracker:
                self.tracker(self.rows[-1])
            post = dict(reward=f"{row['reward_mean']:.4f}", loss=f"{row['loss']:.4f}")
            if self.device.startswith("cuda"):
                post["peak_GB"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"
            self.bar.set_postfix(post)
            self.bar.update(1)
        if self.bad_in_a_row >= cfg.max_bad_steps:
            self.save_checkpoint(step)
            raise UserError(f"{self.bad_in_a_row} steps in a row had a non-finite loss, gradient or updated LoRA "
                            f"weight (up to step {step}); their updates were skipped. Lower --lr or check the reward; "
                            "resume with --resume")
        if not finite:
            tqdm.write(f"step {step}: non-finite loss, gradient or update, skipped ({self.bad_in_a_row} in a row)")

    def save_lora(self, step):
        """The end of training: the last checkpoint, lora.safetensors and reward_curve.png. Returns
        whether this process goes on to the after-videos (not after a stop: then it says how to resume)."""
        cfg, out = self.cfg, self.out
        if self.bar is not None:
            self.bar.close()
        if not self.began:
            if self.main:
                print(f"stopped by {self.signal()} while loading, before the run began; nothing was written. "
                      "Run the same command to start it.")
            return False
        if self.saved != step:
            self.save_checkpoint(step)
        stopped = self.stopped()
        if not (self.main or self.together):
            return False
        trained = [r for r in self.rows if r["reward_mean"] != ""]
        if trained:  # gathered from every process under --shard, written by the main one
            tensors = whole_lora(self.model.unet, self.model.lora_prefix)
            if self.main:
                save_lora(self.model.unet, out / "lora.safetensors", self.model.lora_prefix, self.model.base_id,
                          tensors=tensors)
                if self.model.lora_prefix == "transformer.":  # Wan: also the file ComfyUI loads (infra/comfyui.py)
                    from infra.comfyui import write_comfyui_lora

                    write_comfyui_lora(out / "lora.safetensors", out / "lora_comfyui.safetensors")
                plot_rewards(out, self.rows, cfg.reward)
        if stopped and self.main:
            print(f"stopped by {self.signal()} after step {step}; checkpoint saved. Continue with: "
                  f"python train.py --resume {out}")
        return not stopped

    def summary(self, step, captions):
        """The before/after picture (`captions`: the prompts of the before/after videos) and the run in
        a few lines, on the main process."""
        out = self.out
        if not self.main:
            return
        trained = [r for r in self.rows if r["reward_mean"] != ""]
        if (out / "videos" / "before.png").exists():  # a run resumed from an older version may lack it
            plot_before_after(out / "videos", captions, step)
        print(f"done: training reward {trained[0]['reward_mean']:.4f} (step {trained[0]['step']}) -> "
              f"{trained[-1]['reward_mean']:.4f} (step {step}); wrote {out}/lora.safetensors, metrics.csv, "
              "reward_curve.png, videos/before_after.png, videos/before|after.mp4")
        if self.model.denoiser is not self.model.unet:  # Wan2.2 A14B
            print(f"the LoRA is the low-noise expert's; in diffusers: "
                  f"pipe.load_lora_weights({str(out / 'lora.safetensors')!r}, load_into_transformer_2=True)")
        for line in eval_summary(self.rows):
            print(line)
