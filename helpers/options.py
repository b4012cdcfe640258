"""
Command lines that speak to a person: every mistake is one line that names the flag, the value
and what is expected, before any work is done (no traceback, no usage dump). An options
dataclass (train.py's TrainOptions) is the one source of its flags, defaults, help and checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

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

