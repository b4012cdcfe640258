"""Speed and memory of a NestedUNet against a plain UNet of the same size (appendix D.1, Table 2: 0.52
vs 0.50 s per training iteration, 0.41 vs 0.40 s per sampling step), and of sampling the released models.

Each measurement in a fresh process (its own peak memory): median step times, peak memory, FLOPs, MFU.

    python -m tools.bench                             # the CPU demo's model, batch 32
    python -m tools.bench --config MDM-S64 --batch 64 --text-channels 2048 --knobs base,compile
    python -m tools.bench --count-flops --config MDM-S64S256 --text-channels 2048   # FLOPs only
    python -m tools.bench --release-sampling flickr64,flickr256 --precisions fp32,bf16
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
import helpers.options as opt
from helpers.devices import autocast as device_autocast, memory_format, prepare, reuse_freed_memory, timed
from helpers.models import build_diffusion, build_model, load_model_config
from nested_unet import GLOBAL_KEYS, NestedUNetConfig, sum_params
import tools.release as release

# Dense bf16 peak FLOP/s, the first name contained in the device's (the PCIe H100 before the SXM one).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def flattened(config: NestedUNetConfig) -> NestedUNetConfig:
    """The plain UNet of the same size: the levels joined, a stage shared with the inner level getting both's
    res blocks plus one (for the adapters and inner convs); parameters and FLOPs agree within 0.5% (a test)."""
    res, ch, blocks, attn = [], [], [], []
    for c in config.levels()[::-1]:                # highest first
        r, cc, b, a = map(list, (c.resolutions, c.resolution_channels, c.num_res_blocks, c.num_attn_layers_per_block))
        if res:                                    # merge the shared resolution (the inner width wins)
            blocks[-1], attn[-1], ch[-1] = blocks[-1] + b.pop(0) + 1, max(attn[-1], a.pop(0)), cc.pop(0)
            r.pop(0)
        res, ch, blocks, attn = res + r, ch + cc, blocks + b, attn + a
    return type(config)(resolutions=res, resolution_channels=ch, num_res_blocks=blocks,
                        num_attn_layers_per_block=attn, schedule=config.schedule.split("-shift")[0],
                        **{k: getattr(config, k) for k in (*GLOBAL_KEYS, "num_heads")})


def harness(spec: dict, kind: str) -> dict:
    """The model of `kind` ("nested" or "plain") with spec's knobs (KNOBS; truncate: the levels up to this
    resolution), and train_step, net_eval (one guided evaluation), sample and count_flops on a fixed batch."""
    device = torch.device(spec["device"])
    if device.type == "cpu":
        reuse_freed_memory()                       # as train.py's set-up does on a CPU
    torch.manual_seed(0)                           # the same weights and batch in every process
    cfg = dataclasses.replace(load_model_config(spec["config"]), text_channels=spec.get("text_channels", 0),
                              num_classes=spec.get("num_classes", 0))
    cfg = release.released(cfg) if spec.get("release") else cfg
    cfg = cfg.truncated(spec["truncate"]) if spec.get("truncate") else cfg     # progressive training's stage 1
    model = build_model(flattened(cfg) if kind == "plain" else cfg)
    for level in model.levels()[1:]:               # train.py --grad-ckpt: the outer levels recompute
        level.gradient_checkpointing = bool(spec.get("grad_ckpt"))
    B, accum, layout = spec["batch"], spec.get("accum", 1), spec.get("channels_last", "auto")
    model = prepare(model, device, layout)
    run = torch.compile(model) if spec.get("compile") else model     # `model` stays eager: FLOPs, parameters
    diffusion, adam, R = build_diffusion(model), make_optimizer(model, 1e-4), model.resolutions[-1]
    x = (torch.rand(B, 3, R, R, device=device) * 2 - 1).contiguous(memory_format=memory_format(layout, device))
    cond = {"text": torch.randn(B, 16, cfg.text_channels, device=device)} if cfg.text_channels else \
        {"label": torch.randint(cfg.num_classes, (B,), device=device)} if cfg.num_classes else {}
    autocast = device_autocast(device, "bf16") if spec.get("bf16") else nullcontext()
    parts = [slice(i * B // accum, (i + 1) * B // accum) for i in range(accum)]
    micro = [(x[p], {k: v[p] for k, v in cond.items()}, None, None, None) for p in parts]
    def train_step():
        model.train()
        training_step(diffusion, model, adam, micro, run, autocast=autocast)

    def count_flops() -> int:
        # MFU's "model FLOPs" (no checkpointing recomputation); a CPU's attention as matmuls, which it counts.
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode
        model.train()
        ckpt = [level.gradient_checkpointing for level in model.levels()]
        for level in model.levels():
            level.gradient_checkpointing = False
        math_attention = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()
        with FlopCounterMode(display=False) as fc, math_attention:
            for mb_x, mb_cond, *_ in micro:
                with autocast:
                    (diffusion.loss(model, mb_x, mb_cond)[0] / accum).backward()
        adam.zero_grad(set_to_none=True)
        for level, c in zip(model.levels(), ckpt):
            level.gradient_checkpointing = c
        return fc.get_total_flops()
    # A guided evaluation, as predict_v batches it: condition and null (the releases' empty prompt: 2 tokens).
    zs = [torch.randn(s, device=device) for s in model.input_shapes(B)]
    null = {"text": torch.randn(B, 2, cfg.text_channels, device=device)} if cond and model.null_text != "mask" else None
    both = cat_conditions(cond, null or model.null_condition(cond, torch.ones(B, dtype=torch.bool))) if cond else {}
    zz = [torch.cat([z, z]) for z in zs] if cond else zs
    tt = torch.full((zz[0].shape[0],), 0.5, device=device)
    @torch.no_grad()
    def net_eval():
        model.eval()
        with autocast:
            run(zz, tt, **both)
    @torch.no_grad()
    def sample():
        model.eval()
        with autocast:
            diffusion.sample(run, cond, batch_size=B, sampler="ddim", num_inference_steps=spec.get("sample_steps", 20),
                             guidance_scale=3.0 if cond else 1.0, negative_cond=null)

    return dict(model=model, train_step=train_step, net_eval=net_eval, sample=sample, count_flops=count_flops)


def in_fresh_process(fn, spec: dict):
    """fn(spec) in a new (spawned) Python process, so that its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, spec).result()


def peak_memory(device) -> dict:
    """Peak resident memory (ru_maxrss: KiB on Linux), and CUDA's allocated peak (less than nvidia-smi's)."""
    cuda = {"cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20} if device.type == "cuda" else {}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **cuda}


def measure(spec: dict) -> dict:
    """One measurement in this process: warm-up steps (allocation, kernels, compilation), then the median."""
    device, h = torch.device(spec["device"]), harness(spec, spec["model"])
    result = {**spec, "params": sum_params(h["model"])}
    timed(h["train_step"], spec["warmup"], device)
    t = statistics.median(timed(h["train_step"], spec["repeats"], device))
    result.update(train_step_s=t, images_per_s=spec["batch"] / t)
    if spec.get("sampling", True):                 # the overhead: a DDIM run beyond its network evaluations
        timed(h["net_eval"], spec["warmup"], device)
        t_eval = statistics.median(timed(h["net_eval"], spec["repeats"], device))
        t_sample = statistics.median(timed(h["sample"], max(1, spec["repeats"] // 3), device))
        result.update(sample_step_s=t_eval, sampler_overhead=t_sample / (spec["sample_steps"] * t_eval) - 1)
    result.update(peak_memory(device))
    if spec.get("flops", True):
        # Counted on the meta device: one more full step on a GPU could run out of memory.
        shapes_only = {**spec, "device": "meta", "bf16": False, "compile": False, "channels_last": False}
        result["train_flops"] = harness(shapes_only, spec["model"])["count_flops"]()
        result["train_tflop_per_s"] = result["train_flops"] / t / 1e12
        peak = spec.get("peak_flops")
        if not peak and device.type == "cuda" and spec.get("bf16"):
            peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name(device)), None)
        if peak:
            result["mfu"] = result["train_flops"] / t / peak
    return result


def paired(spec: dict) -> dict:
    """Median NestedUNet / plain UNet time ratios, steps interleaved in one process: a slow spell slows both."""
    device, runs, ratios = torch.device(spec["device"]), {k: harness(spec, k) for k in ("nested", "plain")}, {}
    for what, action in (("train", "train_step"), ("sample", "net_eval")):
        for k in runs:
            timed(runs[k][action], spec["warmup"], device)
        r = []
        for rnd in range(spec["repeats"]):
            t = {k: timed(runs[k][action], 1, device)[0] for k in (("nested", "plain"), ("plain", "nested"))[rnd % 2]}
            r.append(t["nested"] / t["plain"])
        ratios[what] = statistics.median(r)
    return ratios


def release_sampling(spec: dict) -> dict:
    """A released model at real size (random weights), one guided sample: s/step, peak memory, its images."""
    device = torch.device(spec["device"])
    if device.type == "cpu":
        reuse_freed_memory()
    torch.manual_seed(0)
    model = release.ReleasedNestedUNet(release.preset(release.RELEASES[spec["release"]]["preset"]))
    for p in [p for p in model.parameters() if p.dim() > 1]:     # random weights (zero-initialised ones too)
        torch.nn.init.normal_(p, std=0.02)
    model = prepare(model, device).eval()
    diffusion, g = build_diffusion(model), torch.Generator().manual_seed(1)
    cond, null = ({"text": torch.randn(1, L, 2048, generator=g).to(device)} for L in (12, 2))
    times = []                                     # when each step ends
    with torch.no_grad(), device_autocast(device, spec["precision"]):
        levels = diffusion.sample(model, cond, batch_size=1, sampler="ddim", num_inference_steps=spec["steps"],
                                  guidance_scale=7.5, negative_cond=null,
                                  generator=torch.Generator(device).manual_seed(0),
                                  callback=lambda *_: times.append(time.perf_counter()))
    return {**spec, "params": sum_params(model), "step_s": statistics.median(b - a for a, b in zip(times, times[1:])),
            "finite": all(bool(torch.isfinite(x).all()) for x in levels), **peak_memory(device),
            "images": [x.float().cpu() for x in levels]}


KNOBS = {"base": {}, "bf16": {"bf16": True}, "fp32": {"bf16": False}, "channels_last": {"channels_last": "on"},
         "nchw": {"channels_last": "off"}, "grad_ckpt": {"grad_ckpt": True, "sampling": False},
         "accum2": {"accum": 2, "sampling": False}, "compile": {"compile": True}, "release": {"release": True}}


def check_args(a):
    """Every flag, checked before the first measurement: one line each."""
    opt.check_flags("tools/bench.py", a, [("--batch", opt.at_least(1), "a batch of at least 1"),
                                          ("--text-channels", opt.at_least(0), "a width >= 0 (0: no text)"),
                                          ("--warmup", opt.at_least(0), "a number of warm-up steps >= 0"),
                                          ("--repeats", opt.at_least(1), "at least 1 repeat"),
                                          ("--sample-steps", opt.at_least(1), "at least 1 sampling step"),
                                          ("--peak-flops", opt.positive, "the chip's peak in FLOP/s, e.g. 989e12")])
    opt.check_device("tools/bench.py", a.device if a.device != "meta" else None)
    try:
        load_model_config(a.config)
    except ValueError as e:                        # unreadable, not JSON, not a config, not a preset
        raise SystemExit(f"tools/bench.py: {e}")
    for flag, value, known in (("--knobs", a.knobs, KNOBS),
                               ("--release-sampling", a.release_sampling, release.RELEASES),
                               ("--precisions", a.precisions, ("fp32", "bf16", "fp16"))):
        if unknown := set((value or "").split(",")) - set(known) - {""}:
            raise SystemExit(f"tools/bench.py: {flag} {value}: unknown {', '.join(sorted(unknown))}; "
                             f"expected some of {', '.join(known)}")
    if "accum2" in a.knobs.split(",") and a.batch % 2:
        raise SystemExit(f"tools/bench.py: --batch {a.batch}: the accum2 knob splits the batch in two: "
                         f"expected an even batch")


def main(argv=None):
    p = opt.ArgumentParser(prog="tools/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="CPU-S16S32", help="a preset, or a JSON config (e.g. docs/official-shape.json)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for flag, default in (("--text-channels", 384), ("--warmup", 3), ("--repeats", 9), ("--sample-steps", 20)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--knobs", default=None, help="comma-separated: " + ", ".join(KNOBS) + " (default: all)")
    p.add_argument("--peak-flops", type=float, default=None, help="the chip's dense bf16 peak FLOP/s for MFU "
                   "(known: " + ", ".join(f"{k} {v:.0e}" for k, v in PEAK_BF16.items()) + ")")
    p.add_argument("--count-flops", action="store_true", help="only count a training step's FLOPs per image "
                   "(on the meta device: the paper's models in seconds)")
    p.add_argument("--release-sampling", default=None, help="instead: sample the released models at their real "
                   "size, random weights (e.g. flickr64,flickr256)")
    p.add_argument("--precisions", default="fp32,bf16", help="of --release-sampling: fp32, bf16, fp16")
    p.add_argument("--json", default="bench.json")
    a = p.parse_args(argv)
    on_gpu = a.device.startswith("cuda")
    a.knobs = a.knobs or f"base,{'fp32,channels_last' if on_gpu else 'bf16,nchw'},grad_ckpt,accum2,compile,release"
    check_args(a)
    base = dict(config=a.config, batch=a.batch, device=a.device, text_channels=a.text_channels, warmup=a.warmup,
                repeats=a.repeats, sample_steps=a.sample_steps, peak_flops=a.peak_flops, bf16=on_gpu)
    if a.count_flops:
        for model in ("nested", "plain"):
            h = harness({**base, "device": "meta", "bf16": False}, model)
            per_image = h["count_flops"]() / a.batch
            print(f"{a.config} {model:<6}  {sum_params(h['model']) / 1e6:7.1f}M params  "
                  f"{per_image / 1e12:.3f} TFLOP per image per training step (forward + backward); "
                  f"40% MFU on an H100 (989 TFLOP/s bf16) = {0.4 * 989e12 / per_image:,.0f} images/s")
        return
    if a.release_sampling:
        return report_release_sampling(a)
    rows, knobs = [], a.knobs.split(",")
    for knob in knobs:
        for model in ("nested", "plain") if knob != "grad_ckpt" else ("nested",):   # plain: no outer levels
            try:
                rows.append(in_fresh_process(measure, {**base, **KNOBS[knob], "model": model, "knob": knob}))
            except Exception as e:                 # e.g. out of memory, or no compiler: the others go on
                print(f"{knob}/{model} failed: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            print(format_row(rows[-1]), flush=True)
    interleaved = {}                               # the fair figures: an odd number of rounds
    for knob in [k for k in ("base", "release") if k in knobs]:
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
    for key, fmt in (("cuda_peak_mb", "  CUDA peak {:7.0f} MB"), ("train_tflop_per_s", "  {:.3g} TFLOP/s")):
        s += fmt.format(r[key]) if key in r else ""
    return s + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")


def machine(a) -> dict:
    return {"machine": torch.cuda.get_device_name() if a.device.startswith("cuda") else
            f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def report(rows, a, interleaved=None):
    """NestedUNet / plain UNet ratios for each knob, printed and written to --json with the rows."""
    by = {(r["knob"], r["model"]): r for r in rows}
    ratios = {knob: {"train": n["train_step_s"] / p["train_step_s"],
                     "sample": n.get("sample_step_s", float("nan")) / p.get("sample_step_s", float("nan")),
                     "params": n["params"] / p["params"]}
              for knob in dict.fromkeys(r["knob"] for r in rows)
              if (n := by.get((knob, "nested"))) and (p := by.get((knob, "plain")))}
    print("\nNestedUNet / plain UNet of the same size (parameters and FLOPs; the paper's Table 2 has 1.04 and 1.03):")
    for knob, v in ratios.items():
        print(f"  {knob:<14} params {v['params']:.3f}  train step {v['train']:.3f}  sampling step {v['sample']:.3f}")
    for knob, v in (interleaved or {}).items():
        print(f"  {knob:<14} interleaved in one process (the fair figure): train step {v['train']:.3f}  "
              f"sampling step {v['sample']:.3f}")
    with open(a.json, "w") as f:
        json.dump({"meta": machine(a), "rows": rows, "ratios": ratios, "interleaved_ratios": interleaved}, f, indent=2)
    print(f"wrote {a.json}")


def report_release_sampling(a):
    """Each release in each precision (a fresh process each), and each level's difference to fp32."""
    rows = []
    for name in a.release_sampling.split(","):
        images = {}
        for precision in a.precisions.split(","):
            r = in_fresh_process(release_sampling, dict(release=name, precision=precision, steps=a.sample_steps,
                                                        device=a.device))
            images[precision] = mine = r.pop("images")
            if "fp32" in images and precision != "fp32":
                r["max_abs_diff_to_fp32"] = [float((x - y).abs().max()) for x, y in zip(mine, images["fp32"])]
            rows.append(r)
            diff = r.get("max_abs_diff_to_fp32")
            print(f"{name:<11}{precision:<6}{r['params'] / 1e6:7.1f}M  {r['step_s']:8.2f} s/step  peak RSS "
                  f"{r['peak_rss_mb']:8.0f} MB  finite {r['finite']}  "
                  f"{'' if diff is None else f'diff to fp32 {[round(d, 4) for d in diff]}'}", flush=True)
    with open(a.json, "w") as f:
        json.dump({"meta": machine(a), "release_sampling": rows}, f, indent=2)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
