"""
A page to watch the matryoshka denoise: a local web demo of a trained run.

The point of a Matryoshka Diffusion Model is that all its resolutions denoise together;
this page shows it as it happens. Type a prompt (or pick a class), press Generate, and every
nested resolution of every image updates while the sampler runs (a few frames per second at
most, so that drawing does not slow a CPU down); then the final images, a download link, and
the sample.py command that draws the same images. With an uploaded image it also draws around
it, as sample.py does: upscale it (an image of a lower level's size), start from it (image to
image), or inpaint it where a mask drawn on the page, or uploaded, is white.

    python -m tools.demo                                    # the newest run in runs/
    python -m tools.demo --ckpt runs/flickr64 --port 8080   # a converted released model (tools/release.py)

It listens on 127.0.0.1 only, serves only the page and what it generated (kept in memory,
the last few generations), runs one generation at a time (a second Generate while one runs
is refused; Stop, or closing the tab, stops it), and checks every value it is sent. Only the
standard library's HTTP server: no framework, nothing fetched by the page.
"""

from __future__ import annotations

import base64
import binascii
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


class Cancelled(Exception):
    """Raised inside the sampler's callback to stop a generation."""


# ---------------------------------------------------------------------------------------
# What the page may ask for, checked
# ---------------------------------------------------------------------------------------

def settings_from(request: dict, pipe: Trained) -> tuple[dict, dict]:
    """The JSON of a Generate -> the settings of one generation, every value checked, and what
    its uploaded image gives the sampler (sample.given_pixels): a ValueError says which field
    is wrong and what it expects."""
    if not isinstance(request, dict):
        raise ValueError("expected a JSON object of settings")
    s = {}

    def number(name, kind, lo, hi, default):
        value = request.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (kind is int and value != int(value)) or not lo <= value <= hi:
            raise ValueError(f"{name}: {value!r}: expected {'an integer' if kind is int else 'a number'} "
                             f"from {lo} to {hi}")
        return kind(value)
    defaults = pipe.sampling
    s["num_images"] = number("num_images", int, 1, LIMITS["images"], 4)
    s["num_inference_steps"] = number("num_inference_steps", int, 1, LIMITS["steps"], defaults["num_inference_steps"])
    s["guidance_scale"] = number("guidance_scale", float, -LIMITS["guidance"], LIMITS["guidance"],
                                 defaults["guidance_scale"])
    s["seed"] = number("seed", int, 0, LIMITS["seed"], 0)
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
        label = request.get("label")
        if label is None or isinstance(label, bool):
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
        s["strength"] = number("strength", float, 0, 1, 0.75)
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
    words = ["python", "sample.py", "--ckpt", ckpt]
    if "prompt" in s:
        words.append(s["prompt"])
    if "label" in s:
        words += ["--label", s["label"]]
    if s.get("negative_prompt"):
        words += ["--negative-prompt", s["negative_prompt"]]
    words += ["--num-images", str(s["num_images"]), "--num-inference-steps", str(s["num_inference_steps"]),
              "--sampler", s["sampler"], "--guidance-scale", f"{s['guidance_scale']:g}", "--seed", str(s["seed"])]
    words += {"upscale": ["--upscale", "image.png"], "inpaint": ["--init-image", "image.png", "--mask", "mask.png"],
              "image-to-image": ["--init-image", "image.png", "--strength", f"{s.get('strength', 0):g}"]}.get(s["mode"], [])
    return shlex.join(words)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Generations: one at a time, in a thread, their frames on a queue
# ---------------------------------------------------------------------------------------

class Job:
    def __init__(self, settings: dict, given: dict, command: str):
        self.id, self.settings, self.given, self.command = uuid.uuid4().hex[:12], settings, given, command
        self.events: queue.Queue = queue.Queue(maxsize=64)   # the page reads them; a full queue drops frames
        self.cancel, self.done = threading.Event(), threading.Event()
        self.images: dict[str, bytes] = {}

    def send(self, event: dict, drop_if_full=False):
        try:
            self.events.put(event, block=not drop_if_full, timeout=None if drop_if_full else 30)
        except queue.Full:
            pass


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
            self.running = job
            self.jobs[job.id] = job
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
            shown = pipe.class_name(s["label"]) if "label" in s else s.get("prompt", "")
            captions = [shown] * n                 # under each column: the prompt, or the class's name

            def frame(i, t, zs, x_preds):
                # After step i: every level's predicted x, drawn at most 4 times a second.
                if job.cancel.is_set():
                    raise Cancelled
                now = time.monotonic()
                if now - last[0] >= FRAME_SECONDS or i == s["num_inference_steps"] - 1:
                    last[0] = now
                    figure = save_matryoshka([x.float().cpu() for x in x_preds], None, captions=captions)
                    job.send({"type": "progress", "step": i + 1, "steps": s["num_inference_steps"], "t": t,
                              "image": "data:image/png;base64," + base64.b64encode(png(figure)).decode()},
                             drop_if_full=True)
            # sample.py's draw: the same images for the same settings and seed.
            settings = pipe.settings(sampler=s["sampler"], num_inference_steps=s["num_inference_steps"],
                                     guidance_scale=s["guidance_scale"])
            levels = draw(pipe, cond, n, s["seed"], settings, s.get("negative_prompt"), frame, precision=self.precision,
                          **job.given)
            levels = [x.float().cpu() for x in levels]
            # The grid as sample.py writes it (the same images for the same settings), and
            # every nested resolution.
            job.images["grid"] = png(save_grid(levels[-1], None, nrow=n))
            job.images["matryoshka"] = png(save_matryoshka(levels, None, captions=captions))
            job.send({"type": "done", "grid": f"/images/{job.id}/grid.png",
                      "matryoshka": f"/images/{job.id}/matryoshka.png", "command": job.command,
                      "settings": s})
        except Cancelled:
            job.send({"type": "stopped"}, drop_if_full=True)
        except NonFinite as e:
            job.send({"type": "error", "error": f"the sample turned NaN or infinite at step {e.args[0]} in "
                      f"{self.precision}: start the demo with --precision fp32"}, drop_if_full=True)
        except Exception as e:                      # a failure is said on the page, the server goes on
            job.send({"type": "error", "error": f"{type(e).__name__}: {e}"}, drop_if_full=True)
        finally:
            job.done.set()


# ---------------------------------------------------------------------------------------
# HTTP: the page, a small JSON API, server-sent events, the generated images
# ---------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    demo: Demo = None
    server_version = "matryoshka-demo"

    def log_message(self, fmt, *args):              # quiet: the terminal says where to open the page
        pass

    def reply(self, code: int, body: bytes, kind: str = "application/json"):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
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
            image = job.images.get(parts[2][:-4]) if job else None
            if image is not None:
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
        """The frames of a generation as server-sent events. If the page goes away (the tab
        closed), writing fails, and the generation is stopped."""
        job = self.demo.jobs.get(job_id)
        if job is None:
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
                    self.wfile.write(b": waiting\n\n")   # a comment line: finds a closed tab
                    self.wfile.flush()
                    continue
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                if event["type"] in ("done", "stopped", "error"):
                    return
        except (BrokenPipeError, ConnectionResetError):
            job.cancel.set()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Matryoshka Diffusion</title>
<style>
 body { font: 15px system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px }
 h1 { font-size: 20px; margin: 0 0 4px } .sub { color: #666; margin-bottom: 16px }
 form { display: grid; grid-template-columns: 170px 1fr; gap: 8px 12px; align-items: center; max-width: 640px }
 input, select { font: inherit; padding: 4px 6px } input[type=text] { width: 100% }
 .buttons { grid-column: 2; display: flex; gap: 8px } button { font: inherit; padding: 6px 18px }
 #status { margin: 14px 0; color: #333 } #error { color: #b00020; margin: 8px 0 }
 img, canvas { image-rendering: pixelated; border: 1px solid #ddd; max-width: 100% } .hidden { display: none }
 canvas { width: 256px; cursor: crosshair; background-size: 100% 100% }
 code { background: #f3f3f3; padding: 6px; display: block; white-space: pre-wrap; word-break: break-all }
</style></head><body>
<h1>Matryoshka Diffusion</h1>
<div class="sub">Every nested resolution denoises together: watch them while the sampler runs.
 <span id="model"></span></div>
<form id="form" onsubmit="return false">
 <label for="prompt" id="prompt-label">Prompt</label><input type="text" id="prompt" value="">
 <label for="label" id="label-label" class="hidden">Class</label><select id="label" class="hidden"></select>
 <label for="negative" id="negative-label">Negative prompt</label><input type="text" id="negative" value="">
 <label for="guidance">Guidance scale</label><input type="number" id="guidance" step="0.5">
 <label for="steps">Steps</label><input type="number" id="steps" min="1">
 <label for="sampler">Sampler</label><select id="sampler"></select>
 <label for="seed">Seed</label><input type="number" id="seed" value="0" min="0">
 <label for="num">Images</label><input type="number" id="num" value="4" min="1">
 <label for="mode">Draw</label><select id="mode"><option value="generate">from noise</option>
  <option value="upscale">around an image: upscale it (a lower level's size)</option>
  <option value="image-to-image">from an image (image to image)</option>
  <option value="inpaint">into an image where the mask is white (inpaint)</option></select>
 <label for="image" class="needs-image">Image</label><input type="file" id="image" accept="image/*" class="needs-image">
 <label for="strength" class="needs-strength">Strength (1: pure noise)</label>
  <input type="number" id="strength" value="0.75" min="0" max="1" step="0.05" class="needs-strength">
 <label for="mask-file" class="needs-mask">Mask: paint white below, or</label>
  <input type="file" id="mask-file" accept="image/*" class="needs-mask">
 <span class="needs-mask"></span><canvas id="mask" class="needs-mask" title="paint where to draw"></canvas>
 <div class="buttons"><button id="generate" type="button">Generate</button>
  <button id="stop" type="button" disabled>Stop</button></div>
</form>
<div id="error"></div><div id="status">Ready.</div>
<div id="live-box" class="hidden"><div>Every resolution, lowest first, as the sampler sees it now:</div>
 <img id="live" alt="the denoising, every resolution"></div>
<div id="final" class="hidden">
 <h2>The images</h2><img id="grid" alt="the images"><div><a id="download" download="matryoshka.png">Download</a>
  &middot; <a id="download-m" download="matryoshka-levels.png">every resolution</a></div>
 <h2>Every nested resolution</h2><img id="levels" alt="every nested resolution">
 <h2>The same with sample.py</h2><code id="command"></code></div>
<script>
let info = null, job = null, source = null, image = null;
const $ = (id) => document.getElementById(id);
async function load() {
  info = await (await fetch("/api/info")).json();
  $("model").textContent = "Model: " + info.ckpt + " (" + info.resolutions.map(r => r + "x" + r).join(", ") + ")";
  for (const s of info.samplers) $("sampler").add(new Option(s, s, false, s === info.defaults.sampler));
  $("guidance").value = info.defaults.guidance_scale; $("steps").value = info.defaults.num_inference_steps;
  $("num").max = info.limits.images; $("steps").max = info.limits.steps;
  if (info.kind === "label") {
    for (const [i, c] of info.classes.entries()) $("label").add(new Option(c, String(i)));
    for (const id of ["label", "label-label"]) $(id).classList.remove("hidden");
  }
  if (info.kind !== "text") for (const id of ["prompt", "prompt-label", "negative", "negative-label"]) $(id).classList.add("hidden");
  showMode();
}
function showMode() {
  const m = $("mode").value;
  for (const [cls, on] of [["needs-image", m !== "generate"], ["needs-strength", m === "image-to-image"],
                           ["needs-mask", m === "inpaint"]])
    for (const e of document.getElementsByClassName(cls)) e.classList.toggle("hidden", !on);
}
function readFile(input, then) {                 // an uploaded file as a data: URL
  const f = input.files[0]; if (!f) return;
  const r = new FileReader(); r.onload = () => then(r.result); r.readAsDataURL(f);
}
function loadMask(url, blank) {   // the mask at the image's size: clear over the image, or the mask file
  const img = new Image();
  img.onload = () => { const c = $("mask");
    if (blank) { c.width = img.width; c.height = img.height; c.style.backgroundImage = "url(" + url + ")"; }
    else c.getContext("2d").drawImage(img, 0, 0, c.width, c.height); };
  img.src = url;
}
function maskURL() {                             // black where nothing was painted
  const c = $("mask"), o = document.createElement("canvas"), g = o.getContext("2d");
  o.width = c.width; o.height = c.height; g.fillStyle = "black"; g.fillRect(0, 0, o.width, o.height);
  g.drawImage(c, 0, 0); return o.toDataURL("image/png");
}
function paint(e) {                             // white where the model should draw
  if (!(e.buttons & 1)) return;
  const c = $("mask"), r = c.getBoundingClientRect(), g = c.getContext("2d");
  g.fillStyle = "white"; g.beginPath();
  g.arc((e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height, c.width / 12, 0, 7);
  g.fill();
}
function settings() {
  const s = {guidance_scale: Number($("guidance").value), num_inference_steps: Number($("steps").value),
             sampler: $("sampler").value, seed: Number($("seed").value), num_images: Number($("num").value)};
  if (info.kind === "text") { s.prompt = $("prompt").value; if ($("negative").value) s.negative_prompt = $("negative").value; }
  if (info.kind === "label") s.label = $("label").value;
  s.mode = $("mode").value;
  if (s.mode !== "generate") s.image = image;
  if (s.mode === "image-to-image") s.strength = Number($("strength").value);
  if (s.mode === "inpaint") s.mask = maskURL();
  return s;
}
function finish(text) { $("status").textContent = text; $("generate").disabled = false; $("stop").disabled = true;
  if (source) source.close(); source = null; }
async function generate() {
  $("error").textContent = ""; $("generate").disabled = true;
  const r = await fetch("/api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(settings())});
  const reply = await r.json();
  if (!r.ok) { $("error").textContent = reply.error; $("generate").disabled = false; return; }
  job = reply.job; $("stop").disabled = false; $("final").classList.add("hidden");
  $("status").textContent = "Starting..."; $("live-box").classList.remove("hidden");
  source = new EventSource("/api/events/" + job);
  source.onmessage = (m) => {
    const e = JSON.parse(m.data);
    if (e.type === "progress") { $("live").src = e.image; window.framesSeen = (window.framesSeen || 0) + 1;
      $("status").textContent = "Step " + e.step + " of " + e.steps + " (t = " + e.t.toFixed(3) + ")"; }
    if (e.type === "done") { $("grid").src = e.grid; $("download").href = e.grid; $("download-m").href = e.matryoshka;
      $("levels").src = e.matryoshka; $("command").textContent = e.command;
      $("final").classList.remove("hidden"); finish("Done."); }
    if (e.type === "stopped") finish("Stopped.");
    if (e.type === "error") { $("error").textContent = e.error; finish("Failed."); }
  };
  source.onerror = () => { if (source) finish("The connection was lost."); };
}
$("generate").onclick = generate;
$("mode").onchange = showMode;
$("image").onchange = () => readFile($("image"), (url) => { image = url; loadMask(url, true); });
$("mask-file").onchange = () => readFile($("mask-file"), (url) => loadMask(url, false));
$("mask").onpointermove = paint; $("mask").onpointerdown = paint;
$("stop").onclick = () => { if (job) fetch("/api/stop/" + job, {method: "POST"}); };
load();
</script></body></html>
"""


def serve(ckpt=None, port: int = 8000, device=None, ready=None, precision: str = "auto"):
    """Load the run and serve the page on 127.0.0.1:port (0: a free port). `ready(port)` is
    called once it listens (the tests use it)."""
    device = setup_processes(device, join=False)[2]
    pipe = Trained(ckpt, device)
    if pipe.is_video:
        raise ValueError(f"{pipe.path} is a video model: the demo draws images (python sample.py draws clips)")
    Handler.demo = Demo(pipe, str(pipe.path.parent), precision)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    print(f"the demo of {pipe.path.parent}: open http://127.0.0.1:{port}/ in a browser "
          f"(on this machine; Ctrl-C stops it)", flush=True)
    if ready is not None:
        ready(port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


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
