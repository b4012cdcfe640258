"""
The plumbing the scripts share, kept out of the tutorial files: command-line checks that
speak to a person, and reading files that someone may have handed over without running
any code from them.

Nothing here is Matryoshka Diffusion; the model, the diffusion process, the data and the
training are in nested_unet.py, diffusion.py, data.py and train.py.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
from pathlib import Path

import torch

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


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def positive(v) -> bool:
    """A finite number > 0 (NaN is not: every comparison with NaN is False)."""
    return finite(v) and v > 0


def at_least(n):
    return lambda v: finite(v) and v >= n


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


def autocast(device, enabled: bool | None = None):
    """bf16 autocast for the network on GPUs (appendix B), as in training; off on CPUs unless
    asked for. The samplers keep their state in float32 either way."""
    device = torch.device(device)
    on = device.type == "cuda" if enabled is None else enabled
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


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

