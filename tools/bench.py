"""
Speed and memory of a NestedUNet, against a plain UNet of the same size (appendix D.1,
Table 2: 0.52 vs 0.50 s per training iteration, 0.41 vs 0.40 s per sampling step).

The plain UNet is the NestedUNet flattened: one UNet over the same feature resolutions,
channels and attention layers, without the nesting (no inner input convs, no adapters, no
lower-resolution outputs), at the highest resolution, with as many parameters and FLOPs
(`flattened`). Every measurement runs in a fresh process (so that peak memory is its own),
with warm-up steps and the median of several repeats:

    training step   forward + backward + Adam step, in seconds, and images per second
    sampling step   one network evaluation (classifier-free guidance: condition and null
                    condition in one batch), and the sampler's own overhead: N DDIM steps
                    against N bare network evaluations of the same batch
    peak memory     CPU RSS; CUDA peak allocation on a GPU
    FLOPs           of a training step, counted by FlopCounterMode (shapes only, on the
                    meta device): TFLOP/s on every device, and model FLOPs utilisation
                    (MFU) on a GPU whose peak is known, or with --peak-flops

and the memory/speed knobs of train.py: bf16 autocast, the memory format (channels_last; nchw:
the default layout, which a CPU's base leaves for channels-last), torch.compile,
gradient checkpointing of the outer levels, gradient accumulation; and the same sizes in the
released models' architecture (release), the one release.py converts their weights into.

    python -m tools.bench                             # the CPU demo's model, batch 32
    python -m tools.bench --config MDM-S64 --batch 64 --text-channels 2048 --knobs base,compile
    python -m tools.bench --count-flops --config MDM-S64S256 --text-channels 2048   # FLOPs only
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

import torch

from diffusion import cat_conditions, make_optimizer, training_step
from helpers import options as opt
from helpers.devices import autocast as device_autocast
from helpers.devices import memory_format, prepare, reuse_freed_memory, timed
from helpers.models import build_diffusion, build_model, load_model_config
from nested_unet import GLOBAL_KEYS, NestedUNetConfig, sum_params
from tools import release

# Dense bf16 peak of the GPUs we know, for MFU (FLOP/s), without 2:4 sparsity; others: pass
# --peak-flops. Matched by substring of the device name, first match first (the PCIe H100
# before the SXM one).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


# ---------------------------------------------------------------------------------------
# The two models: the NestedUNet, and the plain UNet with its layers
# ---------------------------------------------------------------------------------------


def flattened(config: NestedUNetConfig) -> NestedUNetConfig:
    """The plain UNet of the same size: the NestedUNet's levels joined into one UNet over the
    same resolutions, channels and attention layers, with as many parameters and FLOPs.
    Where a level hands over to its inner level (both work at that resolution), the two
    stages become one stage with the res blocks of both, plus one."""
    # E.g. CPU-S16S32: the outer level [32, 16] and the inner UNet [16, 8, 4] become one UNet
    # [32, 16, 8, 4] with 1 + 1 + 1 res blocks at 16. Why the one more: a level's up path has
    # one res block more than its down path (as in ADM), so the two levels have
    # (1 + 1) + (1 + 1) = 4 up blocks at 16, and the plain UNet with 3 has 3 down and 4 up.
    # Its extra down block stands in for what only the nesting has (the two adapters, the
    # inner level's input and output convs). For every image preset, parameters and training
    # FLOPs then agree within 0.4% (with b_o + b_i blocks the NestedUNet would have 1% more
    # parameters and 5-9% more FLOPs than its baseline; test_mdm.py checks the agreement).
    levels = config.levels()[::-1]                 # highest first
    res, ch, blocks, attn = [], [], [], []
    for i, c in enumerate(levels):
        r, cc, b, a = (list(v) for v in (c.resolutions, c.resolution_channels, c.num_res_blocks,
                                         c.num_attn_layers_per_block))
        if res:                                    # merge the shared resolution
            # The inner level's width wins, and the larger attention count; both are exact for
            # the presets (equal widths, no attention at a hand-over resolution).
            blocks[-1] += b.pop(0) + 1
            attn[-1] = max(attn[-1], a.pop(0))
            ch[-1] = cc.pop(0)
            r.pop(0)
        res, ch, blocks, attn = res + r, ch + cc, blocks + b, attn + a
    # The whole-model keys (embedding, conditioning) are shared; the one level is a base level
    # ("cosine"), which changes the diffusion's schedule but not the cost of a step.
    globals_ = {k: getattr(config, k) for k in (*GLOBAL_KEYS, "num_heads")}
    base = config.schedule.split("-shift")[0]
    return type(config)(resolutions=res, resolution_channels=ch, num_res_blocks=blocks,
                        num_attn_layers_per_block=attn, schedule=base, **globals_)


def harness(spec: dict, kind: str) -> dict:
    """The model of `kind` ("nested" or "plain") with spec's knobs, and the timed actions on
    one fixed batch:

        train_step   forward + backward + clipping + Adam step
        net_eval     one network evaluation of a guided sampling step (condition and null
                     condition in one batch, as diffusion.sample calls the network)
        sample       a whole DDIM sampling run of spec["sample_steps"] steps
        count_flops  the FLOPs of one forward + backward, counted on the eager model

    spec: config (a preset name), batch, device, and optionally text_channels or num_classes
    (the conditioning), truncate (train only the levels up to this resolution), bf16,
    channels_last, compile, grad_ckpt, accum, sample_steps, release."""
    device = torch.device(spec["device"])
    if device.type == "cpu":
        reuse_freed_memory()                       # as train.py's set-up does on a CPU
    torch.manual_seed(0)                           # the same weights and batch in every process
    # The "release" knob: the same sizes in the released models' architecture (strided
    # downsampling, a second softmax for the text, GroupNorm feed-forward, one time MLP per
    # level, ...), the one that tools/release.py converts into.
    cfg = dataclasses.replace(load_model_config(spec["config"]), text_channels=spec.get("text_channels", 0),
                              num_classes=spec.get("num_classes", 0))
    cfg = release.released(cfg) if spec.get("release") else cfg
    if spec.get("truncate"):
        cfg = cfg.truncated(spec["truncate"])      # the low-resolution stage of progressive training
    if kind == "plain":
        cfg = flattened(cfg)
    model = build_model(cfg)
    if spec.get("grad_ckpt"):
        # As train.py --grad-ckpt: every level but the innermost recomputes its activations in
        # the backward pass; the outer levels' high-resolution activations are the big ones.
        for level in model.levels()[1:]:
            level.gradient_checkpointing = True
    B, accum = spec["batch"], spec.get("accum", 1)
    cl = memory_format(spec.get("channels_last", "auto"), device)       # train.py's --channels-last
    model = prepare(model, device, spec.get("channels_last", "auto"))
    # `run` is what is timed (compiled or not); `model` stays eager, for FLOPs and parameters.
    run = torch.compile(model) if spec.get("compile") else model
    diffusion = build_diffusion(model)
    opt = make_optimizer(model, 1e-4)                            # train.py's Adam, the paper's learning rate
    R = model.resolutions[-1]
    # Random pixels: the content of a batch does not change the time of a step.
    x = (torch.rand(B, 3, R, R, device=device) * 2 - 1).contiguous(memory_format=cl)   # (B, 3, R, R)
    if cfg.text_channels:      # 16 text tokens, none of them padding (as data.TextEncoder gives: no mask)
        cond = {"text": torch.randn(B, 16, cfg.text_channels, device=device)}
    elif cfg.num_classes:
        cond = {"label": torch.randint(cfg.num_classes, (B,), device=device)}
    else:
        cond = {}
    autocast = device_autocast(device, "bf16") if spec.get("bf16") else nullcontext()   # as train.py autocasts

    # Gradient accumulation as in train.py: `accum` micro-batches of B / accum.
    micro = [(x[i * B // accum:(i + 1) * B // accum], {k: v[i * B // accum:(i + 1) * B // accum] for k, v in cond.items()},
              None, None, None) for i in range(accum)]

    def train_step():
        # train.py's step (diffusion.training_step): the loss, backward, clipping, Adam.
        model.train()
        training_step(diffusion, model, opt, micro, run, autocast=autocast)

    def loss_backward(net):
        for mb_x, mb_cond, *_ in micro:
            with autocast:
                (diffusion.loss(net, mb_x, mb_cond)[0] / accum).backward()

    def count_flops() -> int:
        # The "model FLOPs" of MFU: the matrix multiplications, convolutions and attention of
        # one forward and backward pass (FlopCounterMode counts those aten ops; norms,
        # activations and the optimizer are left out, as in MFU's usual definition). Counted
        # on the eager model: a compiled graph runs fused kernels that the counter cannot see.
        # FlopCounterMode knows the GPU attention kernels (flash, memory-efficient, cuDNN) but
        # not the CPU one; on a CPU the attention runs as plain batched matmuls to be counted.
        # Gradient checkpointing is switched off for the count: its recomputed forward pass is
        # work the hardware does, not FLOPs the model needs, and MFU counts the latter.
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode
        model.train()
        ckpt = [level.gradient_checkpointing for level in model.levels()]
        for level in model.levels():
            level.gradient_checkpointing = False
        kernels = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()
        with FlopCounterMode(display=False) as fc, kernels:
            loss_backward(model)
        opt.zero_grad(set_to_none=True)
        for level, c in zip(model.levels(), ckpt):
            level.gradient_checkpointing = c
        return fc.get_total_flops()

    # One guided network evaluation's inputs, as diffusion.predict_v builds them: each level's
    # z (B, 3, r, r) doubled to 2B rows, the condition in the first half and the null condition
    # in the second (an unconditional model: B rows, no guidance); t = 0.5 (it costs the same).
    zs = [torch.randn(s, device=device) for s in model.input_shapes(B)]
    # The null condition: no visible token (ours), or for the released models' architecture
    # the encoded empty prompt, here 2 tokens of random features (the cost is the same).
    if cond and model.null_text == "empty_prompt":
        null = {"text": torch.randn(B, 2, cfg.text_channels, device=device)}
        both = cat_conditions(cond, null)
    else:
        both = cat_conditions(cond, model.null_condition(cond, torch.ones(B, dtype=torch.bool))) if cond else {}
    zz = [torch.cat([z, z]) for z in zs] if cond else zs
    tt = torch.full((zz[0].shape[0],), 0.5, device=device)

    @torch.no_grad()
    def net_eval():
        model.eval()
        with autocast:
            run(zz, tt, **both)

    @torch.no_grad()
    def sample():
        # A whole DDIM run, guided at sample.py's default scale of 3, dynamic thresholding on: its
        # time over sample_steps network evaluations shows what the sampler itself adds.
        model.eval()
        with autocast:
            diffusion.sample(run, cond, batch_size=B, sampler="ddim", num_inference_steps=spec.get("sample_steps", 20),
                             guidance_scale=3.0 if cond else 1.0, negative_cond=null if cond and model.null_text ==
                             "empty_prompt" else None)

    return dict(model=model, train_step=train_step, net_eval=net_eval, sample=sample, count_flops=count_flops)


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------

def in_fresh_process(fn, spec: dict):
    """fn(spec) in a new Python process (spawned, not forked: nothing of this one's memory),
    so that its peak memory is its own. Returns its result; raises what it raised, or
    BrokenProcessPool when it died (e.g. out of memory)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, spec).result()


def measure(spec: dict) -> dict:
    """One measurement, in this process (so that peak memory is its own)."""
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    h = harness(spec, spec["model"])
    result = {**spec, "params": sum_params(h["model"])}
    # Warm-up steps are thrown away: the first ones pay for memory allocation, kernel
    # selection and torch.compile's compilation. The median ignores a step slowed by the machine.
    timed(h["train_step"], spec["warmup"], device)
    t = statistics.median(timed(h["train_step"], spec["repeats"], device))
    result.update(train_step_s=t, images_per_s=spec["batch"] / t)
    if spec.get("sampling", True):
        # A whole run is sample_steps evaluations, so it is repeated less; the overhead is the
        # fraction of its time spent beyond them (thresholding, the update, Python).
        timed(h["net_eval"], spec["warmup"], device)
        t_eval = statistics.median(timed(h["net_eval"], spec["repeats"], device))
        t_sample = statistics.median(timed(h["sample"], max(1, spec["repeats"] // 3), device))
        result.update(sample_step_s=t_eval, sampler_overhead=t_sample / (spec["sample_steps"] * t_eval) - 1)
    # ru_maxrss is this process's peak resident memory over its whole life (KiB on Linux): the
    # reason every measurement runs in a process of its own. Both peaks cover the timed steps
    # above, and are read before the FLOP count below runs an eager step.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        # The most PyTorch's allocator handed out: tensors only, without its cache or the CUDA
        # context (less than nvidia-smi shows).
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    if spec.get("flops", True):
        # Model FLOPs utilisation: the FLOPs a step needs over the time it took, as a
        # fraction of what the chip can do (its dense bf16 peak, or --peak-flops). Counted on
        # a copy of the model on the meta device: one more full step on the GPU could run out
        # of the memory that the gradient-checkpointing row was there to save.
        shapes_only = {**spec, "device": "meta", "bf16": False, "compile": False, "channels_last": False}
        result["train_flops"] = harness(shapes_only, spec["model"])["count_flops"]()
        result["train_tflop_per_s"] = result["train_flops"] / t / 1e12
        peak = spec.get("peak_flops")
        if not peak and device.type == "cuda" and spec.get("bf16"):   # the table holds bf16 peaks
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak:
            result["mfu"] = result["train_flops"] / t / peak
    return result


def paired(spec: dict) -> dict:
    """The NestedUNet/plain UNet time ratio, measured in one process with the two models'
    steps interleaved (nested, plain, plain, nested, ...): a machine that slows down for a
    while (another job, the clock) slows both alike, which separate runs cannot promise.
    Returns the median of the per-round ratios."""
    device = torch.device(spec["device"])
    # Both models in memory at once: a ratio of times only, no memory figures from here.
    runs = {k: harness(spec, k) for k in ("nested", "plain")}
    ratios = {}
    # "sample" is one guided network evaluation, the paper's sec/step of inference (Table 2).
    for what, action in (("train", "train_step"), ("sample", "net_eval")):
        for k in runs:
            timed(runs[k][action], spec["warmup"], device)
        r = []
        for rnd in range(spec["repeats"]):
            # The order alternates, so that whatever favours the first (or second) step of a
            # round, such as warm caches or a clock that ramps up, favours both models alike.
            order = ("nested", "plain") if rnd % 2 == 0 else ("plain", "nested")
            t = {k: timed(runs[k][action], 1, device)[0] for k in order}
            r.append(t["nested"] / t["plain"])
        ratios[what] = statistics.median(r)
    return ratios


# ---------------------------------------------------------------------------------------
# The script: one fresh process per measurement, then the table and bench.json
# ---------------------------------------------------------------------------------------

KNOBS = {"base": {}, "bf16": {"bf16": True}, "fp32": {"bf16": False}, "channels_last": {"channels_last": "on"},
         "nchw": {"channels_last": "off"},
         "grad_ckpt": {"grad_ckpt": True, "sampling": False}, "accum2": {"accum": 2, "sampling": False},
         "compile": {"compile": True},            # grad_ckpt and accum2 change training only
         "release": {"release": True}}


def check_args(a):
    """Every flag, checked before the first measurement: one line each."""
    opt.check_flags("tools/bench.py", a, [
        ("--batch", opt.at_least(1), "a batch of at least 1"),
        ("--text-channels", opt.at_least(0), "a width >= 0 (0: no text)"),
        ("--warmup", opt.at_least(0), "a number of warm-up steps >= 0"),
        ("--repeats", opt.at_least(1), "at least 1 repeat"),
        ("--sample-steps", opt.at_least(1), "at least 1 sampling step"),
        ("--peak-flops", opt.positive, "the chip's peak in FLOP/s, e.g. 989e12"),
    ])
    opt.check_device("tools/bench.py", a.device if a.device != "meta" else None)
    try:
        load_model_config(a.config)
    except ValueError as e:                        # unreadable, not JSON, not a config, not a preset
        raise SystemExit(f"tools/bench.py: {e}")
    unknown = set((a.knobs or "base").split(",")) - set(KNOBS)
    if unknown:
        raise SystemExit(f"tools/bench.py: --knobs {a.knobs}: unknown {', '.join(sorted(unknown))}; "
                         f"the knobs are {', '.join(KNOBS)}")


def main(argv=None):
    p = opt.ArgumentParser(prog="tools/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="CPU-S16S32", help="a preset of nested_unet.py, or a JSON config file "
                   "(e.g. docs/official-shape.json, the shape of the comparison with the official code)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text-channels", type=int, default=384)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--knobs", default=None, help="comma-separated: base, bf16, fp32, channels_last, nchw, grad_ckpt, "
                   "accum2, compile, release (the released models' architecture at the same sizes) (default: "
                   "all; on a CPU, whose base is float32 and channels-last, bf16 and nchw; on a GPU, fp32 and "
                   "channels_last)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="the chip's peak FLOP/s for MFU (known, dense bf16: H100 SXM and H200 989e12, "
                   "H100 NVL 835e12, H100 PCIe 756e12, A100 312e12)")
    p.add_argument("--count-flops", action="store_true", help="only count the FLOPs of a training step, per "
                   "image, for any preset: on the meta device (shapes only), in seconds, without memory")
    p.add_argument("--json", default="bench.json")
    a = p.parse_args(argv)
    check_args(a)
    # Text-conditional (MiniLM's width by default), bf16 on a GPU as train.py uses it, float32
    # on a CPU. Each knob changes one thing of the base.
    on_gpu = a.device.startswith("cuda")
    base = dict(config=a.config, batch=a.batch, device=a.device, text_channels=a.text_channels, warmup=a.warmup,
                repeats=a.repeats, sample_steps=a.sample_steps, peak_flops=a.peak_flops, bf16=on_gpu)
    a.knobs = a.knobs or (f"base,{'fp32' if on_gpu else 'bf16'},{'channels_last' if on_gpu else 'nchw'},grad_ckpt,"
                          "accum2,compile,release")
    if "accum2" in a.knobs.split(",") and a.batch % 2:
        raise SystemExit(f"tools/bench.py: --batch {a.batch}: the accum2 knob splits the batch in two: expected an even batch")
    if a.count_flops:
        # FlopCounterMode needs only shapes: on the meta device nothing is computed or stored,
        # so the paper's 450M-parameter models are counted on a laptop.
        for model in ("nested", "plain"):
            h = harness({**base, "device": "meta", "bf16": False}, model)
            per_image = h["count_flops"]() / a.batch
            print(f"{a.config} {model:<6}  {sum_params(h['model']) / 1e6:7.1f}M params  "
                  f"{per_image / 1e12:.3f} TFLOP per image per training step (forward + backward); "
                  f"40% MFU on an H100 (989 TFLOP/s bf16) = {0.4 * 989e12 / per_image:,.0f} images/s")
        return
    rows = []
    for knob in a.knobs.split(","):
        for model in ("nested", "plain"):
            if model == "plain" and knob in ("grad_ckpt",):
                continue                           # the plain UNet has no outer levels
            spec = {**base, **KNOBS[knob], "model": model, "knob": knob}
            try:
                rows.append(in_fresh_process(measure, spec))
            except Exception as e:                 # e.g. out of memory, or no compiler: the others go on
                print(f"{knob}/{model} failed: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            print(format_row(rows[-1]), flush=True)
    # The headline ratio: both models in one process, their steps interleaved, for our
    # architecture and (if asked) the release one. More rounds, as single steps scatter; an odd
    # number, so that the median is one round's ratio.
    interleaved = {}
    for knob in ("base", "release"):
        if knob in a.knobs.split(","):
            try:
                interleaved[knob] = in_fresh_process(paired, {**base, **KNOBS[knob], "repeats": 2 * a.repeats + 1})
            except Exception as e:
                print(f"interleaved measurement of {knob} failed: {type(e).__name__}: {e}", file=sys.stderr)
    report(rows, a, interleaved)


def format_row(r):
    """One measurement as one line, printed as the benchmark goes."""
    s = (f"{r['knob']:<14}{r['model']:<8}{r['params'] / 1e6:>8.2f}M  train {r['train_step_s'] * 1e3:8.1f} ms "
         f"({r['images_per_s']:7.1f} img/s)")
    if "sample_step_s" in r:
        s += f"  sample step {r['sample_step_s'] * 1e3:7.1f} ms  sampler overhead {100 * r['sampler_overhead']:+5.1f}%"
    s += f"  peak RSS {r['peak_rss_mb']:7.0f} MB"
    if "cuda_peak_mb" in r:
        s += f"  CUDA peak {r['cuda_peak_mb']:7.0f} MB"
    if "train_tflop_per_s" in r:
        s += f"  {r['train_tflop_per_s']:.3g} TFLOP/s"
    if "mfu" in r:
        s += f"  MFU {100 * r['mfu']:.1f}%"
    return s


def report(rows, a, interleaved=None):
    """NestedUNet / plain UNet ratios for each knob, printed and written to --json with the
    rows and the machine."""
    by = {(r["knob"], r["model"]): r for r in rows}
    ratios = {}
    for knob in dict.fromkeys(r["knob"] for r in rows):      # in the order measured
        n, p = by.get((knob, "nested")), by.get((knob, "plain"))
        if n and p:                                # both measured (grad_ckpt has no plain row)
            # From separate processes: each a median, but the machine may differ between them.
            ratios[knob] = {"train": n["train_step_s"] / p["train_step_s"],
                            "sample": n.get("sample_step_s", float("nan")) / p.get("sample_step_s", float("nan")),
                            "params": n["params"] / p["params"]}
    print("\nNestedUNet / plain UNet of the same size (parameters and FLOPs; the paper's Table 2 has 1.04 and 1.03):")
    for knob, v in ratios.items():
        print(f"  {knob:<14} params {v['params']:.3f}  train step {v['train']:.3f}  sampling step {v['sample']:.3f}")
    for knob, v in (interleaved or {}).items():
        print(f"  {knob:<14} interleaved in one process (the fair figure): train step {v['train']:.3f}  "
              f"sampling step {v['sample']:.3f}")
    meta = {"machine": torch.cuda.get_device_name() if a.device.startswith("cuda") else
            f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows, "ratios": ratios, "interleaved_ratios": interleaved}, f, indent=2)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
