"""A page to watch the matryoshka denoise: a local web demo of a trained run. Type a prompt (or pick a
class), press Generate, and every nested resolution of every image updates while the sampler runs (at
most 4 frames a second); then the images, and the sample.py command that draws the same. With an
uploaded image it draws around it as sample.py does: upscales it, starts from it, or inpaints it where
a mask, painted on the page or uploaded, is white.

    python -m tools.demo                                    # the newest run in runs/
    python -m tools.demo --ckpt runs/flickr64 --port 8080   # a converted released model

It listens on 127.0.0.1 only, serves only the page (demo.html) and what it generated (the last few
generations, in memory), runs one generation at a time (Stop, or closing the tab, stops it), and
checks every value it is sent. The standard library's HTTP server; nothing fetched.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import math
import queue
import shlex
import threading
import time
import uuid
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helpers.options as opt
from diffusion import SAMPLERS
from helpers.devices import resolve_precision, setup_processes
from helpers.models import Trained
from helpers.pictures import save_grid, save_matryoshka
from sample import NonFinite, draw, given_pixels, read_image

LIMITS = dict(prompt_chars=1000, images=16, steps=1000, guidance=100.0, seed=2 ** 31 - 1, body_bytes=8 << 20,
              image_side=2048)
MODES = ("generate", "upscale", "image-to-image", "inpaint")      # the last three draw around an uploaded image
KEEP = 8                 # generations kept in memory (their images), the oldest dropped first
FRAME_SECONDS = 0.25     # at most 4 preview frames per second
PAGE = (Path(__file__).parent / "demo.html").read_text(encoding="utf-8")    # the page, its script and style


class Cancelled(Exception):
    """Raised in the sampler's callback: the generation was stopped."""


def settings_from(request: dict, pipe: Trained) -> tuple[dict, dict]:
    """The JSON of a Generate -> the settings of one generation, every value checked, and what its uploaded
    image gives the sampler (sample.given_pixels); a ValueError names the field and what it expects."""
    if not isinstance(request, dict):
        raise ValueError("expected a JSON object of settings")
    s, defaults = {}, pipe.sampling

    def number(name, kind, lo, hi, default):       # s[name]: the value, or a ValueError
        value = request.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (kind is int and value != int(value)) or not lo <= value <= hi:
            raise ValueError(f"{name}: {value!r}: expected {'an integer' if kind is int else 'a number'} "
                             f"from {lo} to {hi}")
        s[name] = kind(value)
    number("num_images", int, 1, LIMITS["images"], 4)
    number("num_inference_steps", int, 1, LIMITS["steps"], defaults["num_inference_steps"])
    number("guidance_scale", float, -LIMITS["guidance"], LIMITS["guidance"], defaults["guidance_scale"])
    number("seed", int, 0, LIMITS["seed"], 0)
    s["sampler"] = request.get("sampler", defaults["sampler"])
    if s["sampler"] not in SAMPLERS:
        raise ValueError(f"sampler: {s['sampler']!r}: expected one of {', '.join(SAMPLERS)}")
    for name in ("prompt", "negative_prompt"):
        value = request.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > LIMITS["prompt_chars"]):
            raise ValueError(f"{name}: expected text of at most {LIMITS['prompt_chars']} characters")
    if pipe.kind == "text":
        s["prompt"] = request.get("prompt") or ""
        s["negative_prompt"] = request.get("negative_prompt") or None
    elif pipe.kind == "label":
        if (label := request.get("label")) is None or isinstance(label, bool):
            raise ValueError("label: this model is class-conditional: expected a class name or index")
        s["label"] = str(label)
        pipe.label_index(s["label"])               # raises ValueError for a class it does not have
    s["mode"] = request.get("mode", "generate")
    if s["mode"] not in MODES:
        raise ValueError(f"mode: {s['mode']!r}: expected one of {', '.join(MODES)}")
    if s["mode"] == "generate":
        return s, {}
    image, mask = (uploaded(request, k, 1 if k == "mask" else pipe.model.config.in_channels)
                   for k in ("image", "mask" if s["mode"] == "inpaint" else None))
    if s["mode"] == "image-to-image":
        number("strength", float, 0, 1, 0.75)
    try:
        return s, given_pixels(pipe, upscale=image if s["mode"] == "upscale" else None,
                               image=None if s["mode"] == "upscale" else image, mask=mask, strength=s.get("strength"))
    except ValueError as e:
        raise ValueError(f"{'mask' if 'mask' in str(e) else 'image'}: {e}") from None


def uploaded(request: dict, field: str | None, channels: int):
    """An uploaded image (a data: URL of its file) -> (1, C, H, W) in [-1, 1]."""
    if field is None:
        return None
    value = request.get(field)
    if not isinstance(value, str) or not value.startswith("data:image/") or ";base64," not in value:
        raise ValueError(f"{field}: expected an uploaded image (a data: URL)")
    try:
        x = read_image(base64.b64decode(value.split(";base64,", 1)[1], validate=True), channels)
    except (ValueError, binascii.Error) as e:
        raise ValueError(f"{field}: {e}") from None
    if max(x.shape[-2:]) > LIMITS["image_side"]:
        raise ValueError(f"{field}: at most {LIMITS['image_side']} pixels a side")
    return x


def command_of(s: dict, ckpt: str) -> str:
    """The sample.py command that draws the same images (from your image.png and mask.png)."""
    words = ["python", "sample.py", "--ckpt", ckpt] + ([s["prompt"]] if "prompt" in s else [])
    words += ["--label", s["label"]] if "label" in s else []
    words += ["--negative-prompt", s["negative_prompt"]] if s.get("negative_prompt") else []
    words += ["--num-images", str(s["num_images"]), "--num-inference-steps", str(s["num_inference_steps"]),
              "--sampler", s["sampler"], "--guidance-scale", f"{s['guidance_scale']:g}", "--seed", str(s["seed"])]
    words += {"upscale": ["--upscale", "image.png"], "inpaint": ["--init-image", "image.png", "--mask", "mask.png"],
              "image-to-image": ["--init-image", "image.png", "--strength", f"{s.get('strength', 0):g}"]
              }.get(s["mode"], [])
    return shlex.join(words)


def png(image) -> bytes:
    image.save(buf := io.BytesIO(), format="PNG")
    return buf.getvalue()


class Job:
    def __init__(self, settings: dict, given: dict, command: str):
        self.id, self.settings, self.given, self.command = uuid.uuid4().hex[:12], settings, given, command
        self.events: queue.Queue = queue.Queue(maxsize=64)   # the page reads them; a full queue drops frames
        self.cancel, self.done = threading.Event(), threading.Event()
        self.images: dict[str, bytes] = {}

    def send(self, event: dict, drop_if_full=False):
        with contextlib.suppress(queue.Full):
            self.events.put(event, block=not drop_if_full, timeout=None if drop_if_full else 30)


class Demo:
    """The model, the generation running now (at most one) and the last KEEP generations."""

    def __init__(self, pipe: Trained, ckpt: str, precision: str = "auto"):
        self.pipe, self.ckpt, self.precision = pipe, ckpt, resolve_precision(precision, pipe.device, pipe.fp16_ok)
        self.lock, self.running, self.jobs = threading.Lock(), None, OrderedDict()

    def start(self, settings: dict, given: dict) -> Job:
        """A new generation, or RuntimeError if one runs."""
        with self.lock:
            if self.running is not None and not self.running.done.is_set():
                raise RuntimeError("a generation is running: wait for it, or stop it")
            job = Job(settings, given, command_of(settings, self.ckpt))
            self.running = self.jobs[job.id] = job
            while len(self.jobs) > KEEP:            # bounded: the oldest generations go
                self.jobs.popitem(last=False)
        threading.Thread(target=self.run, args=(job,), daemon=True).start()
        return job

    def run(self, job: Job):
        s, pipe = job.settings, self.pipe
        try:
            # settings_from gave a prompt to a text model only, a label to a class-conditional one
            n, last = s["num_images"], [0.0]
            cond = pipe.condition(prompts=[s["prompt"]] if "prompt" in s else None,
                                  labels=[s["label"]] if "label" in s else None, repeat=n)
            # under each column: the prompt, or the class's name
            captions = [pipe.class_name(s["label"]) if "label" in s else s.get("prompt", "")] * n

            def frame(i, t, zs, x_preds):          # after step i: every level's predicted x
                if job.cancel.is_set():
                    raise Cancelled
                if (now := time.monotonic()) - last[0] >= FRAME_SECONDS or i == s["num_inference_steps"] - 1:
                    last[0] = now
                    figure = save_matryoshka([x.float().cpu() for x in x_preds], None, captions=captions)
                    job.send({"type": "progress", "step": i + 1, "steps": s["num_inference_steps"], "t": t,
                              "image": "data:image/png;base64," + base64.b64encode(png(figure)).decode()},
                             drop_if_full=True)
            # sample.py's draw: its images for the same settings and seed; the grid and every nested resolution
            settings = pipe.settings(**{k: s[k] for k in ("sampler", "num_inference_steps", "guidance_scale")})
            levels = [x.float().cpu() for x in draw(pipe, cond, n, s["seed"], settings, s.get("negative_prompt"),
                                                    frame, precision=self.precision, **job.given)]
            job.images["grid"] = png(save_grid(levels[-1], None, nrow=n))
            job.images["matryoshka"] = png(save_matryoshka(levels, None, captions=captions))
            job.send({"type": "done", "grid": f"/images/{job.id}/grid.png",
                      "matryoshka": f"/images/{job.id}/matryoshka.png", "command": job.command, "settings": s})
        except Cancelled:
            job.send({"type": "stopped"}, drop_if_full=True)
        except NonFinite as e:
            job.send({"type": "error", "error": f"the sample turned NaN or infinite at step {e.args[0]} in "
                      f"{self.precision}: start the demo with --precision fp32"}, drop_if_full=True)
        except Exception as e:                      # a failure is said on the page, the server goes on
            job.send({"type": "error", "error": f"{type(e).__name__}: {e}"}, drop_if_full=True)
        finally:
            job.done.set()


class Handler(BaseHTTPRequestHandler):
    demo: Demo = None
    server_version = "matryoshka-demo"

    def log_message(self, fmt, *args):              # quiet: the terminal says where to open the page
        pass

    def reply(self, code: int, body: bytes, kind: str = "application/json"):
        self.send_response(code)
        for header in ("Content-Type", kind), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"):
            self.send_header(*header)
        self.end_headers()
        self.wfile.write(body)

    def json(self, code: int, obj):
        self.reply(code, json.dumps(obj).encode())

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/":
            return self.reply(200, PAGE.encode(), "text/html; charset=utf-8")
        if path == "/api/info":
            pipe = self.demo.pipe
            return self.json(200, {"kind": pipe.kind, "classes": pipe.class_names, "defaults": pipe.sampling,
                                   "samplers": list(SAMPLERS), "limits": LIMITS, "ckpt": self.demo.ckpt,
                                   "resolutions": pipe.model.resolutions})
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[:2] == ["api", "events"]:
            return self.events(parts[2])
        if len(parts) == 3 and parts[0] == "images" and parts[2] in ("grid.png", "matryoshka.png"):
            job = self.demo.jobs.get(parts[1])
            if (image := job and job.images.get(parts[2][:-4])) is not None:
                return self.reply(200, image, "image/png")
        self.json(404, {"error": "not found"})     # nothing else is served: no files from disk

    def do_POST(self):
        path = self.path.split("?")[0]
        length = int(self.headers.get("Content-Length") or 0)
        if length > LIMITS["body_bytes"]:        # read (up to twice the limit) so that the client hears why
            self.rfile.read(min(length, 2 * LIMITS["body_bytes"]))
            return self.json(413, {"error": f"at most {LIMITS['body_bytes']} bytes of settings and images"})
        body = self.rfile.read(length)
        if path == "/api/generate":
            try:
                settings, given = settings_from(json.loads(body or b"{}"), self.demo.pipe)
            except (ValueError, UnicodeDecodeError) as e:    # json.JSONDecodeError is a ValueError
                return self.json(400, {"error": str(e)})
            try:
                job = self.demo.start(settings, given)
            except RuntimeError as e:
                return self.json(409, {"error": str(e)})
            return self.json(202, {"job": job.id, "command": job.command})
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[:2] == ["api", "stop"] and parts[2] in self.demo.jobs:
            self.demo.jobs[parts[2]].cancel.set()
            return self.json(200, {"stopped": parts[2]})
        self.json(404, {"error": "not found"})

    def events(self, job_id: str):
        """A generation's frames as server-sent events; a closed tab makes a write fail, which stops it."""
        if (job := self.demo.jobs.get(job_id)) is None:
            return self.json(404, {"error": "no such generation"})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            while True:
                try:
                    event = job.events.get(timeout=1.0)
                except queue.Empty:
                    if job.done.is_set() and job.events.empty():
                        return
                    event = None                   # a comment line, ": waiting", finds a closed tab
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode() if event else b": waiting\n\n")
                self.wfile.flush()
                if event and event["type"] in ("done", "stopped", "error"):
                    return
        except (BrokenPipeError, ConnectionResetError):
            job.cancel.set()


def serve(ckpt=None, port: int = 8000, device=None, ready=None, precision: str = "auto"):
    """Serve the run's page on 127.0.0.1:port (0: a free port); `ready(port)` (for the tests) once it listens."""
    pipe = Trained(ckpt, setup_processes(device, join=False)[2])
    if pipe.is_video:
        raise ValueError(f"{pipe.path} is a video model: the demo draws images (python sample.py draws clips)")
    Handler.demo = Demo(pipe, str(pipe.path.parent), precision)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    port = server.server_address[1]
    print(f"the demo of {pipe.path.parent}: open http://127.0.0.1:{port}/ in a browser "
          f"(on this machine; Ctrl-C stops it)", flush=True)
    if ready is not None:
        ready(port)
    with server, contextlib.suppress(KeyboardInterrupt):    # Ctrl-C: close the server, quietly
        server.serve_forever()


def main(argv=None):
    p = opt.ArgumentParser(prog="tools/demo.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="a run folder or ema.safetensors (default: the newest run in runs/)")
    p.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 (0: a free one)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if there is one)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="of the network, as sample.py's (auto: a released model never fp16)")
    a = p.parse_args(argv)
    opt.check_flags("tools/demo.py", a, [("--port", lambda v: 0 <= v <= 65535, "a port from 0 to 65535")])
    opt.check_device("tools/demo.py", a.device)
    try:
        serve(a.ckpt, a.port, a.device, precision=a.precision)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"tools/demo.py: {e}")
    except OSError as e:                           # the port is taken
        raise SystemExit(f"tools/demo.py: --port {a.port}: cannot listen there ({e.strerror}); pick another, or 0")


if __name__ == "__main__":
    main()
