"""
Processes, devices and precision: plain torch.distributed (torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK), the memory format and the faster CPU layers a device wants, autocast, copies to a
GPU that do not wait for it, and timing.
"""

from __future__ import annotations

import ctypes
import os
import time

import torch
import torch.distributed as dist

import helpers.fast_cpu as fast_cpu


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
    A CPU training step allocates and frees hundreds of MB of activations; by default glibc
    unmaps big blocks when they are freed, and the next step pays a page fault for every page
    it touches again. Raising both thresholds to 1 GB keeps those pages (docs/results.md)."""
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


def resolve_precision(precision: str, device, fp16: bool = True) -> str:
    """"auto" -> what this device runs best: bf16 (appendix B) on GPUs that have it, fp16 on
    those that do not (T4, V100: bf16 is emulated there, slowly) unless the model's values
    exceed fp16's range (fp16=False: fp32 there), fp32 on CPUs and Apple GPUs."""
    device = torch.device(device)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16" if fp16 else "fp32"
    return "fp32"


def autocast(device, precision: str = "auto"):
    """Autocast of the network in `precision` (auto: resolve_precision), as in training. The
    samplers keep their state in float32 either way."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def memory_format(setting, device, frames: int = 1) -> torch.memory_format:
    """The memory format of an image model and its inputs: channels-last if `setting` is "on"
    (True in runs from before "auto"), never if "off" (False), and with "auto" on a CPU, whose
    convolutions (oneDNN's) are faster on channels-last maps. GPUs keep the default layout;
    videos (5-D) always do."""
    if frames > 1 or setting in (False, "off"):
        return torch.contiguous_format
    on = setting in (True, "on") or torch.device(device).type == "cpu"      # "auto": a CPU
    return torch.channels_last if on else torch.contiguous_format


def prepare(model: torch.nn.Module, device, channels_last="auto") -> torch.nn.Module:
    """A model on `device` as that device runs it fastest: in its memory format, and on a CPU
    with the faster layers of fast_cpu.py swapped in (the same parameters and state dict)."""
    model = model.to(device=device, memory_format=memory_format(channels_last, device, model.config.frames))
    if torch.device(device).type == "cpu":
        fast_cpu.use_fast_layers(model)
    return model


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A tensor to `device` without making the host wait for the GPU. A plain .to("cuda")
    waits until the GPU has finished all the work queued before it; a copy from pinned
    ("page-locked") memory with non_blocking=True just joins the queue (PyTorch keeps the
    pinned block alive until the copy is done)."""
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
