"""Pictures: image grids, the "matryoshka" figure of every nested resolution, a video's frames and
GIF, and the curves of a training log.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) in [-1, 1] -> uint8 (..., H, W, 3) to save (grey, C = 1, as equal RGB channels)."""
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


def save_grid(images: torch.Tensor, path, nrow: int = 8, captions=None, scale: int | None = None):
    """Images (N, C, H, W) in [-1, 1] -> one PNG grid (path None: the picture only), captions under them,
    small images enlarged by an integer factor (scale; None: to about 128 pixels)."""
    a = to_uint8(images)
    n, h, w, _ = a.shape
    scale = max(1, 128 // w) if scale is None else scale
    if scale > 1:
        a = a.repeat(scale, 1).repeat(scale, 2)
        h, w = h * scale, w * scale
    ncol = min(nrow, n)
    nrows, text_h = (n + ncol - 1) // ncol, 12 if captions else 0
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
    """The "matryoshka" figure: columns are samples, rows their resolutions from the lowest, all at one size
    (nearest-neighbour, so that the pixels of the low resolutions stay visible)."""
    top = levels[-1].shape[-1]
    tile, label_w = top * max(1, -(-min_tile // top)), 56
    n, rows, text_h = levels[0].shape[0], len(levels), 14 if captions else 0
    fig = Image.new("RGB", (label_w + n * (tile + 2), rows * (tile + 2) + text_h + 2), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    for r, x in enumerate(levels):
        k = tile // x.shape[-1]
        a = to_uint8(x.float())
        draw.text((4, r * (tile + 2) + tile // 2 - 6), f"{x.shape[-1]}x{x.shape[-1]}", fill=(0, 0, 0))
        for i in range(n):
            img = Image.fromarray(a[i])
            img = img.resize((tile, tile), Image.Resampling.NEAREST) if k > 1 else img
            fig.paste(img, (label_w + i * (tile + 2), r * (tile + 2)))
    if captions:
        for i, c in enumerate(captions):
            draw.text((label_w + i * (tile + 2), rows * (tile + 2)), c[: tile // 6], fill=(0, 0, 0))
    if path is not None:
        fig.save(path)
    return fig


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


def save_gif(clips: torch.Tensor, path, scale: int = 6, fps: int = 6):
    """Clips (N, T, 3, H, W) in [-1, 1] side by side as one looping GIF."""
    a = to_uint8(clips)                                   # (N, T, H, W, 3)
    (N, T, H, W, _), frames = a.shape, []
    for t in range(T):
        row = np.concatenate([np.pad(a[n, t], ((0, 2), (0, 2), (0, 0)), constant_values=255) for n in range(N)], 1)
        frames.append(Image.fromarray(row).resize((N * (W + 2) * scale, (H + 2) * scale), Image.Resampling.NEAREST))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def save_levels_figure(levels: list, path):
    """One clip per column block: the image level (first frame), then every frame of each
    video level, rows from the lowest level to the highest."""
    rows = [x[:1, None].float() if x.dim() == 4 else x[:1].float() for x in levels]     # (1, T, 3, H, W)
    T, top = max(r.shape[1] for r in rows), max(r.shape[-1] for r in rows)
    tiles = [torch.cat([F.interpolate(r[:, t], size=(top, top), mode="nearest") if t < r.shape[1] else
                        torch.ones(1, 3, top, top) for t in range(T)]) for r in rows]
    save_matryoshka(tiles, path, captions=[f"frame {t}" for t in range(T)])
