"""
Files: written so that a kill cannot damage them, read so that a file someone handed over runs no code, and
found where a person expects them. A run folder holds checkpoint.pt (the whole training state, read with
weights_only=True) and ema.safetensors (the EMA weights, with all that rebuilds the model in its metadata).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch


def atomic_save(obj, path: Path, save_fn=torch.save):
    """A temporary file, flushed to disk, renamed over the old: a kill leaves the old or the new, intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_fn(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def keep_history(run_dir: Path, step: int, keep_steps: set, keep: int):
    """checkpoints/step<N>.pt: the checkpoint just written (a hard link, else a copy), and of the older ones
    the last `keep` and those of the steps in keep_steps (each stage's last)."""
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


def load_torch_file(path, what: str = "checkpoint"):
    """torch.load with weights_only=True (a pickle may name any function to call while it is read), or a
    ValueError saying what is wrong (not a torch file, damaged, naming a function), without the path."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Name the refused global (torch's own text advises weights_only=False, which must not be done).
        found = re.search(r"GLOBAL ([\w.]+)|global: ([\w.]+)|global ([\w.]+)", str(e))
        name = next((g for g in found.groups() if g), None) if found else None
        raise ValueError(f"not a {what}: it names {name or 'a Python object'}, which a {what} never holds, and "
                         f"reading it would run code; refused") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"not a readable {what} (truncated or damaged? "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


# --- ema.safetensors: the weights, with the config in the metadata ---------------------------
def save_weights(path, state_dict: dict, meta: dict):
    """Weights as safetensors (tensors and a JSON header: nothing runs when read), atomically, with all that
    rebuilds and uses the model in the metadata (as k-diffusion's convert_for_inference)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}
    header = {k: json.dumps(v) for k, v in meta.items()}
    atomic_save(tensors, path, lambda t, p: save_file(t, str(p), metadata=header))


def read_weights(path, metadata_only: bool = False):
    """-> (state dict, metadata) of an ema.safetensors file, or the metadata alone; ValueError if damaged."""
    import safetensors.torch
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return meta if metadata_only else (safetensors.torch.load_file(str(path)), meta)
    except Exception as e:                         # SafetensorError, JSONDecodeError, OSError
        raise ValueError(f"{path}: not a readable safetensors file of weights (truncated or damaged? "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def read_metadata(path) -> dict:
    return read_weights(path, metadata_only=True)


def find_weights(ckpt=None, runs="runs", video: bool | None = None, name: str = "ema.safetensors",
                 flag: str = "--ckpt") -> Path:
    """A run's file `name` (EMA weights, or checkpoint.pt): `ckpt` a run folder or the file, None the newest
    run in `runs/` (only video or image models if `video` says). FileNotFoundError says what to do instead."""
    if ckpt is not None:
        path = Path(ckpt) / name if Path(ckpt).is_dir() else Path(ckpt)
        if not path.exists():
            where = f"no {name} in that folder" if Path(ckpt).is_dir() else "no such file or folder"
            raise FileNotFoundError(f"{flag} {ckpt}: {where} (expected a run folder with {name}, or the file)")
        return path
    # The newest: the file written last (every checkpoint rewrites both: a run training or resumed counts).
    found = sorted(Path(runs).glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
    if video is not None:
        found = [p for p in found if bool(metadata_or_empty(p.with_name("ema.safetensors")).get("video")) == video]
    if not found:
        what, how = ("video model", "`python train.py --config CPU-S16T8 --data emoji-motion --res 16,8x16`") \
            if video else ("weights", "`python train.py` (about 15 minutes on a laptop CPU)")
        if name != "ema.safetensors":
            raise FileNotFoundError(f"no run with a {name} in {runs}/")
        raise FileNotFoundError(f"no trained {what} found in {runs}/. Train one first: {how}, or point "
                                f"{flag} at a run folder or an ema.safetensors file")
    return found[-1]


def metadata_or_empty(path) -> dict:
    try:
        return read_metadata(path)
    except ValueError:                             # a damaged file is nobody's newest run
        return {}
