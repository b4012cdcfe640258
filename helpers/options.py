"""
Command lines that speak to a person: each mistake one line (flag, value, what is expected), before any work.
An options dataclass (train.py's TrainOptions) is the one source of its flags, defaults, help and checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors said in one line prefixed by the script's name, not after a usage block."""
    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def comma_list(kind, example: str):
    """An argparse type: '64,256' -> [64, 256] of `kind` (int or float); refused with an example otherwise."""
    def parse(s: str):
        try:
            return [kind(v) for v in s.split(",")]             # never empty: "".split(",") == [""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated {what}, e.g. {example}")
    what = {int: "integers", float: "numbers"}[kind]
    parse.__name__ = f"list of {what}"
    return parse


def option(default, help: str, check=None, **kw):
    """A dataclass field: its --help, its check ((test, what is expected), e.g. COUNT), argparse keywords."""
    meta = {"help": help, "check": check, **kw}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def options_parser(cls, prog: str, description: str) -> ArgumentParser:
    """--a-field for every field, typed by its default (a list: comma-separated; a bool: a switch)."""
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
            meta.setdefault("type", comma_list(type(default[0]), ",".join(map(str, default))))
        elif default is not None and "choices" not in meta:
            meta.setdefault("type", type(default))
        target.add_argument(flag, default=default, **meta)
    return p


def parse_options(cls, prog: str, description: str, argv=None) -> tuple:
    """The options dataclass `cls` from the command line, and the names of the options it gave."""
    p = options_parser(cls, prog, description)
    options = cls(**vars(p.parse_args(argv)))
    for action in p._actions:                      # parsed again, with no defaults: only what was given
        action.default = argparse.SUPPRESS
    return options, set(vars(p.parse_args(argv)))


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def positive(v) -> bool:
    return finite(v) and v > 0


def at_least(n):
    return lambda v: finite(v) and v >= n


# The checks of option(check=...): (test, what is expected). NaN fails them all (any comparison is False).
COUNT = (at_least(1), "an integer >= 1")
NONNEGATIVE = (at_least(0), "an integer >= 0")
POSITIVE = (positive, "a positive number")
FINITE = (finite, "a finite number")
FRACTION = (lambda v: finite(v) and 0 < v <= 1, "a fraction in (0, 1]")
PROBABILITY = (lambda v: finite(v) and 0 <= v < 1, "a probability in [0, 1)")


def check_options(prog: str, options):
    """Each check of an options dataclass, in field order: the first to fail ends the script (check_flags)."""
    for f in dataclasses.fields(options):
        if f.metadata.get("check"):
            test, expected = f.metadata["check"]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            example = "" if default is None else f", e.g. {shown}"
            check_flags(prog, options, [("--" + f.name.replace("_", "-"), test, expected + example)])


def check_flags(prog: str, args, rules):
    """rules: (flag, test, what is expected). The first value (of a list: entry) that fails its test ends the
    script with one line: "train.py: --lr nan: expected a positive number"."""
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

