"""
Processes, devices and precision: plain torch.distributed (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK), the
memory format and faster CPU layers a device wants, autocast, GPU copies that do not wait for it, and timing.
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
    """-> (rank, world size, device): --device (cuda:1 too), or the first GPU; under torchrun the local rank's
    GPU, and with join=True the processes form their group (NCCL on GPUs, gloo on CPUs, sharing the cores)."""
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
    """Let glibc keep freed memory for the next tensors (elsewhere: -> False): a CPU step frees hundreds of
    MB, and unmapped, each page faults again in the next step; 1 GB thresholds keep them (docs/results.md)."""
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
    """"auto" -> bf16 (appendix B) on GPUs that have it, else fp16 (T4, V100 emulate bf16, slowly) unless the
    model's values exceed fp16's range (fp16=False: fp32 there); fp32 on CPUs and Apple GPUs."""
    device = torch.device(device)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16" if fp16 else "fp32"
    return "fp32"


def autocast(device, precision: str = "auto"):
    """Autocast of the network in `precision` (auto: resolve_precision); samplers keep float32 state."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def memory_format(setting, device, frames: int = 1) -> torch.memory_format:
    """Channels-last if "on" (True in older runs), or "auto" on a CPU (oneDNN convolutions); never videos."""
    if frames > 1 or setting in (False, "off"):
        return torch.contiguous_format
    on = setting in (True, "on") or torch.device(device).type == "cpu"      # "auto": a CPU
    return torch.channels_last if on else torch.contiguous_format


def prepare(model: torch.nn.Module, device, channels_last="auto") -> torch.nn.Module:
    """A model on `device` in its memory format, on a CPU with fast_cpu.py's layers (same state dict)."""
    model = model.to(device=device, memory_format=memory_format(channels_last, device, model.config.frames))
    if torch.device(device).type == "cpu":
        fast_cpu.use_fast_layers(model)
    return model


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A tensor to `device` without waiting for the GPU's queued work (a pinned, non_blocking copy)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)


def timed(fn, n: int, device) -> list[float]:
    """The seconds of each of n calls of fn, the GPU synchronised around each (else we time launches)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    out = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out
