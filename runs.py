"""
A training run's plumbing, kept out of the training story (train.py): its options checked
(each mistake said in one line before any work), its model config found, its folder opened
(new, or resumed with what a resume may change), its data set up (the data set, what it
conditions on, the frozen text encoder), --init-from's model, the thresholding and metadata it
records for sampling, its batches (each rank's share of the data, resumed at the sample where
it stopped; a stream split over ranks and loader workers), the log of its losses and speed, its
checkpoints, the sample grids and evaluations made along the way, and what to do when it ends.

A run folder holds options.json, log.jsonl (a row every --log-every steps), loss.png,
samples/, checkpoint.pt (the whole state, written atomically), checkpoints/ (the last few and
every stage's last) and ema.safetensors (the EMA weights with what sample.py needs).

`st` below is train.py's Stage (a stage's model, EMA, optimizer, schedule, diffusion process
and batches) and `o` its TrainOptions.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

import data
import metrics
import pipeline
import utils
import video
from diffusion import THRESHOLDING
from nested_unet import PRESETS, NestedUNetConfig, preset

# ---------------------------------------------------------------------------------------
# The options checked: the stages (--res 64,256; video: 64,16x64), the config, the rest
# ---------------------------------------------------------------------------------------

def parse_sizes(s: str) -> list[tuple[int, int]]:
    """--res "64,256" -> [(1, 64), (1, 256)]; video stages "64,16x64,16x256" -> frames x size."""
    try:
        return [tuple(int(u) for u in v.split("x")) if "x" in v else (1, int(v)) for v in s.split(",")]
    except ValueError:
        raise SystemExit(f"train.py: --res {s}: expected sizes like 64,256 (or 64,16x64 for video: frames x size)")


def fmt(values) -> str:
    return ",".join(str(v) for v in values)


def fmt_size(size) -> str:
    frames, res = size
    return f"{frames}x{res}" if frames > 1 else str(res)


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


def load_model_config(name: str) -> NestedUNetConfig:
    if name.endswith(".json"):
        # A config file as `NestedUNetConfig.to_dict()` writes it (inner levels nested).
        try:
            return NestedUNetConfig(**json.loads(Path(name).read_text()))
        except OSError as e:
            raise SystemExit(f"train.py: --config {name}: cannot read it ({e.strerror})")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SystemExit(f"train.py: --config {name}: not valid JSON ({e})")
        except (TypeError, ValueError) as e:           # unknown keys, or values the config refuses
            raise SystemExit(f"train.py: --config {name}: not a NestedUNet config: {e}")
    if name in video.VIDEO_PRESETS:
        return video.preset(name)
    if name not in PRESETS:
        raise SystemExit(f"train.py: --config {name}: not a JSON file and not a preset; the presets are "
                         f"{', '.join(list(PRESETS) + list(video.VIDEO_PRESETS))}")
    return preset(name)


def check_args(o, world_size: int, cfg: NestedUNetConfig):
    """Every mistake we can see before training starts, each said in one line that names the
    flag, its value and what is expected."""
    def fail(msg):
        raise SystemExit(f"train.py: {msg}")

    utils.check_options("train.py", o)
    utils.check_device("train.py", o.device)
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
    levels = cfg.level_sizes()
    names = fmt(fmt_size(s) for s in levels)
    if len(sizes) > len(levels):
        fail(f"--res {o.res} has {len(sizes)} stages, but {o.config} has only {len(levels)} levels ({names})")
    for s in sizes:
        if s not in levels:
            fail(f"--res {o.res}: {o.config} has no level of size {fmt_size(s)}; its levels are {names}")
    for b in o.batch:
        if b % (world_size * o.accum):
            fail(f"--batch {fmt(o.batch)}: each batch must be divisible by the number of processes "
                 f"({world_size}) times --accum ({o.accum})")
    if o.loss_weights is not None and len(o.loss_weights) != len(levels):
        fail(f"--loss-weights {fmt(o.loss_weights)}: expected one weight per level of the model, "
             f"lowest first ({len(levels)}: {names})")
    if o.channels_last in (True, "on") and cfg.frames > 1:
        fail("--channels-last on is for images (4-D tensors); a video model's inputs are 5-D")
    if o.eval_every and (o.streaming or cfg.frames > 1):
        fail("--eval-every measures images against a local data set's real images; for a streamed "
             "data set or a video model, evaluate the saved model afterwards (evaluate.py, video.py evaluate)")


# ---------------------------------------------------------------------------------------
# Opening a run: a new folder, or a run resumed where it stopped
# ---------------------------------------------------------------------------------------

# What a resumed run may change: how long its stages are (and more stages of the same
# config), the learning rate, logging, checkpoints, sample grids and thresholding,
# evaluations, where and how fast it runs. Everything else (the config, the data, the
# objective) is the run's.
MAY_CHANGE = {"steps", "res", "batch", "lr", "warmup", "log_every", "ckpt_every", "keep_checkpoints", "sample_every",
              "sample_steps", "sample_guidance", "sample_prompts", "thresholding", "no_samples", "eval_every",
              "eval_samples", "eval_real", "eval_steps", "tensorboard", "precision", "compile", "grad_ckpt"}
WHERE = {"resume", "out", "name"}                  # which run, not how it trains
HERE = ("device", "workers", "stop_after")         # this machine and this invocation's: never the saved ones


def open_run(o, given: set, defaults):
    """The options `o` parsed from a command line that gave the options named in `given`
    (`defaults`: what an empty command line gives) -> (options, checkpoint or None, run
    folder or None, changes made on resume). Resuming, the run's own options hold, except
    those given that may change (MAY_CHANGE), which are applied; a given option that may not
    change and differs is refused. --resume auto
    resumes the run named by --name (or the newest) if it has a checkpoint, and starts it
    otherwise: the same command launches and restarts a job. A new run never writes into
    the folder of an existing one."""
    path = None
    if o.resume == "auto":                         # the named run, or the newest: if it has a checkpoint
        try:
            path = pipeline.find_weights(Path(o.out) / o.name if o.name else None, o.out, name="checkpoint.pt")
        except FileNotFoundError:
            pass
    elif o.resume is not None:
        try:
            path = pipeline.find_weights(None if o.resume == "latest" else o.resume, o.out, name="checkpoint.pt",
                                         flag="--resume")
        except FileNotFoundError as e:
            raise SystemExit(f"train.py: --resume: {e}")
    if path is None:                               # a new run
        run_dir = Path(o.out) / o.name if o.name else None
        if run_dir is not None and any((run_dir / f).exists() for f in ("checkpoint.pt", "log.jsonl")):
            raise SystemExit(f"train.py: --name {o.name}: {run_dir} holds a run already; resume it with --resume "
                             f"{run_dir} (or --resume auto), or choose another --name")
        return o, None, None, {}
    try:
        ckpt = utils.load_torch_file(path)
    except ValueError as e:
        raise SystemExit(f"train.py: --resume: {e}")
    fields = {f.name for f in dataclasses.fields(o)}
    saved = {k: v for k, v in ckpt["args"].items() if k in fields}     # newer options take their defaults
    base = dataclasses.replace(defaults, **saved)
    fixed = sorted(k for k in given - MAY_CHANGE - WHERE - set(HERE) if getattr(o, k) != getattr(base, k))
    if fixed:
        shown = ", ".join(f"--{k.replace('_', '-')} {getattr(base, k)} (given: {getattr(o, k)})" for k in fixed)
        raise SystemExit(f"train.py: --resume: a run keeps its {shown}; start a new run (another --name) to change them")
    changes = {k: [getattr(base, k), getattr(o, k)] for k in sorted(given & MAY_CHANGE) if getattr(o, k) != getattr(base, k)}
    o = dataclasses.replace(base, **{k: new for k, (_, new) in changes.items()}, resume=o.resume,
                            **{k: getattr(o, k) for k in HERE})
    check_extension(base, o, ckpt)
    # A checkpoint of the history (checkpoints/step*.pt) resumes its run folder, from its step.
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return o, ckpt, run_dir, changes


def check_extension(before, after, ckpt):
    """Stages may be added (--res, --steps, --batch one entry longer each) and lengthened, but
    not changed where the run has been: a finished stage keeps its steps and batch, the
    current one its batch and at least the steps it has taken."""
    def fail(msg):
        raise SystemExit(f"train.py: --resume: {msg}")
    old, new = parse_sizes(before.res), parse_sizes(after.res)
    if new[:len(old)] != old:
        fail(f"--res {after.res}: the run's stages are {before.res}; stages may only be added after them")
    stage, step = ckpt["stage"], ckpt["step"]
    done = int(np.sum(before.steps[:stage]))
    if list(after.steps[:stage]) != list(before.steps[:stage]) or list(after.batch[:stage + 1]) != \
            list(before.batch[:stage + 1]):
        fail(f"--steps {fmt(after.steps)} --batch {fmt(after.batch)}: the run has finished its first {stage} "
             f"stage(s) with steps {fmt(before.steps[:stage])} and is in stage {stage + 1} with batch "
             f"{before.batch[stage]}; those stay (later stages may change)")
    if len(after.steps) > stage and done + after.steps[stage] < step:
        fail(f"--steps {fmt(after.steps)}: stage {stage + 1} has taken {step - done} steps already")


def make_run_dir(o, run_dir, ckpt, changes: dict, is_main: bool) -> Path:
    """The run folder, with samples/, options.json, and log.jsonl cut back to the checkpoint
    when resuming (what was logged after it will be logged again); the options a resume
    changed are recorded in the log, and said."""
    run_dir = run_dir or Path(o.out) / (o.name or f"{datetime.now():%Y%m%d-%H%M%S}-{Path(o.data).name}")
    log_path = run_dir / "log.jsonl"
    if is_main:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (run_dir / "options.json").write_text(json.dumps(dataclasses.asdict(o), indent=2))
        if ckpt and log_path.exists():
            rows = [r for r in log_path.read_text().splitlines() if r.strip()]
            log_path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= ckpt["step"]))
        if changes:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": ckpt["step"], "resumed_with": changes}) + "\n")
            print("resumed with " + ", ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changes.items()))
    return run_dir


def load_state(st, ckpt: dict, rank: int):
    """A resumed stage's whole saved state: weights, EMA, Adam's moments, the schedule's step,
    the gradient scaler, and this rank's RNG states (ranks beyond those saved take the last's)."""
    for part, obj in (("model", st.model), ("ema", st.ema), ("optimizer", st.opt), ("scheduler", st.sched),
                      ("scaler", st.scaler)):
        if obj is not None and ckpt.get(part) is not None:
            obj.load_state_dict(ckpt[part])
    utils.set_rng_states(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])


# ---------------------------------------------------------------------------------------
# A run's data, what --init-from brings, and what the run records for sampling
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunData:
    """What the data brings to a run: the data set of the current stage (and without
    --data-limit), what it is conditioned on, the class names, the frozen text encoder."""
    dataset: object
    full: object
    cond_kind: str
    class_names: list | None
    encoder: data.TextEncoder | None


def load_data(o, size, frames: int):
    """The data set of a stage, at its own top resolution (the paper's 64x64 stage is a 64x64
    training run): a map-style data set (first --data-limit images), or a stream."""
    if o.streaming:
        return HFStream(o.data, size[1], o.image_column, o.caption_column)
    try:
        ds = data.load_dataset(o.data, size[1], frames=frames, image_column=o.image_column,
                               caption_column=o.caption_column, label_column=o.label_column)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"train.py: {e}")
    return torch.utils.data.Subset(ds, range(min(o.data_limit, len(ds)))) if o.data_limit else ds


def setup_data(o, size, frames: int, world: int, device) -> RunData:
    dataset = load_data(o, size, frames)
    full = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    if o.streaming:
        has_text, class_names = True, None
    else:
        has_text = getattr(full, "captions", None) is not None or getattr(full, "caption_column", None)
        class_names = getattr(full, "class_names", None)
        if len(dataset) < o.batch[0] // world:
            raise SystemExit(f"train.py: --data {o.data} has {len(dataset)} images, fewer than one "
                             f"batch per process ({o.batch[0] // world})")
    cond_kind = o.cond if o.cond != "auto" else ("text" if has_text else "label" if class_names else "none")
    if cond_kind == "label" and not class_names:
        raise SystemExit(f"train.py: --cond label: {o.data} has no class labels")
    if cond_kind == "text" and not has_text:
        raise SystemExit(f"train.py: --cond text: {o.data} has no captions (--caption-column {o.caption_column})")
    # The text encoder is frozen (FLAN-T5 XL in the paper; MiniLM offline here): it runs
    # without gradients, and only the model's own projection of its features trains.
    encoder = None
    if cond_kind == "text":                        # a stream's captions do not come back: no cache
        try:
            encoder = data.TextEncoder(o.text_encoder, device=device, tokenization=o.text_tokenization,
                                       **({"cache_size": 0} if o.streaming else {}))
        except ValueError as e:
            raise SystemExit(f"train.py: {e}")
        if not o.streaming and full.captions is not None:
            encoder(list(dict.fromkeys(full.captions)))   # a fixed caption set: encode it once, now
    return RunData(dataset, full, cond_kind, class_names, encoder)


def choose_thresholding(o, full, init_meta: dict, is_main: bool) -> str:
    """The thresholding that the run records for sampling: the one asked for, else --init-from's
    run's, else chosen from the data. Imagen's dynamic thresholding (the paper's, appendix C)
    divides a sample by the 99.5th percentile of |x| whenever it exceeds 1, so at most 0.5% of
    its pixels can reach -1 or 1: data with black or white backgrounds (Fashion-MNIST's are
    black, the emoji's white) comes out grey: the guided Fashion-MNIST demo's samples are read as
    their class 96% of the time when clipped, 64% when so thresholded. Such data is clipped."""
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


def load_init(o, resuming: bool):
    """--init-from's model and metadata (a converted released model, or one of our runs);
    its text encoder and tokenisation become the run's, unless given."""
    init, meta = None, {}
    if o.init_from is not None and not resuming:
        try:
            init, meta = pipeline.load_weights(pipeline.find_weights(o.init_from))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"train.py: --init-from: {e}")
    o.text_encoder = o.text_encoder or meta.get("text_encoder") or "minilm"   # resolved once, and saved
    o.text_tokenization = o.text_tokenization or meta.get("text_tokenization", "hf")
    return init, meta


def run_meta(o, d: RunData, cfg_full: NestedUNetConfig, init_meta: dict) -> dict:
    """What sample.py needs besides the weights (a checkpoint adds its stage's configs)."""
    return {"cond": d.cond_kind, "text_encoder": o.text_encoder if d.encoder else None,
            "class_names": d.class_names, "text_tokenization": o.text_tokenization, "data": o.data, "res": o.res,
            "video": cfg_full.frames > 1, "data_limit": o.data_limit,
            **({"sampling": init_meta["sampling"]} if "sampling" in init_meta else {})}


# ---------------------------------------------------------------------------------------
# The batches of a run: one rank's share of the data, resumable where it stopped, or a stream
# ---------------------------------------------------------------------------------------

class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (a shuffled, disjoint share of the data set per rank, a new
    order every epoch), which can also start in the middle of an epoch: the data position of
    a resumed run."""

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int):
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


class Batches:
    """An endless stream of one rank's batches (of `batch` samples), whose position (epoch,
    samples seen in it) is saved in checkpoints and restored on resume: a map-style data set
    in a shuffled, disjoint share per rank (ResumableSampler), or an HFStream split over ranks.
    `skipped` counts the images that could not be decoded."""

    def __init__(self, dataset, batch: int, rank: int = 0, world: int = 1, seed: int = 0, workers: int = 0,
                 epoch: int = 0, pos: int = 0):
        self.dataset, self.batch, self.rank, self.world = dataset, batch, rank, world
        self.seed, self.workers = seed, workers
        self.epoch, self.pos, self.skipped = epoch, pos, 0
        self._start()

    def _start(self):
        workers = self.workers
        if isinstance(self.dataset, HFStream):     # decoded in the loader's workers, like the rest
            self.dataset.start(self.rank, self.world, self.seed + self.epoch, self.batch, self.pos // self.batch)
            workers, sampler = self.dataset.workers(self.workers, self.rank, self.world), None
        else:
            sampler = ResumableSampler(self.dataset, self.world, self.rank, self.seed)
            sampler.set_position(self.epoch, self.pos)
        loader = DataLoader(self.dataset, batch_size=self.batch, sampler=sampler, drop_last=True,
                            collate_fn=collate, num_workers=workers,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        self.it = iter(loader)

    def __next__(self):
        while True:
            try:
                b = next(self.it)
            except StopIteration:                  # end of an epoch (or of the stream)
                self.epoch, self.pos = self.epoch + 1, 0
                self._start()
                continue
            self.pos += self.batch
            self.skipped += b["skipped"]
            if "image" in b:
                return b

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}


class HFStream(torch.utils.data.IterableDataset):
    """A data set too large to download first (CC12M), read as a stream: shuffled in a buffer,
    split over ranks (split_dataset_by_node: each rank its own shards, where there are enough)
    and, within a rank, over its loader workers by `datasets` itself (each worker its own
    shards, decoding its own images). Resumed by skipping what each worker had read. Batches
    sets where it starts (`start`); every item gets an index unique over ranks and workers,
    the key of its per-sample random numbers."""

    def __init__(self, source: str, size: int, image_column: str = "jpg", caption_column: str = "txt"):
        self.source, self.size, self.image_column, self.caption_column = source, size, image_column, caption_column
        self.rank, self.world, self.seed, self.batch, self.batches_read = 0, 1, 0, 1, 0

    def open(self, rank: int, world: int, seed: int):
        """This rank's part of the stream, shuffled; and the columns of images and captions."""
        import datasets
        from datasets.distributed import split_dataset_by_node
        ds = data.open_hf(self.source, streaming=True)
        columns = ds.column_names or [self.image_column, self.caption_column]
        image_column, caption_column = data.pick_columns(columns, self.image_column, self.caption_column)
        ds = ds.cast_column(image_column, datasets.Image(decode=False)).shuffle(seed=seed, buffer_size=10_000)
        return split_dataset_by_node(ds, rank=rank, world_size=world), image_column, caption_column

    def workers(self, wanted: int, rank: int, world: int) -> int:
        """Loader workers for this rank: `datasets` gives each worker whole shards, and stops
        those beyond the number of shards; the workers that read must be all there are."""
        return min(wanted, self.open(rank, world, 0)[0].num_shards) if wanted else 0

    def start(self, rank: int, world: int, seed: int, batch: int, batches_read: int):
        self.rank, self.world, self.seed, self.batch, self.batches_read = rank, world, seed, batch, batches_read

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader takes whole batches from its workers in turn: worker w made every W-th.
        skip = max(0, (self.batches_read - w + W - 1) // W) * self.batch
        ds, image_column, caption_column = self.open(self.rank, self.world, self.seed)
        part, parts = self.rank * W + w, self.world * W
        for i, row in enumerate(itertools.islice(ds, skip, None), start=skip):   # read again, not decoded
            image = data.decode_image(row[image_column], self.size)
            yield None if image is None else {"image": image, "index": i * parts + part,
                                              "caption": str(row[caption_column])}


def collate(items: list) -> dict:
    """Stack a batch; samples that failed to decode (None) are dropped and counted."""
    good = [it for it in items if it is not None]
    batch = {"skipped": len(items) - len(good)}
    if not good:
        return batch
    batch["image"] = torch.stack([it["image"] for it in good])
    batch["index"] = torch.tensor([it["index"] for it in good])
    if "caption" in good[0]:
        batch["caption"] = [it["caption"] for it in good]
    if "label" in good[0]:
        batch["label"] = torch.tensor([it["label"] for it in good])
    return batch


# ---------------------------------------------------------------------------------------
# The log, checkpoints, sample grids and evaluations
# ---------------------------------------------------------------------------------------

class Log:
    """Losses summed on the device between log rows (reading a loss every step, .item(),
    would make the CPU wait for the GPU at every step), the time spent training and waiting
    for data, and the rows of log.jsonl."""

    def __init__(self, run_dir: Path, ckpt: dict | None, levels: int, device, is_main: bool, tensorboard: bool):
        """A run's log, from its checkpoint's training time on (a new run: from 0, and its
        first row marks the stage's start); --tensorboard: also in run_dir/tensorboard/."""
        self.path, self.is_main = run_dir / "log.jsonl", is_main
        self.train_time = ckpt.get("train_time", 0.0) if ckpt else 0.0
        self.tensorboard = utils.tensorboard(run_dir / "tensorboard", ckpt["step"] if ckpt else 0) \
            if tensorboard and is_main else None
        self.reset(levels, device)
        self.stage_start = ckpt is None

    def reset(self, levels: int, device):
        self.sums = torch.zeros(levels + 1, device=device)   # per level, then the total
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.steps, self.wait, self.t0, self.stage_start = 0, 0.0, time.perf_counter(), False

    def new_stage(self, model, stage: int, bar):
        """A grown model (stage `stage`, from 1): a longer row of losses, and the next row marks
        where the stage began; the main process says what grew, above the progress bar."""
        self.sums = torch.zeros(len(model.resolutions) + 1, device=self.sums.device)
        self.stage_start = True
        if self.is_main:
            bar.write(f"stage {stage}: grown to {fmt(fmt_size(s) for s in model.config.level_sizes())}\n"
                      + utils.summary(model))

    def write(self, row: dict):
        """A row of log.jsonl (the record), and its numbers in TensorBoard if asked for."""
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
        """The mean of the losses since the last row (over ranks: the one sync of a log
        interval), speed and data wait. Raises FloatingPointError on a NaN or infinity."""
        *losses, total = (utils.mean_over_ranks(self.sums) / self.steps).tolist()
        if not all(math.isfinite(v) for v in losses) or self.nonfinite.item():
            raise FloatingPointError
        dt = time.perf_counter() - self.t0
        self.train_time += dt
        sizes = stage.model.config.level_sizes()
        row = {"step": step, "stage": stage.index + 1, "time": self.train_time, "mse_sum": sum(losses),
               "loss": total, "lr": stage.sched.get_last_lr()[0], "steps_per_s": self.steps / dt,
               "images_per_s": self.steps * o.batch[stage.index] / dt, "data_wait": self.wait / dt,
               "skipped": stage.batches.skipped, **{f"loss_{fmt_size(z)}": v for z, v in zip(sizes, losses)}}
        if self.stage_start:
            row["stage_start"] = step - self.steps  # the step the stage began at
        self.reset(len(sizes), self.sums.device)
        self.write(row)
        return row

    def aside(self, seconds: float):
        """Time spent on sample grids and evaluations is not training time."""
        self.t0 += seconds


def save_checkpoint(run_dir: Path, st, step: int, o, meta: dict, log: Log, world: int):
    """The whole state (weights, EMA, Adam's moments, the schedule's step, each rank's RNG
    states, the data position, the options), written atomically to checkpoint.pt and kept in
    checkpoints/ (the last --keep-checkpoints, and every stage's last), and the EMA weights
    with what sample.py needs. A diverged model (on any rank) is never saved."""
    bad = log.nonfinite | ~torch.stack([torch.isfinite(p).all() for p in st.model.parameters()]).all()
    if utils.mean_over_ranks(bad.float()).item() > 0:
        raise FloatingPointError
    states = [utils.rng_states()]
    if dist.is_initialized():
        states = [None] * world
        dist.all_gather_object(states, utils.rng_states())
    # The model and diffusion configs of this stage: a file saved before the last stage holds
    # a smaller model's weights, and its metadata says so.
    stage_meta = {**meta, "model_config": st.ema.config.to_dict(), "diffusion_config": vars(st.diffusion.config)}
    if log.is_main:
        utils.atomic_save({"model": st.model.state_dict(), "ema": st.ema.state_dict(), "optimizer": st.opt.state_dict(),
                           "scheduler": st.sched.state_dict(), "step": step, "stage": st.index, "rng": states,
                           "data": st.batches.state(), "args": dataclasses.asdict(o), "meta": stage_meta,
                           "scaler": st.scaler.state_dict() if st.scaler else None,
                           "train_time": log.train_time}, run_dir / "checkpoint.pt")
        utils.keep_history(run_dir, step, set(np.cumsum(o.steps).tolist()), o.keep_checkpoints)
        pipeline.save_weights(run_dir / "ema.safetensors", st.ema.state_dict(), {**stage_meta, "step": step})


def side_tools(o, d: RunData, top_size, device):
    """The main process's sample grids (unless --no-samples) and evaluations at the final
    resolution (--eval-every): (grid or None, evaluate or None)."""
    try:
        grid = None if o.no_samples else pipeline.SampleGrid(
            d.cond_kind, getattr(d.full, "captions", None), d.class_names, d.encoder, device, o.sample_steps,
            o.sample_guidance, sample_prompts(o))
    except ValueError as e:
        raise SystemExit(f"train.py: --sample-prompts: {e}")
    evaluate = metrics.DuringTraining(o.data, top_size[1], o.eval_real, d.cond_kind, d.class_names,
                                      None if o.streaming else getattr(d.full, "captions", None), d.encoder,
                                      o.eval_samples, o.eval_steps, device) if o.eval_every else None
    return grid, evaluate


def side_work(run_dir, st, step: int, stage_ends, sizes, o, grid, evaluate, log: Log,
              autocast, bar, device):
    """Sample grids (every --sample-every steps and at each stage's end) and evaluations
    (every --eval-every steps of the final stage). Not training: their time is left out of
    the logged training time and speed; on a GPU the step's queued work is waited for first,
    so that it counts as training."""
    grids = grid is not None and (step % o.sample_every == 0 or step in stage_ends)
    evals = evaluate is not None and sizes[st.index] == sizes[-1] and \
        (step % o.eval_every == 0 or step == stage_ends[-1])
    if not (grids or evals):
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_aside = time.perf_counter()
    if grids:
        picture = grid.save(st.ema, st.diffusion, run_dir / "samples" / f"step{step:07d}", autocast)
        if log.tensorboard is not None:
            log.tensorboard.add_image("samples", np.asarray(Image.open(picture).convert("RGB")), step,
                                      dataformats="HWC")
        utils.plot_log(log.path, run_dir / "loss.png")
    if evals:
        row = evaluate(st.ema, st.diffusion, step, log.train_time + t_aside - log.t0, autocast)   # seconds so far
        log.write(row)
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("eval_")))
    log.aside(time.perf_counter() - t_aside)


def start_text(model, o, first: int, stages: int, run_dir: Path, cond_kind: str, device, world: int,
               precision: str) -> str:
    """What a run prints when it starts: its model, folder, data, devices and precision."""
    return (utils.summary(model, f"{o.config} (stage {first + 1} of {stages})") + f"\nrun folder: {run_dir}   data: "
            f"{o.data} ({cond_kind}-conditional)   device: {device} x {world}   precision: {precision}"
            f"{' (auto)' if o.precision == 'auto' else ''}")


def checkpoint_due(step: int, stage_end: int, last_step: int, every: int, stopping: bool) -> bool:
    """After step `step`: a checkpoint at every `every` steps, when stopping, and at the run's
    end; not at the end of an earlier stage, where the grown model is checkpointed instead."""
    return step < stage_end and (step % every == 0 or stopping) or step == last_step


def loss_text(row: dict) -> str:
    """A log row's losses for the progress bar: "16px 0.0412 32px 0.0330"."""
    return " ".join(f"{k[5:]}px {v:.4f}" for k, v in row.items() if k.startswith("loss_"))


def diverged(run_dir: Path, step: int, is_main: bool):
    if is_main:
        print(f"\ntrain.py: the loss is NaN or infinite at step {step}: stopping. The last good checkpoint "
              f"({run_dir / 'checkpoint.pt'}) is kept; try a lower --lr or a smaller --clip.", file=sys.stderr)
    sys.exit(1)


def stop_on_sigterm() -> threading.Event:
    """A polite stop: a cluster's SIGTERM (a job's time is up) sets the event, and the run
    stops after its step, with a checkpoint."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    return stop


def finish(run_dir: Path, sizes, cond_kind: str, step: int, last_step: int, is_main: bool):
    """What to do next: resume a run that stopped before its last step, or sample it."""
    if is_main:
        utils.plot_log(run_dir / "log.jsonl", run_dir / "loss.png")
        if step < last_step:
            print(f"\nstopped at step {step}; saved. Resume with: python train.py --resume {run_dir}")
        else:
            how = (f"python video.py sample --ckpt {run_dir} \"a prompt\"" if sizes[-1][0] > 1 else
                   f"python sample.py --ckpt {run_dir} " + ("--label <class>" if cond_kind == "label" else
                                                             "\"a prompt\"" if cond_kind == "text" else ""))
            print(f"done: {run_dir}/ema.safetensors (sample with: {how.strip()})")
    if dist.is_initialized():
        dist.destroy_process_group()
