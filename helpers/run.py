"""
A training run's bookkeeping, kept out of train.py's story, in one object, Run: its options checked (each
mistake in one line before any work), its folder (new, or resumed), the log, checkpoints, sample grids and
evaluations, a polite stop, the end. `st` below is train.py's Stage, `o` its TrainOptions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from diffusion import THRESHOLDING
import helpers.measures as measures
import helpers.options as options
from helpers.devices import autocast, mean_over_ranks, process_env
from helpers.files import atomic_save, find_weights, keep_history, load_torch_file, save_weights
from helpers.models import load_model_config
from helpers.pictures import plot_log, save_gif, save_levels_figure, save_matryoshka
from nested_unet import summary


def fail(msg):
    raise SystemExit(f"train.py: {msg}")


def parse_sizes(s: str) -> list[tuple[int, int]]:
    """--res "64,256" -> [(1, 64), (1, 256)]; video stages "64,16x64,16x256" -> frames x size."""
    try:
        return [tuple(int(u) for u in v.split("x")) if "x" in v else (1, int(v)) for v in s.split(",")]
    except ValueError:
        fail(f"--res {s}: expected sizes like 64,256 (or 64,16x64 for video: frames x size)")


def fmt(values) -> str:
    return ",".join(str(v) for v in values)


def fmt_size(size) -> str:                         # (frames, size) -> "16x64", or "64" for images
    return f"{size[0]}x{size[1]}" if size[0] > 1 else str(size[1])


def sample_prompts(o) -> list[str] | None:
    """--sample-prompts: a file of prompts, one per line, or prompts separated by |."""
    if o.sample_prompts is None:
        return None
    path = Path(o.sample_prompts)
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else o.sample_prompts.replace("|", "\n")
    except (OSError, UnicodeDecodeError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_args(o, world_size: int, cfg):
    """Every mistake we can see before training, each in one line: the flag, its value, what is expected."""
    options.check_options("train.py", o)
    options.check_device("train.py", o.device)
    if o.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            fail("--tensorboard needs the tensorboard package: pip install tensorboard")
    if o.sample_prompts is not None and not sample_prompts(o):
        fail(f"--sample-prompts {o.sample_prompts}: expected prompts separated by |, or a file of them")
    if o.name is not None and (not o.name.strip() or "/" in o.name or o.name in (".", "..")):
        fail(f"--name {o.name!r}: expected a folder name (no '/'), e.g. --name my-run")
    if o.loss_weights is not None and not any(o.loss_weights):
        fail(f"--loss-weights {fmt(o.loss_weights)}: at least one weight must be > 0")
    sizes = parse_sizes(o.res)
    if not (len(sizes) == len(o.steps) == len(o.batch)):
        fail(f"--res {o.res}, --steps {fmt(o.steps)} and --batch {fmt(o.batch)} must have "
             f"one entry per stage each (got {len(sizes)}, {len(o.steps)} and {len(o.batch)})")
    for lo, hi in zip(sizes, sizes[1:]):
        if hi == lo or any(h < l or h % l for h, l in zip(hi, lo)):
            fail(f"--res {o.res}: each resolution must be an integer multiple of the previous one, "
                 f"and larger ({fmt_size(hi)} / {fmt_size(lo)} is not)")
    levels, names = cfg.level_sizes(), fmt(fmt_size(s) for s in cfg.level_sizes())
    if len(sizes) > len(levels):
        fail(f"--res {o.res} has {len(sizes)} stages, but {o.config} has only {len(levels)} levels ({names})")
    for s in sizes:
        if s not in levels:
            fail(f"--res {o.res}: {o.config} has no level of size {fmt_size(s)}; its levels are {names}")
    if any(b % (world_size * o.accum) for b in o.batch):
        fail(f"--batch {fmt(o.batch)}: each batch must be divisible by the number of processes "
             f"({world_size}) times --accum ({o.accum})")
    if o.loss_weights is not None and len(o.loss_weights) != len(levels):
        fail(f"--loss-weights {fmt(o.loss_weights)}: expected one weight per level of the model, "
             f"lowest first ({len(levels)}: {names})")
    if o.channels_last in (True, "on") and cfg.frames > 1:
        fail("--channels-last on is for images (4-D tensors); a video model's inputs are 5-D")
    if o.eval_every and (o.streaming or cfg.frames > 1):
        fail("--eval-every measures images against a local data set's real images; for a streamed "
             "data set or a video model, evaluate the saved model afterwards (python -m tools.evaluate)")


# What a resumed run may change: its stages' lengths (more stages of the same config), the learning rate,
# logging, checkpoints, grids, thresholding, evaluations, where and how fast it runs; the rest is the run's.
MAY_CHANGE = {"steps", "res", "batch", "lr", "warmup", "log_every", "ckpt_every", "keep_checkpoints", "sample_every",
              "sample_steps", "sample_guidance", "sample_prompts", "thresholding", "no_samples", "eval_every",
              "eval_samples", "eval_real", "eval_steps", "tensorboard", "precision", "compile", "grad_ckpt"}
WHERE = {"resume", "out", "name"}                  # which run, not how it trains
HERE = ("device", "workers", "stop_after")         # this machine and this invocation's: never the saved ones


def check_extension(before, after, ckpt):
    """Stages may be added and lengthened, not changed where the run has been (steps taken, batches)."""
    old, new = parse_sizes(before.res), parse_sizes(after.res)
    if new[:len(old)] != old:
        fail(f"--resume: --res {after.res}: the run's stages are {before.res}; "
             f"stages may only be added after them")
    stage, step, done = ckpt["stage"], ckpt["step"], int(np.sum(before.steps[:ckpt["stage"]]))
    if list(after.steps[:stage]) != list(before.steps[:stage]) or list(after.batch[:stage + 1]) != \
            list(before.batch[:stage + 1]):
        fail(f"--resume: --steps {fmt(after.steps)} --batch {fmt(after.batch)}: the run has finished its "
             f"first {stage} stage(s) with steps {fmt(before.steps[:stage])} and is in stage {stage + 1} "
             f"with batch {before.batch[stage]}; those stay (later stages may change)")
    if len(after.steps) > stage and done + after.steps[stage] < step:
        fail(f"--resume: --steps {fmt(after.steps)}: stage {stage + 1} has taken {step - done} steps already")


def choose_thresholding(o, full, init_meta: dict, is_main: bool) -> str:
    """The thresholding the run records: the one asked for, else --init-from's, else from the data:
    Imagen's (appendix C) lets at most 0.5% of pixels reach -1 or 1: black or white backgrounds turn grey."""
    if o.thresholding != "auto":
        return o.thresholding
    if "diffusion_config" in init_meta:
        return init_meta["diffusion_config"].get("thresholding", "imagen")
    images = getattr(full, "images", None)         # the data held in memory as uint8 (N, H, W, C)
    if images is None:                             # a stream, or a folder read lazily: the paper's
        return "imagen"
    sample = images[:: max(1, len(images) // 1000)]
    saturated = float(((sample == 0) | (sample == 255)).mean())
    reachable = 1 - THRESHOLDING["imagen"][0]     # the share of pixels above Imagen's percentile
    mode = "clip" if saturated > reachable else "imagen"
    if is_main:
        print(f"thresholding: {mode} ({saturated:.0%} of the data's pixels are black or white; Imagen's "
              f"dynamic thresholding lets {reachable:.1%} reach them; --thresholding chooses)")
    return mode


def rng_states() -> dict:
    """Every generator's state as plain data (a checkpoint loads with weights_only): numpy's keys as int64."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s: dict):
    torch.set_rng_state(s["torch"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# --- The run ---------------------------------------------------------------------------------
class Run:
    """A run: `Run.open`, `start`, then per step `after_step`, per grown stage `new_stage`, and `finish`."""
    def __init__(self, o, ckpt: dict | None, run_dir: Path | None, changes: dict):
        self.options, self.ckpt, self.dir, self.changes = o, ckpt, run_dir, changes
        self.config, self.stopping = None, threading.Event()   # set by SIGTERM (out of time) or --stop-after

    @classmethod
    def open(cls, o, given: set, defaults) -> Run:
        """The options `o` of a command line that gave those in `given` (`defaults`: an empty one's) -> a run,
        new or resumed (its options hold but for those given in MAY_CHANGE), with its config, all checked."""
        path = None
        if o.resume == "auto":                     # the named run, or the newest: if it has a checkpoint
            with contextlib.suppress(FileNotFoundError):
                path = find_weights(Path(o.out) / o.name if o.name else None, o.out, name="checkpoint.pt")
        elif o.resume is not None:
            try:
                path = find_weights(None if o.resume == "latest" else o.resume, o.out, name="checkpoint.pt",
                                    flag="--resume")
            except FileNotFoundError as e:
                fail(f"--resume: {e}")
        if path is None:                           # a new run: never in the folder of an existing one
            run_dir = Path(o.out) / o.name if o.name else None
            if run_dir is not None and any((run_dir / f).exists() for f in ("checkpoint.pt", "log.jsonl")):
                fail(f"--name {o.name}: {run_dir} holds a run already; resume it with --resume {run_dir} "
                     f"(or --resume auto), or choose another --name")
            run = cls(o, None, None, {})
        else:
            try:
                ckpt = load_torch_file(path)
            except ValueError as e:
                fail(f"--resume {path}: {e}")
            fields = {f.name for f in dataclasses.fields(o)}               # newer options take their defaults
            base = dataclasses.replace(defaults, **{k: v for k, v in ckpt["args"].items() if k in fields})
            fixed = sorted(k for k in given - MAY_CHANGE - WHERE - set(HERE) if getattr(o, k) != getattr(base, k))
            if fixed:
                shown = ", ".join(f"--{k.replace('_', '-')} {getattr(base, k)} (given: {getattr(o, k)})" for k in fixed)
                fail(f"--resume: a run keeps its {shown}; start a new run (another --name) to change them")
            changes = {k: [getattr(base, k), getattr(o, k)] for k in sorted(given & MAY_CHANGE)
                       if getattr(o, k) != getattr(base, k)}
            o = dataclasses.replace(base, **{k: new for k, (_, new) in changes.items()}, resume=o.resume,
                                    **{k: getattr(o, k) for k in HERE})
            check_extension(base, o, ckpt)                 # stages: added or lengthened only
            # A checkpoint of the history (checkpoints/step*.pt) resumes its run folder, from its step.
            run = cls(o, ckpt, path.parent.parent if path.parent.name == "checkpoints" else path.parent, changes)
        try:
            run.config = load_model_config(run.options.config)   # the whole model; stages train truncations
        except ValueError as e:
            fail(e)
        check_args(run.options, process_env()[1], run.config)
        return run

    def position(self) -> tuple[int, int]:
        return (self.ckpt["stage"], self.ckpt["step"]) if self.ckpt else (0, 0)

    def restore(self, st, rank: int):
        for part, obj in (("model", st.model), ("ema", st.ema), ("optimizer", st.opt), ("scheduler", st.sched),
                          ("scaler", st.scaler)):
            if obj is not None and self.ckpt.get(part) is not None:
                obj.load_state_dict(self.ckpt[part])
        set_rng_states(self.ckpt["rng"][min(rank, len(self.ckpt["rng"]) - 1)])   # extra ranks: the last's

    def start(self, st, data, meta: dict, rank: int, world: int, device, precision: str):
        """The run folder, the log, the main process's grids and evaluations, the progress bar."""
        o, self.world, self.device, self.is_main, self.meta = self.options, world, device, rank == 0, meta
        self.dir = self.dir or Path(o.out) / (o.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(o.data).name}")
        self.sizes, self.ends = parse_sizes(o.res), np.cumsum(o.steps).tolist()   # stage s ends at step ends[s]
        log_path = self.dir / "log.jsonl"
        if self.is_main:
            (self.dir / "samples").mkdir(parents=True, exist_ok=True)
            (self.dir / "options.json").write_text(json.dumps(dataclasses.asdict(o), indent=2))
            if self.ckpt and log_path.exists():    # cut back to the checkpoint: what followed is logged again
                rows = [r for r in log_path.read_text().splitlines() if r.strip()]
                log_path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= self.ckpt["step"]))
            if self.changes:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": self.ckpt["step"], "resumed_with": self.changes}) + "\n")
                print("resumed with " + ", ".join(f"--{k.replace('_', '-')} {old} -> {new}"
                                                  for k, (old, new) in self.changes.items()))
        self.log = Log(self.dir, self.ckpt, len(st.model.resolutions), device, self.is_main, o.tensorboard)
        self.grid = self.evaluate = None                # the main process's only
        if self.is_main and not o.no_samples:
            try:
                self.grid = SampleGrid(data, device, o.sample_steps, o.sample_guidance, sample_prompts(o))
            except ValueError as e:
                fail(f"--sample-prompts: {e}")
        if self.is_main and o.eval_every:
            self.evaluate = measures.DuringTraining(
                o.data, self.sizes[-1][1], o.eval_real, data.cond_kind, data.class_names,
                None if o.streaming else getattr(data.full, "captions", None), data.encoder, o.eval_samples,
                o.eval_steps, device)
        signal.signal(signal.SIGTERM, lambda *a: self.stopping.set())     # a polite stop, with a checkpoint
        self.steps_run, self.autocast = 0, autocast(device, precision)   # this invocation's, for --stop-after
        first, step = self.position()
        if self.is_main:
            print(summary(st.model, f"{o.config} (stage {first + 1} of {len(self.sizes)})") +
                  f"\nrun folder: {self.dir}   data: {o.data} ({data.cond_kind}-conditional)   device: {device} x "
                  f"{world}   precision: {precision}{' (auto)' if o.precision == 'auto' else ''}")
        self.bar = tqdm(total=self.ends[-1], initial=step, disable=not self.is_main, dynamic_ncols=True)

    def after_step(self, st, step: int):
        """After step `step` (from 1): a log row (losses on the bar), grids, evaluations, a checkpoint."""
        o, end = self.options, self.ends[st.index]
        self.steps_run += 1
        self.bar.update(1)
        if step % o.log_every == 0 or step == end:
            row = self.log.row(step, st, o)
            self.bar.set_postfix_str(" ".join(f"{k[5:]}px {v:.4f}" for k, v in row.items() if k.startswith("loss_")))
        self.side_work(st, step)
        if self.steps_run == o.stop_after and step < self.ends[-1]:
            self.stopping.set()
        # A checkpoint every --ckpt-every steps, when stopping, at the end (an earlier stage's: new_stage).
        if step < end and (step % o.ckpt_every == 0 or self.stopping.is_set()) or step == self.ends[-1]:
            self.save(st, step)

    def new_stage(self, st, step: int):
        """A grown model: longer rows of losses (the next marks the stage's start), and a checkpoint."""
        self.log.sums = torch.zeros(len(st.model.resolutions) + 1, device=self.log.sums.device)
        self.log.stage_start = True
        if self.is_main:
            self.bar.write(f"stage {st.index + 1}: grown to {fmt(fmt_size(s) for s in st.model.config.level_sizes())}\n"
                           + summary(st.model))
        self.save(st, step)

    def side_work(self, st, step: int):
        """Grids and evaluations when due (final stage), left out of the training time."""
        grids = self.grid is not None and (step % self.options.sample_every == 0 or step in self.ends)
        evals = self.evaluate is not None and self.sizes[st.index] == self.sizes[-1] and \
            (step % self.options.eval_every == 0 or step == self.ends[-1])
        if not (grids or evals):
            return
        if self.device.type == "cuda":                 # the step's queued work counts as training
            torch.cuda.synchronize(self.device)
        t_aside = time.perf_counter()
        if grids:
            picture = self.grid.save(st.ema, st.diffusion, self.dir / "samples" / f"step{step:07d}", self.autocast)
            if self.log.tensorboard is not None:
                from PIL import Image
                self.log.tensorboard.add_image("samples", np.asarray(Image.open(picture).convert("RGB")), step,
                                               dataformats="HWC")
            plot_log(self.log.path, self.dir / "loss.png")
        if evals:
            row = self.evaluate(st.ema, st.diffusion, step, self.log.train_time + t_aside - self.log.t0, self.autocast)
            self.log.write(row)
            said = (f"{k} {v:.4g}" for k, v in row.items() if k.startswith("eval_"))
            self.bar.write(f"step {step}: " + ", ".join(said))
        self.log.t0 += time.perf_counter() - t_aside      # not training time

    def save(self, st, step: int):
        """The whole state to checkpoint.pt (atomic, kept in checkpoints/), EMA weights to ema.safetensors."""
        bad = self.log.nonfinite | ~torch.stack([torch.isfinite(p).all() for p in st.model.parameters()]).all()
        if mean_over_ranks(bad.float()).item() > 0:    # diverged, on any rank: never saved
            raise FloatingPointError
        states = [None] * self.world if dist.is_initialized() else [rng_states()]    # every rank's
        if dist.is_initialized():
            dist.all_gather_object(states, rng_states())
        # This stage's configs: a file saved before the last stage holds a smaller model, and says so.
        meta = {**self.meta, "model_config": st.ema.config.to_dict(), "diffusion_config": vars(st.diffusion.config)}
        if self.is_main:
            atomic_save({"model": st.model.state_dict(), "ema": st.ema.state_dict(), "optimizer": st.opt.state_dict(),
                         "scheduler": st.sched.state_dict(), "step": step, "stage": st.index, "rng": states,
                         "data": st.batches.state(), "args": dataclasses.asdict(self.options), "meta": meta,
                         "scaler": st.scaler.state_dict() if st.scaler else None,
                         "train_time": self.log.train_time}, self.dir / "checkpoint.pt")
            keep_history(self.dir, step, set(self.ends), self.options.keep_checkpoints)
            save_weights(self.dir / "ema.safetensors", st.ema.state_dict(), {**meta, "step": step})

    def diverged(self, step: int):
        if self.is_main:
            print(f"\ntrain.py: the loss is NaN or infinite at step {step}: stopping. The last good checkpoint "
                  f"({self.dir / 'checkpoint.pt'}) is kept; try a lower --lr or a smaller --clip.", file=sys.stderr)
        sys.exit(1)

    def finish(self, step: int, cond_kind: str):
        self.bar.close()
        if self.is_main:
            plot_log(self.dir / "log.jsonl", self.dir / "loss.png")
            if step < self.ends[-1]:
                print(f"\nstopped at step {step}; saved. Resume with: python train.py --resume {self.dir}")
            else:
                what = {"label": " --label <class>", "text": " \"a prompt\""}.get(cond_kind, "")
                print(f"done: {self.dir}/ema.safetensors (sample with: python sample.py --ckpt {self.dir}{what})")
        if dist.is_initialized():
            dist.destroy_process_group()


class Log:
    """Losses summed on the device (a .item() per step would wait for the GPU), times, rows of log.jsonl."""
    def __init__(self, run_dir: Path, ckpt: dict | None, levels: int, device, is_main: bool, tensorboard: bool):
        self.path, self.is_main, self.tensorboard = run_dir / "log.jsonl", is_main, None
        self.train_time = (ckpt or {}).get("train_time", 0.0)
        if tensorboard and is_main:               # a resumed run purges what was written after its checkpoint
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=(ckpt or {}).get("step") or None)
        self.reset(levels, device)
        self.stage_start = ckpt is None            # a new run's first row marks the stage's start

    def reset(self, levels: int, device):
        self.sums = torch.zeros(levels + 1, device=device)   # per level, then the total
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.steps, self.wait, self.t0, self.stage_start = 0, 0.0, time.perf_counter(), False

    def write(self, row: dict):
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for k, v in row.items():
                if k not in ("step", "stage", "stage_start") and isinstance(v, (int, float)):
                    group = "loss" if k.startswith("loss") or k == "mse_sum" else "eval" if k.startswith("eval") \
                        else "train"
                    self.tensorboard.add_scalar(f"{group}/{k}", v, row["step"])
            self.tensorboard.flush()

    def row(self, step: int, stage, o) -> dict:
        """The mean losses since the last row (over ranks: an interval's one sync), speed, data wait."""
        *losses, total = (mean_over_ranks(self.sums) / self.steps).tolist()
        if not all(np.isfinite(losses)) or self.nonfinite.item():       # NaN or infinity
            raise FloatingPointError
        dt = time.perf_counter() - self.t0
        self.train_time += dt
        sizes = stage.model.config.level_sizes()
        row = {"step": step, "stage": stage.index + 1, "time": self.train_time, "mse_sum": sum(losses),
               "loss": total, "lr": stage.sched.get_last_lr()[0], "steps_per_s": self.steps / dt,
               "images_per_s": self.steps * o.batch[stage.index] / dt, "data_wait": self.wait / dt,
               "skipped": stage.batches.skipped, **{f"loss_{fmt_size(z)}": v for z, v in zip(sizes, losses)},
               **({"stage_start": step - self.steps} if self.stage_start else {})}  # the stage's first step
        self.reset(len(sizes), self.sums.device)
        self.write(row)
        return row


class SampleGrid:
    """A run's grids: EMA, guided DDIM, a fixed seed and condition, so that grids differ by training alone."""
    def __init__(self, data, device, steps: int, guidance: float, prompts: list[str] | None = None, n=8):
        self.captions, self.cond, self.steps, self.guidance, self.device = None, {}, steps, guidance, device
        if data.cond_kind == "text":
            pool = getattr(data.full, "captions", None) or ["a smiling face", "a red heart", "a cat", "a rocket"]
            self.captions = prompts or ([pool[i] for i in np.random.default_rng(0).choice(len(pool), n, replace=False)]
                                        if len(pool) >= n else pool)
            self.cond = data.encoder.condition(self.captions, device)
        elif data.cond_kind == "label":
            lowered, labels = [c.lower() for c in data.class_names], torch.arange(n) % len(data.class_names)
            if prompts:
                bad = [p for p in prompts if p.lower() not in lowered and not (p.isdigit() and int(p) < len(lowered))]
                if bad:
                    raise ValueError(f"{bad[0]!r} is not a class of this data set: {', '.join(data.class_names)}")
                labels = torch.tensor([lowered.index(p.lower()) if p.lower() in lowered else int(p) for p in prompts])
            self.captions, self.cond = [data.class_names[i] for i in labels], {"label": labels.to(device)}
        self.n = len(self.captions or [0] * n)

    def save(self, model, diffusion, path: Path, autocast) -> Path:
        """The grid of this step at `path` (.png; for video also .gif). Returns the picture's path."""
        with autocast:
            levels = diffusion.sample(model, self.cond, batch_size=self.n, sampler="ddim",
                                      num_inference_steps=self.steps, guidance_scale=self.guidance,
                                      generator=torch.Generator(self.device).manual_seed(0))
        if model.config.frames > 1:
            save_levels_figure(levels, path.with_suffix(".png"))
            save_gif(levels[-1], path.with_suffix(".gif"))
        else:
            save_matryoshka(levels, path.with_suffix(".png"), captions=self.captions)
        return path.with_suffix(".png")
