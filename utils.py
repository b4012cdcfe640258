"""
The plumbing the scripts share, kept out of the tutorial files: command lines that speak to
a person, processes and devices, the per-sample random numbers of training, files that a
kill cannot damage, reading files someone handed over without running code from them, and
the picture of a training log.

Nothing here is Matryoshka Diffusion; the model, the diffusion process, the data and the
training are in nested_unet.py, diffusion.py, data.py and train.py.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import math
import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------
# Command lines: every mistake is one line that names the flag, the value and what is
# expected, before any work is done (no traceback, no usage dump)
# ---------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors ("argument --steps: invalid int_list value: 'x'") said in one
    line, prefixed by the script's name, instead of a usage block followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def comma_list(kind, example: str):
    """An argparse type: '64,256' -> [64, 256] of `kind` (int or float). An empty list, or an
    entry that is not a number, is refused with an example of what is expected."""
    def parse(s: str):
        try:
            values = [kind(v) for v in s.split(",")]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated {what}, e.g. {example}")
        return values
    what = {int: "integers", float: "numbers"}[kind]
    parse.__name__ = f"list of {what}"
    return parse


def option(default, help: str, check=None, **kw):
    """A field of an options dataclass, with what its flag's --help says, optionally the check
    of its value (a (test, what is expected) pair, e.g. COUNT: check_options applies it), and
    its argparse group, choices, or type when the default is None."""
    meta = {"help": help, "check": check, **kw}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def options_parser(cls, prog: str, description: str) -> ArgumentParser:
    """The command line of an options dataclass: --a-field for every field, its type from its
    default (a list: comma-separated; a bool: a switch), its help and group from option()."""
    p = ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        group, _ = meta.pop("group", None), meta.pop("check", None)
        target = groups.setdefault(group, p.add_argument_group(group)) if group else p
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            target.add_argument(flag, action="store_true", help=meta["help"])
            continue
        if isinstance(default, list):
            kind = type(default[0])
            meta.setdefault("type", comma_list(kind, ",".join(map(str, default))))
        elif default is not None and "choices" not in meta:
            meta.setdefault("type", type(default))
        target.add_argument(flag, default=default, **meta)
    return p


def parse_options(cls, prog: str, description: str, argv=None) -> tuple:
    """The options dataclass `cls` from the command line, and the names of the options it
    gave (those left out have their defaults)."""
    p = options_parser(cls, prog, description)
    options = cls(**vars(p.parse_args(argv)))
    for action in p._actions:                      # parsed again, with no defaults: only what was given
        action.default = argparse.SUPPRESS
    return options, set(vars(p.parse_args(argv)))


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def positive(v) -> bool:
    """A finite number > 0 (NaN is not: every comparison with NaN is False)."""
    return finite(v) and v > 0


def at_least(n):
    return lambda v: finite(v) and v >= n


# The checks of option(check=...): (test, what is expected). NaN fails them all (every
# comparison with NaN is False).
COUNT = (at_least(1), "an integer >= 1")
NONNEGATIVE = (at_least(0), "an integer >= 0")
POSITIVE = (positive, "a positive number")
FINITE = (finite, "a finite number")
FRACTION = (lambda v: finite(v) and 0 < v <= 1, "a fraction in (0, 1]")
PROBABILITY = (lambda v: finite(v) and 0 <= v < 1, "a probability in [0, 1)")


def check_options(prog: str, options):
    """Every field of an options dataclass that has a check, in the order of the fields: the
    first that fails ends the script with one line that names the flag, the value, and what
    is expected, with the default as an example."""
    for f in dataclasses.fields(options):
        if f.metadata.get("check"):
            test, expected = f.metadata["check"]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            example = "" if default is None else f", e.g. {','.join(map(str, default)) if isinstance(default, list) else default}"
            check_flags(prog, options, [("--" + f.name.replace("_", "-"), test, expected + example)])


def check_flags(prog: str, args, rules):
    """rules: (flag, test, what is expected) in order. The first flag whose value fails its
    test ends the script with one line: "train.py: --lr nan: expected a positive number".
    A test of a list applies to every entry."""
    for flag, test, expected in rules:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue                               # not a flag of this command, or not given
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(test(v) for v in values):
            shown = ",".join(map(str, values)) if isinstance(value, (list, tuple)) else value
            raise SystemExit(f"{prog}: {flag} {shown}: expected {expected}")


def check_device(prog: str, name: str | None):
    """--device: cpu, cuda, cuda:N, mps, as torch names them, and present on this machine."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"{prog}: --device {name}: expected cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{prog}: --device {name}: this machine has no CUDA GPU that torch can use "
                         f"(torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"{prog}: --device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SystemExit(f"{prog}: --device {name}: this machine has no Apple GPU that torch can use")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"{prog}: --device {name}: expected cpu, cuda, cuda:N or mps")


# ---------------------------------------------------------------------------------------
# Processes and devices (plain torch.distributed: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
# ---------------------------------------------------------------------------------------

def process_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process; (0, 1, 0) without torchrun."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def setup_processes(device_arg: str | None, join: bool = True):
    """-> (rank, world size, device). One process takes --device as given (cuda:1 too), or the
    first GPU if there is one; under torchrun each process takes the GPU of its local rank,
    and with join=True the processes form their group (NCCL on GPUs, gloo on CPUs, where they
    share the cores)."""
    rank, world, local = process_env()
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if world == 1 and device_arg is not None:
        device = torch.device(device_arg)          # cpu, cuda:N, or an Apple GPU: mps
    elif world > 1 and device_arg is not None and device_arg.startswith("mps"):
        raise SystemExit("--device mps: an Apple GPU is one device; torchrun's processes need one each "
                         "(run one process, or use CUDA GPUs)")
    else:
        device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        reuse_freed_memory()
    if world > 1 and join:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if not use_cuda:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return rank, world, device


def reuse_freed_memory() -> bool:
    """Let the C allocator keep the memory that freed tensors leave, for the next ones, instead
    of handing it back to the kernel (Linux with glibc; elsewhere nothing changes: -> False).

    A CPU training step allocates and frees hundreds of MB of activations. By default glibc
    maps big blocks straight from the kernel and unmaps them when they are freed, and gives the
    free top of its heap back too; the next step then touches new pages, and every first touch
    of a page is a page fault. Raising both thresholds to 1 GB keeps those pages. The demo's
    model (CPU-S16S32, batch 32) on the 2-core CI machine, 2026-12-02: 66,700 page faults per
    training step (260 MB of new pages) and 25,300 per guided sampling forward, against 1,000
    and 0 with this; the training step took 0.93x the time (median of 12 pairs of fresh
    processes, the demo's and the official-comparison shape; single pairs scatter from 0.85 to
    1.09), the sampling forward the same time. Peak memory: 1.12 GB either way (within 1.5%);
    the process stays at its peak between steps instead of going down and up again."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                       # from <malloc.h>
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):           # no glibc: macOS, Windows, musl
        return False


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, device) -> str:
    """"auto" -> what this device runs best: bf16 (appendix B) on GPUs that have it, fp16 on
    those that do not (T4, V100: bf16 is emulated there, slowly), fp32 on CPUs and Apple GPUs."""
    device = torch.device(device)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "fp32"


def memory_format(setting, device, frames: int = 1) -> torch.memory_format:
    """The memory format of an image model and its inputs: channels-last if `setting` is "on"
    (True in runs from before "auto"), never if "off" (False), and with "auto" on a CPU. There
    oneDNN's 3x3 convolutions take 10-30% less time on channels-last maps at 16x16 and 32x32
    than on the default layout, the attention's (B, HW, C) tokens of such a map are a view, and
    its Linear layers run as faster 1x1 convolutions (fast_layers.pointwise): the training step
    and the sampling forward of the README's comparison with the official code took 11-15% less
    (on a later host of the same 2-core kind, the demo's model only 1% less). GPUs keep the
    default layout (not measured there: `bench.py --device cuda --knobs channels_last` does).
    Videos (5-D) never."""
    if frames > 1 or setting in (False, "off"):
        return torch.contiguous_format
    on = setting in (True, "on") or torch.device(device).type == "cpu"      # "auto": a CPU
    return torch.channels_last if on else torch.contiguous_format


def autocast(device, precision: str = "auto"):
    """Autocast of the network in `precision` (auto: resolve_precision), as in training. The
    samplers keep their state in float32 either way."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A tensor to `device` without making the host wait for the GPU. A plain .to("cuda")
    waits until the GPU has finished all the work queued before it (PyTorch synchronises
    the stream after a blocking copy); a copy from pinned ("page-locked") memory with
    non_blocking=True just joins the queue. PyTorch keeps the pinned block alive until the
    copy is done, so the temporary pin below is safe. (Contiguous first: a strided source
    would be made contiguous by the copy itself, in ordinary memory again.)"""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)


def timed(fn, n: int, device) -> list[float]:
    """The seconds of each of n calls of fn. On a GPU the device is synchronised before and
    after each call: kernels run asynchronously, and without it we would time their launches."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    out = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------
# Randomness per sample: the diffusion time, the noise of every resolution, the conditioning
# dropout and the mixed-resolution draw of a training sample are a function of (seed, step,
# its index in the data set). A step then computes the same thing however the batch is split
# over processes or micro-batches (1 process = N processes = gradient accumulation), and a
# resumed run draws exactly what the run it continues would have drawn.
#
# A generator per sample would need a Python loop over the batch. Instead the numbers are
# drawn by a counter-based generator: number j of stream s of a sample is a hash of (sample,
# s, j), computed for the whole batch at once on the device. The hash is Chris Wellons'
# "lowbias32" (every input bit flips every output bit with probability close to 1/2), in
# int64 arithmetic that never overflows; two uniforms make two normals (Box-Muller).
# ---------------------------------------------------------------------------------------

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for 32-bit values held in int64, in two 16-bit halves of c (no overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=16)
def _hashed_counter(n: int, device: torch.device) -> torch.Tensor:
    return hash32(torch.arange(n, device=device, dtype=torch.int64))


def uniforms(sample_keys: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """(B, n) uniforms in (0, 1): number j of the given stream of each sample."""
    base = hash32((sample_keys + stream * 0x9E3779B9) & M32)          # one key per (sample, stream)
    j = _hashed_counter(n, sample_keys.device)
    return ((hash32(j[None, :] ^ base[:, None]) >> 8).float() + 0.5) / 2 ** 24   # 24 random bits


def normals(sample_keys: torch.Tensor, stream: int, shape: tuple) -> torch.Tensor:
    n = math.prod(shape)
    u = uniforms(sample_keys, stream, 2 * n)
    z = torch.sqrt(-2 * torch.log(u[:, :n])) * torch.cos(2 * math.pi * u[:, n:])
    return z.view(-1, *shape)


def per_sample_randomness(keys: torch.Tensor, step: int, seed: int, shapes: list[tuple], device):
    """For each sample (its index in the data set in `keys`): its diffusion time t, the noise
    of every level (shapes without the batch), and two uniforms for the conditioning dropout
    and the mixed-resolution draw. Those two stay on the CPU, where the batch is reordered;
    what goes to the device goes without waiting for it (to_device)."""
    k = sample_keys(keys, step, seed)
    t, u_drop, u_high = uniforms(k, 0, 3).unbind(1)
    k = to_device(k, device)
    noises = [normals(k, 1 + i, shape) for i, shape in enumerate(shapes)]
    return to_device(t, device), noises, u_drop, u_high


def sample_keys(keys, step: int, seed: int) -> torch.Tensor:
    """The key of each sample at a step (on the CPU): a hash of (seed, step, its index)."""
    k = torch.as_tensor(keys, dtype=torch.int64).cpu() & M32
    return hash32(hash32(hash32(torch.tensor(seed & M32)) ^ (step & M32)) ^ k)


def flip_draws(keys, step: int, seed: int) -> torch.Tensor:
    """A fourth uniform per sample (the first three are per_sample_randomness's, unchanged by
    it), on the CPU: the random horizontal flip of train.py --hflip."""
    return uniforms(sample_keys(keys, step, seed), 0, 4)[:, 3]


def rng_states() -> dict:
    """Every generator's state as tensors, numbers and tuples only, so that a checkpoint loads
    with torch.load(weights_only=True): numpy's state is (name, 624 uint32 keys, pos,
    has_gauss, cached_gaussian), its key array is stored as an int64 tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s: dict):
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------
# Writing files that a kill cannot damage, and reading files safely
# ---------------------------------------------------------------------------------------


def atomic_save(obj, path: Path, save_fn=torch.save):
    """Write to a temporary file, flush it to disk, then rename over the old file: a kill at
    any moment leaves either the old or the new file, never a damaged one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_fn(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def keep_history(run_dir: Path, step: int, keep_steps: set, keep: int):
    """checkpoints/step<N>.pt: the checkpoint just written (a hard link to checkpoint.pt, so
    no copy; a copy where links cannot be made), and of the older ones the last `keep` and
    those of the steps in keep_steps (each stage's last)."""
    import shutil
    history = Path(run_dir) / "checkpoints"
    history.mkdir(exist_ok=True)
    target = history / f"step{step:07d}.pt"
    target.unlink(missing_ok=True)
    try:
        os.link(Path(run_dir) / "checkpoint.pt", target)
    except OSError:
        shutil.copy2(Path(run_dir) / "checkpoint.pt", target)
    others = [f for f in sorted(history.glob("step*.pt")) if int(f.stem[4:]) not in keep_steps]
    for f in others[:len(others) - keep]:
        f.unlink()


def tensorboard(log_dir: Path, step: int):
    """A TensorBoard writer; a resumed run purges what was written after its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(log_dir), purge_step=step or None)


def load_torch_file(path, what: str = "checkpoint"):
    """torch.load with weights_only=True: tensors, numbers, strings, lists, tuples and dicts,
    and nothing else. A pickle may name any Python function to call while it is read; a
    checkpoint someone handed over is opened without giving it that power. Raises ValueError
    with what is wrong (not a torch file, damaged, or holding other objects)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any object it does not know: say which, and why we refuse it.
        reason = str(e).split("\n")[0] if "WeightsUnpickler error" not in str(e) else \
            next((l.strip() for l in str(e).splitlines() if "Unsupported global" in l), str(e).splitlines()[0])
        raise ValueError(f"{path}: this {what} holds Python objects beyond tensors and plain data "
                         f"({reason[:200]}); it was not written by this version of train.py, and "
                         f"opening it could run code, so it is refused") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a readable {what} (truncated or damaged? "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) in [-1, 1] -> uint8 (..., H, W, 3): for saving images (grey, C = 1, as
    equal RGB channels)."""
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


# ---------------------------------------------------------------------------------------
# Pictures: image grids, and the matryoshka figure of every nested resolution
# ---------------------------------------------------------------------------------------

def save_grid(images: torch.Tensor, path, nrow: int = 8, captions=None, scale: int | None = None):
    """Images (N, C, H, W) in [-1, 1] -> one PNG grid (path None: the picture only), with a
    caption under each if given, small images enlarged by an integer factor (scale; None:
    to about 128 pixels)."""
    a = to_uint8(images)
    n, h, w, _ = a.shape
    scale = max(1, 128 // w) if scale is None else scale
    if scale > 1:
        a = a.repeat(scale, 1).repeat(scale, 2)
        h, w = h * scale, w * scale
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    text_h = 12 if captions else 0
    grid = Image.new("RGB", (ncol * (w + 2), nrows * (h + 2 + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % ncol) * (w + 2), (i // ncol) * (h + 2 + text_h)
        grid.paste(Image.fromarray(a[i]), (x, y))
        if captions:
            draw.text((x, y + h), captions[i][: max(3, w // 6)], fill=(0, 0, 0))
    if path is not None:
        grid.save(path)
    return grid


def save_matryoshka(levels: list, path, captions=None, min_tile: int = 96):
    """The "matryoshka" figure: every nested resolution of each sample. Columns are samples,
    rows are resolutions from the lowest to the highest, each shown at the same size
    (nearest-neighbour, so that the pixels of the low resolutions stay visible)."""
    top = levels[-1].shape[-1]
    scale = max(1, -(-min_tile // top))
    tile, label_w = top * scale, 56
    n, rows = levels[0].shape[0], len(levels)
    text_h = 14 if captions else 0
    fig = Image.new("RGB", (label_w + n * (tile + 2), rows * (tile + 2) + text_h + 2), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    for r, x in enumerate(levels):
        k = tile // x.shape[-1]
        a = to_uint8(x.float())
        draw.text((4, r * (tile + 2) + tile // 2 - 6), f"{x.shape[-1]}x{x.shape[-1]}", fill=(0, 0, 0))
        for i in range(n):
            img = Image.fromarray(a[i]).resize((tile, tile), Image.Resampling.NEAREST) if k > 1 else Image.fromarray(a[i])
            fig.paste(img, (label_w + i * (tile + 2), r * (tile + 2)))
    if captions:
        for i, c in enumerate(captions):
            draw.text((label_w + i * (tile + 2), rows * (tile + 2)), c[: tile // 6], fill=(0, 0, 0))
    if path is not None:
        fig.save(path)
    return fig


# ---------------------------------------------------------------------------------------
# The picture of a training log
# ---------------------------------------------------------------------------------------

def plot_log(log_path: Path, out: Path):
    """The loss of every resolution of a run's log.jsonl against steps, a dotted line where a
    stage begins; and, when the run was evaluated, its metrics (FD-EffNet, class accuracy)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(log_path).exists():                # stopped before its first log row: nothing to draw
        return
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    # Keys are loss_64, loss_256, or loss_16x64 for a video level (frames x size): by pixels.
    sizes = {}
    for k in (k for r in rows for k in r if k.startswith("loss_")):
        frames, _, res = k[5:].rpartition("x")
        sizes[k] = (int(frames or 1), int(res))
    evals = [k for k in ("eval_fd_effnet", "eval_class_acc") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, 1 + len(evals), figsize=(7 + 4 * len(evals), 4), squeeze=False)
    ax = axes[0, 0]
    for k in sorted(sizes, key=lambda k: math.prod(sizes[k])):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        frames, res = sizes[k]
        ax.plot(*zip(*pts), label=f"{res}x{res}" + (f", {frames} frames" if frames > 1 else ""))
    for r in rows:
        if "stage_start" in r:
            ax.axvline(r["stage_start"], color="grey", linestyle=":", lw=1)
    ax.set(xlabel="step", ylabel="v-prediction MSE", yscale="log",
           title="training loss per resolution (dotted: a new stage starts)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    for ax, k in zip(axes[0, 1:], evals):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), marker="o")
        ax.set(xlabel="step", title={"eval_fd_effnet": "FD-EffNet (lower is better)",
                                     "eval_class_acc": "class accuracy of samples"}[k])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# A model's summary: the paper's Fig. 3 in text
# ---------------------------------------------------------------------------------------

def sum_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _size(frames: int, res: int) -> str:
    """64x64 for an image level, 16x64x64 for a level of 16 frames."""
    return f"{frames}x{res}x{res}" if frames > 1 else f"{res}x{res}"


def summary(model: torch.nn.Module, name: str = "") -> str:
    cfg = model.config
    rows = [f"{name or 'NestedUNet'}: {len(cfg.levels())} level(s) at "
            f"{' -> '.join(_size(f, r) for f, r in cfg.level_sizes())}, "
            f"{sum_params(model) / 1e6:.1f}M parameters",
            f"{'level':<6}{'input':>10}  {'feature maps (size x channels)':<36}{'res blocks':<12}"
            f"{'attention':<11}{'schedule':<16}{'params':>9}"]
    for i, level in enumerate(model.levels()):
        c = level.config
        own = sum_params(level) - (sum_params(level.inner) if level.inner is not None else 0)
        maps = " -> ".join(f"{r}x{ch}" for r, ch in zip(c.resolutions, c.resolution_channels))
        rows.append(f"{i + 1:<6}{_size(c.frames, c.resolutions[0]):>10}  {maps:<36}"
                    f"{','.join(map(str, c.num_res_blocks)):<12}"
                    f"{','.join(map(str, c.num_attn_layers_per_block)):<11}{c.schedule:<16}"
                    f"{own / 1e6:>8.1f}M")
    cond = sum_params(model.innermost.cond_embed)
    what = (f"text ({cfg.text_channels}-wide features -> {cfg.lm_feature_projected_channels}, "
            f"{cfg.num_lm_attn_layers} self-attention layers)" if cfg.text_channels else
            f"{cfg.num_classes} classes" if cfg.num_classes else "unconditional")
    rows.append(f"conditioning: {what}; time + condition embedding {cfg.emb_channels} wide, "
                f"{cond / 1e6:.1f}M parameters (counted in level 1)")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------
# A picture of a model's schedules (python diffusion.py draws it)
# ---------------------------------------------------------------------------------------

def plot_schedules(config, path: str, diffusion_config=None):
    """Left: log-SNR against t for every level of a config. Right: what each level's noise
    amounts to once its image is average-pooled to the base resolution (pooling s x s blocks
    multiplies the SNR by s^2). Unshifted (dotted), the high resolutions are far cleaner than
    the base at the same t; shifted (solid), every level sits on the base curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion import MatryoshkaDiffusion, cosine_logsnr
    levels = config.levels()
    d = MatryoshkaDiffusion([c.resolutions[0] for c in levels], [c.schedule for c in levels],
                            diffusion_config)
    t = torch.linspace(0, 1, 501)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r, c in enumerate(levels):
        lam, s = d.logsnr(t, r), d.shifts[r]
        color = f"C{r}"
        label = f"{c.resolutions[0]}x{c.resolutions[0]} ({c.schedule})"
        axes[0].plot(t, lam, color=color, label=label)
        pooled = 2 * math.log(s)
        axes[1].plot(t, lam + pooled, color=color, label=label + ", shifted", lw=2.5 - 0.4 * r)
        if s != 1:
            axes[1].plot(t, cosine_logsnr(t, d.config.logsnr_min, d.config.logsnr_max) + pooled,
                         color=color, linestyle=":", label=label.split(" (")[0] + ", not shifted")
    axes[0].set(xlabel="t", ylabel="log SNR", title="each resolution's own schedule")
    axes[1].set(xlabel="t", ylabel="log SNR after pooling to the base resolution",
                title="what the noise amounts to at the base resolution")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Resolution-shifted cosine schedules: logsnr_s(t) = logsnr(t) - "
                 f"{d.config.shift_power:g} log s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
