"""The HTTP server: OpenAI-compatible image endpoints over the batching Engine (serve/engine.py).

    POST /v1/images/edits         multipart, as OpenAI's Images API: image, optional mask, prompt, n, size,
                                  response_format (b64_json | url); OpenAI's other fields are checked, then ignored
                                  (inputs.EDIT_IGNORED) or refused when they ask for streaming, non-PNG output or
                                  transparency
    POST /v1/images/generations   JSON, as OpenAI's Images API (ignored: inputs.GENERATE_IGNORED)
    POST /v1/inpaint              JSON, every Pipeline.inpaint option; images as base64 PNG/JPEG/WebP; with
                                  --controlnet, control_image (required) and the ControlNet options (serve/control.py);
                                  with --ip-adapter, ip_adapter_image (required: serve/image_prompt.py)
    GET  /v1/files/<id>.png       the images of `response_format: "url"` responses (kept in memory, see serve/files.py)
    GET  /v1/models, /v1/models/<id>   the one model served, as OpenAI's Model objects
    GET  /healthz (process up), /readyz (model loaded and warmed up), /metrics (Prometheus text)

Conventions. Edits follow OpenAI: alpha 0 in the mask PNG (or, without a mask, in the image itself) marks what to
repaint, so an RGBA product cut-out gets a new backdrop and its opaque pixels come back bit-identical
(diffusion/crop_paste.py). Extensions, ignored by OpenAI clients: `seed` (request field; item j gets seed + j) and
`negative_prompt`; every returned image carries its `seed`. An edit whose mask (or image) has no alpha-0 pixel is
refused: it marks nothing to edit. response_format defaults to b64_json (gpt-image's behaviour); "url" answers with
http URLs served by this server for `FileStore.ttl` seconds (refused when max_files is 0, as behind several Ray Serve
replicas). Responses carry OpenAI's `created`, `size`, `background` ("opaque") and `output_format` ("png"); not
`usage` (no tokens are counted) nor `quality`. Sizes: generations take a bucket "WxH" with W, H in {native, 2 x
native} of the model (512x512, 1024x512, ... for SD1.5; 64x64 ... 128x128 for the tiny model) or "auto" (native);
edits keep the input image's own size, so `size` may only repeat it. A server started with --controlnet runs its
ControlNets in every call, and OpenAI's endpoints cannot carry the control image that needs: there they answer 400
(param control_image) saying to use /v1/inpaint with control_image; the same for --ip-adapter and its image prompt.

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for bad fields and undecodable, too
small or too large images or mismatched masks; 413 for bodies over the limit (Content-Length checked before reading,
streamed bodies counted and cut); 429 + Retry-After when the queue is full; 504 past the deadline and 500 when the
model fails on a request alone, both with `x-should-retry: false` (the openai client would otherwise queue the same
work twice more); 499 (logged only) when the client left, which drops its request from the queue and its batch. Bad
input never reaches the model: everything a batch needs is validated before it is queued, so one request cannot fail
another's batch (and should the model fail all the same, the engine runs the batch's requests again one by one:
engine.py). /metrics counts the image and file endpoints' responses, and every routing error and body-limit refusal.
Why Starlette and not FastAPI: we parse every body ourselves (limits, OpenAI error shapes instead of 422s), so
FastAPI's validation layer would be unused weight; Starlette is the ASGI toolkit FastAPI itself runs on. Measured
on the 2-core dev box under uvicorn: a JSON /healthz round trip 410-630 req/s vs FastAPI's 310-510 (3 alternating
runs each, machine shared), import 0.3 s vs 0.8 s. Both are noise next to one image, but FastAPI buys nothing here.
"""
from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import math
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from backdrop.diffusion.masks import default_mask_blur
from backdrop.diffusion.pipeline import Pipeline
from backdrop.diffusion.samplers import check_eta
from backdrop.diffusion.schedule import RECIPES, build_schedule
from backdrop.diffusion.text import check_clip_skip, clip_cut
from backdrop.serve.access import BrowserGuard, ClientGone, endpoint, log_refusal
from backdrop.serve.batcher import QueueFull, ShuttingDown
from backdrop.serve import image_prompt
from backdrop.serve.body_limit import BodyLimit, BodyTimeout, BodyTooLarge
from backdrop.serve.control import CONTROL_FIELDS, control_fields, decode_controls, refuse_openai
from backdrop.serve.engine import Engine, Item, ServeKey, controlnet_count
from backdrop.serve.files import FileStore, png_bytes
from backdrop.serve.inputs import (EDIT_IGNORED, GENERATE_IGNORED, MAX_SEED, MAX_STEPS, MIN_SIDE, OPENAI_OUTPUT,
                                   APIError, b64decode, boolean, check_fields, choice, clip, custom_schedule_fields,
                                   decode_image, edit_inputs, form_int, number, one_image, repaint_mask,
                                   require_transparency, schedule_steps, seconds, shown, size_buckets, text)
from backdrop.serve.metrics import CONTENT_TYPE

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger("backdrop.serve")

POLL_SECONDS = 0.25         # how often a waiting handler checks whether its client is still connected
MAX_JSON_CONTAINERS = 1000  # objects and arrays a JSON body may hold (a request has a few dozen)
MAX_FILE_PARTS = 17         # OpenAI's 16 images and a mask: more is the parser's error, fewer get ours (one image)
NO_RETRY = {"x-should-retry": "false"}  # the openai client retries any 5xx twice unless told not to
EDIT_FIELDS = ("mask", "prompt", "n", "size", "response_format", "seed", "negative_prompt") + OPENAI_OUTPUT
GENERATE_FIELDS = ("prompt", "n", "size", "response_format", "seed", "negative_prompt") + OPENAI_OUTPUT


# Pipeline.inpaint's defaults: what a request that leaves an option out gets, defined in one place
DEFAULT = {k: p.default for k, p in inspect.signature(Pipeline.inpaint).parameters.items() if p.default is not p.empty}


@dataclass(frozen=True)
class ServerConfig:
    steps: int = DEFAULT["steps"]        # denoising steps of OpenAI-endpoint requests (/v1/inpaint may choose)
    sampler: str = DEFAULT["sampler"]
    guidance_scale: float = DEFAULT["guidance_scale"]
    clip_skip: int = 0                   # text encoder layers to skip (diffusers' clip_skip; /v1/inpaint may choose)
    max_steps: int = 150                 # the most steps a /v1/inpaint request may ask: one request's cost is bounded
    body_timeout: float = 60.0           # seconds a request body may take to arrive, in all; then 408
    max_body_bytes: int = 32 * 2**20     # request bodies; OpenAI's own limit per image is 50 MB
    max_image_pixels: int | None = None  # None: (4 x native)^2, e.g. 2048 x 2048 for SD1.5
    max_n: int = 10                      # OpenAI's limit on n
    file_ttl: float = 3600.0             # seconds a "url" image stays downloadable
    max_files: int = 256                 # images kept for "url" responses (oldest dropped first); 0: url refused
    max_file_bytes: int = 256 * 2**20    # ... and their bytes at most
    echo_request_id: bool = True         # X-Request-ID in responses; off behind a proxy that sets it (Ray Serve's)
    allowed_origins: tuple[str, ...] = ()  # browser origins served ("*": any); other requests with an Origin: 403

    def __post_init__(self):
        checks = (("max_steps", 1 <= self.max_steps <= MAX_STEPS), ("steps", 1 <= self.steps <= self.max_steps),
                  ("sampler", self.sampler in RECIPES), ("body_timeout", self.body_timeout > 0),
                  ("guidance_scale", self.guidance_scale >= 0), ("max_body_bytes", self.max_body_bytes > 0),
                  ("max_image_pixels", self.max_image_pixels is None or self.max_image_pixels >= MIN_SIDE**2),
                  ("max_n", self.max_n >= 1), ("file_ttl", self.file_ttl > 0), ("max_files", self.max_files >= 0),
                  ("max_file_bytes", self.max_file_bytes > 0))
        for name, ok in checks:
            if not ok:
                above = " (above max_steps, --max-steps)" if name == "steps" and self.steps > self.max_steps else ""
                raise ValueError(f"ServerConfig.{name} = {getattr(self, name)!r} is out of range{above}")


# ------------------------------------------------------------------------------------------------- the app

class _Handlers:
    def __init__(self, engine: Engine, config: ServerConfig):
        build_schedule(config.sampler, config.steps, engine.pipe.config.scheduler)  # ValueError: a bad server setup
        check_clip_skip(config.clip_skip, engine.pipe.backend, "serve with --backend torch, or without --clip-skip")
        self.engine, self.config, self.metrics = engine, config, engine.metrics
        native, static = engine.native_size, engine.pipe.fixed_size
        self.buckets = size_buckets(native) if static is None else {f"{static[1]}x{static[0]}": tuple(static)}
        self.max_pixels = config.max_image_pixels or (4 * native) ** 2
        self.files = FileStore(config.file_ttl, config.max_files, config.max_file_bytes)
        self.formats = ("b64_json", "url") if config.max_files else ("b64_json",)  # no files kept: url gets a 400
        self.created = int(time.time())  # the model's `created` in /v1/models: loaded just before the app is made
        self.nets = controlnet_count(engine.pipe)  # --controlnet: /v1/inpaint requires control_image (control.py)
        self.ip = engine.pipe.ip_adapter_loaded  # --ip-adapter: /v1/inpaint requires ip_adapter_image

    # ---------------------------------------------------------------------------------- shared steps
    def _size(self, value) -> tuple[int, int] | None:
        if value is None or value == "auto":
            return None
        if not isinstance(value, str) or value not in self.buckets:
            raise APIError(400, f"size {shown(value)} is not served by this model; use auto or one of "
                           f"{', '.join(self.buckets)}", param="size", code="invalid_size")
        return self.buckets[value]

    def _runs(self, hw: tuple[int, int]) -> None:
        """The image's size is one the backend runs (an export made with a fixed --size runs that size only): else
        the client's 400 here, not the batch's 500 later."""
        try:
            self.engine.pipe.processing_size(*hw)
        except ValueError as e:
            raise APIError(400, f"image: {e}", param="image", code="invalid_size") from None

    def _n(self, value) -> int:
        n = number(value, "n", 1, self.config.max_n, 1, int)
        if n > self.engine.config.max_queue:
            raise APIError(400, f"n = {n} is more than this server's queue holds ({self.engine.config.max_queue})",
                           param="n", code="invalid_value")
        return n

    def _seed(self, value, n: int) -> int:
        return number(value, "seed", 0, MAX_SEED + 1 - n, None, int) if value is not None else secrets.randbelow(2**31)

    def _clip_skip(self, value) -> int:
        layers = self.engine.pipe.config.text.num_layers
        value = number(value, "clip_skip", 0, layers, self.config.clip_skip, int)  # JSON's wording, null = default
        try:
            return check_clip_skip(value, self.engine.pipe.backend,
                                   "send clip_skip 0 or none, or use a server started with --backend torch")
        except ValueError as e:
            raise APIError(400, str(e), param="clip_skip", code="invalid_value") from None

    def _key(self, kind: str, hw: tuple[int, int], steps: int, sampler: str, **options) -> ServeKey:
        options.setdefault("clip_skip", self.config.clip_skip)
        return ServeKey(kind, hw[0], hw[1], steps, sampler, self.engine.config.model_name,
                        options=tuple(sorted(options.items())))

    def _format(self, value) -> str:
        if value == "url" and "url" not in self.formats:
            raise APIError(400, "response_format url is off on this server (no images are kept: max_files 0, as "
                                "behind several Ray Serve replicas, where the download could reach another one); use "
                                "b64_json", param="response_format", code="invalid_value")
        return choice(value, "response_format", self.formats, "b64_json")

    @staticmethod
    def _media_type(request: Request) -> str:
        return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    async def _form(self, request: Request):
        if self._media_type(request) != "multipart/form-data":
            raise APIError(400, "expected a multipart/form-data body, as OpenAI's images/edits",
                           code="invalid_content_type")
        try:
            return await request.form(max_files=MAX_FILE_PARTS, max_fields=64, max_part_size=2**20)
        except BodyTooLarge as e:
            raise APIError(413, str(e), code="request_too_large") from None
        except BodyTimeout as e:
            raise APIError(408, str(e), code="request_timeout") from None
        except ClientDisconnect:
            raise
        except Exception as e:
            raise APIError(400, f"could not parse the multipart body: {clip(str(getattr(e, 'detail', e)))}",
                           code="invalid_body") from None

    async def _json(self, request: Request) -> dict:
        # required, not sniffed: a web page can make a browser POST text/plain to a localhost server without asking
        if self._media_type(request) != "application/json":
            raise APIError(400, "expected a JSON body with Content-Type: application/json",
                           code="invalid_content_type")
        try:
            body = await request.body()
        except BodyTooLarge as e:
            raise APIError(413, str(e), code="request_too_large") from None
        except BodyTimeout as e:
            raise APIError(408, str(e), code="request_timeout") from None
        # a request has a few dozen objects and arrays; millions of them ("[{}, {}, ...]") would cost ~30x the body
        # in memory to parse: refused by a byte count first, and parsing runs off the event loop
        if body.count(b"{") + body.count(b"[") > MAX_JSON_CONTAINERS:
            raise APIError(400, f"the body holds more than {MAX_JSON_CONTAINERS} JSON objects and arrays",
                           code="invalid_json")
        try:
            data = await asyncio.to_thread(json.loads, body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise APIError(400, "the body is not valid JSON", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return data

    async def _run(self, request: Request, key: ServeKey, items: list[Item], timeout: float | None = None):
        """Queue the items, wait for their images without blocking the event loop; 429 / 504 / 499 as due."""
        loop, done = asyncio.get_running_loop(), asyncio.Event()

        def on_done():  # called from the worker thread
            try:
                loop.call_soon_threadsafe(done.set)
            except RuntimeError:  # the loop is gone (server stopped): nobody is waiting
                pass
        try:
            req = self.engine.submit(key, items, on_done, timeout)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full",
                           headers={"Retry-After": str(math.ceil(e.retry_after))}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        self.metrics.in_flight.inc()
        try:
            while not req.finished and (left := req.deadline - self.engine.batcher.clock()) > 0:
                try:
                    await asyncio.wait_for(done.wait(), min(POLL_SECONDS, left))
                except asyncio.TimeoutError:
                    pass
                if not req.finished and await request.is_disconnected():
                    self.engine.abandon(req)
                    raise ClientGone
        except asyncio.CancelledError:  # e.g. Ray Serve cancels the handler when its client goes
            self.engine.abandon(req)
            raise
        finally:
            self.metrics.in_flight.dec()
        if req.status == "done":
            return req.results
        if req.status == "failed":
            raise APIError(500, f"the model failed on this request: {req.error}", code="model_error", headers=NO_RETRY)
        self.engine.abandon(req)  # its deadline passed, queued or running
        raise APIError(504, "no result before the deadline (the server's --request-timeout"
                       f"{' or the request timeout' if timeout else ''}); retry later", code="timeout",
                       headers=NO_RETRY)

    async def _respond(self, request: Request, images, items: list[Item], response_format: str,
                       unchanged: bool = False) -> JSONResponse:
        """OpenAI's ImagesResponse; a prompt over CLIP's 77 tokens was cut there: `revised_prompt` says what the
        model read (in the tokenizer's normal form: lower case, single spaces). `unchanged`: /v1/inpaint's mask had
        nothing to repaint, and each image is the input (said by "unchanged": true). Each PNG carries the input
        image's RGB ICC profile (the Pipeline tags its outputs with it)."""
        pngs = await run_in_threadpool(lambda: [png_bytes(im) for im in images])
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}/v1/files/{self.files.put(png)}.png"} if response_format == "url" else
                {"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
        cut = clip_cut(self.engine.pipe.backend.tokenizer, items[0].prompt)  # one prompt per request
        for d, it in zip(data, items):
            d["seed"] = it.seed
            if unchanged:
                d["unchanged"] = True
            if cut:
                d["revised_prompt"] = cut[0]
        self.metrics.images.inc(len(pngs))
        w, h = images[0].size
        return JSONResponse({"created": int(time.time()), "data": data, "background": "opaque", "output_format": "png",
                             "size": f"{w}x{h}"})

    # ---------------------------------------------------------------------------------- endpoints
    async def edits(self, request: Request) -> Response:
        form = await self._form(request)
        try:
            refuse_openai(self.nets, "/v1/images/edits")
            image_prompt.refuse_openai(self.ip, "/v1/images/edits")
            fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]")}
            check_fields(fields, EDIT_FIELDS, EDIT_IGNORED, form=True)
            upload = one_image(form)
            mask = fields.get("mask")
            if mask is not None and not isinstance(mask, UploadFile):
                raise APIError(400, "mask must be a file (a PNG with alpha)", param="mask", code="invalid_mask")
            if file := next((k for k, v in fields.items() if k != "mask" and isinstance(v, UploadFile)), None):
                raise APIError(400, f"{file} must be a form field, not a file", param=file, code="invalid_value")
            prompt, negative = text(fields.get("prompt"), "prompt", True), text(fields.get("negative_prompt"),
                                                                                   "negative_prompt")
            n, size = self._n(form_int(fields.get("n"), "n")), fields.get("size")
            seed = self._seed(form_int(fields.get("seed"), "seed"), n)
            fmt = self._format(fields.get("response_format"))
            image_bytes, mask_bytes = await upload.read(), (await mask.read() if mask is not None else None)
        finally:
            await form.close()
        image, repaint = await run_in_threadpool(edit_inputs, image_bytes, mask_bytes, self.max_pixels)
        hw = (image.height, image.width)
        if size not in (None, "auto", f"{hw[1]}x{hw[0]}"):  # any image size is served; size may only repeat it
            raise APIError(400, f"size {shown(size)} differs from the image's {hw[1]}x{hw[0]}; edits keep the "
                           "image's size (send size=auto or leave it out)", param="size", code="invalid_size")
        self._runs(hw)
        cfg = self.config
        key = self._key("inpaint", hw, cfg.steps, cfg.sampler, guidance_scale=cfg.guidance_scale,
                        mask_blur=default_mask_blur("image"))  # the alpha convention's
        items = [Item(prompt, seed + j, negative, DEFAULT["strength"], image, repaint) for j in range(n)]
        images = await self._run(request, key, items)
        return await self._respond(request, images, items, fmt)

    async def generations(self, request: Request) -> Response:
        f = await self._json(request)
        refuse_openai(self.nets, "/v1/images/generations")
        image_prompt.refuse_openai(self.ip, "/v1/images/generations")
        check_fields(f, GENERATE_FIELDS, GENERATE_IGNORED)
        prompt, negative = text(f.get("prompt"), "prompt", True), text(f.get("negative_prompt"), "negative_prompt")
        n, hw = self._n(f.get("n")), self._size(f.get("size")) or self.engine.native_hw
        seed = self._seed(f.get("seed"), n)
        fmt = self._format(f.get("response_format"))
        cfg = self.config
        items = [Item(prompt, seed + j, negative) for j in range(n)]
        images = await self._run(request, self._key("generate", hw, cfg.steps, cfg.sampler,
                                                    guidance_scale=cfg.guidance_scale), items)
        return await self._respond(request, images, items, fmt)

    async def inpaint(self, request: Request) -> Response:
        f = await self._json(request)
        check_fields(f, ("image", "mask", "product_mask", "prompt", "negative_prompt", "n", "seed", "strength",
                          "steps", "sampler", "eta", "guidance_scale", "guidance_rescale", "mask_dilate",
                          "mask_blur", "crop_padding", "color_match", "paste_back", "mask_mode", "response_format",
                          "timeout", "mask_threshold", "clip_skip", "timesteps", "sigmas", *CONTROL_FIELDS,
                          image_prompt.IP_FIELD))
        if "image" not in f:
            raise APIError(400, "image is required (base64 PNG, JPEG or WebP)", param="image", code="invalid_image")
        if f.get("mask") is not None and f.get("product_mask") is not None:
            raise APIError(400, "give mask (white = repaint) or product_mask (white = keep), not both",
                           param="product_mask", code="invalid_mask")
        kind = "mask" if f.get("mask") is not None else "product_mask" if f.get("product_mask") is not None else None
        prompt, negative = text(f.get("prompt"), "prompt", True), text(f.get("negative_prompt"), "negative_prompt")
        n = self._n(f.get("n"))
        seed = self._seed(f.get("seed"), n)
        strength = number(f.get("strength"), "strength", 1e-3, 1.0, DEFAULT["strength"])
        steps = number(f.get("steps"), "steps", 1, self.config.max_steps, self.config.steps, int)
        sampler = choice(f.get("sampler"), "sampler", tuple(RECIPES), self.config.sampler)
        custom = custom_schedule_fields(f, self.config.max_steps)
        length = schedule_steps(self.engine.pipe.config, sampler, steps, strength, **custom)
        if custom and f.get("steps") is not None and steps != length:
            raise APIError(400, f"steps {steps}, but {next(iter(custom))} has {length} steps: give one of them",
                           param="steps", code="invalid_value")
        steps = length if custom else steps  # (trailing spacing runs N + 1 steps at some N: steps stays N)
        eta = number(f.get("eta"), "eta", 0.0, 1.0, DEFAULT["eta"])
        try:
            check_eta(eta, sampler)
        except ValueError as e:
            raise APIError(400, str(e), param="eta", code="invalid_value") from None
        crop = f.get("crop_padding")
        options = dict(
            eta=eta,
            guidance_scale=number(f.get("guidance_scale"), "guidance_scale", 0.0, 50.0, self.config.guidance_scale),
            guidance_rescale=number(f.get("guidance_rescale"), "guidance_rescale", 0.0, 1.0,
                                    DEFAULT["guidance_rescale"]),
            mask_dilate=number(f.get("mask_dilate"), "mask_dilate", 0, 64, DEFAULT["mask_dilate"], int),
            mask_blur=number(f.get("mask_blur"), "mask_blur", 0.0, 256.0, default_mask_blur(kind or "image")),
            crop_padding=None if crop is None else number(crop, "crop_padding", 0, 2**16, None, int),
            color_match=boolean(f.get("color_match"), "color_match", DEFAULT["color_match"]),
            paste_back=boolean(f.get("paste_back"), "paste_back", DEFAULT["paste_back"]),
            mask_mode=choice(f.get("mask_mode"), "mask_mode", ("max", "diffusers"), DEFAULT["mask_mode"]),
            mask_threshold=number(f.get("mask_threshold"), "mask_threshold", 1e-3, 1.0, None),
            clip_skip=self._clip_skip(f.get("clip_skip")), **custom)
        control_bytes, control_options = control_fields(f, self.nets, DEFAULT)  # ({} without --controlnet)
        options.update(control_options)
        ip_bytes = image_prompt.ip_field(f, self.ip)  # None without --ip-adapter
        fmt = self._format(f.get("response_format"))
        timeout = seconds(f.get("timeout"), "timeout")
        image_bytes, mask_bytes = b64decode(f["image"], "image"), (b64decode(f[kind], kind) if kind else None)

        def decode():
            image = decode_image(image_bytes, "image", self.max_pixels)
            hw = (image.height, image.width)
            if kind is None:
                require_transparency(image)
                return image.convert("RGB"), repaint_mask("image", image, hw, "image")
            return image.convert("RGB"), repaint_mask(kind, decode_image(mask_bytes, kind, self.max_pixels), hw,
                                                       kind)
        image, repaint = await run_in_threadpool(decode)
        control = control_bytes and await run_in_threadpool(decode_controls, control_bytes, self.max_pixels)
        reference = await run_in_threadpool(image_prompt.decode_ip_image, ip_bytes, self.max_pixels)
        if options["crop_padding"] is None:  # a crop runs at the model's (or the export's) own size
            self._runs((image.height, image.width))
        key = self._key("inpaint", (image.height, image.width), steps, sampler, **options)
        items = [Item(prompt, seed + j, negative, strength, image, repaint, control, reference) for j in range(n)]
        images = await self._run(request, key, items, timeout)
        top, cut = repaint.max(), options["mask_threshold"]  # the Pipeline's float32 mask, binarised at >= cut
        unchanged = bool(top == 0 or (cut is not None and top < np.float32(cut)))
        return await self._respond(request, images, items, fmt, unchanged=unchanged)

    async def download(self, request: Request) -> Response:
        name = request.path_params["name"].removesuffix(".png")
        data = self.files.get(name)
        if data is None:
            raise APIError(404, f"no file {shown(name)} (files are kept {self.config.file_ttl:.0f} s, the last "
                                f"{self.config.max_files} at most)",
                           code="not_found")
        return Response(data, media_type="image/png")

    def _model(self) -> dict:
        """OpenAI's Model object for the one model served."""
        return {"id": self.engine.config.model_name, "object": "model", "created": self.created,
                "owned_by": "backdrop"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: Request) -> Response:
        name, served = request.path_params["model"], self.engine.config.model_name
        if name != served:
            return APIError(404, f"model {shown(name)} is not served here; this server serves {served!r}",
                            param="model", code="model_not_found").response()
        return JSONResponse(self._model())

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "pid": os.getpid()})  # pid: which replica/process answered

    async def readyz(self, request: Request) -> Response:
        if self.engine.draining.is_set():
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if (problem := self.engine.problem()) is not None:  # warm-up failed, or the batch worker died
            return JSONResponse({"status": "error", "error": problem}, status_code=503)
        if self.engine.ready.is_set():
            return JSONResponse({"status": "ready", "model": self.engine.config.model_name})
        return JSONResponse({"status": "warming up"}, status_code=503)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


def create_app(engine: Engine, config: ServerConfig = ServerConfig()):
    """The ASGI app. Its lifespan starts the engine's worker (warm-up, then batches) and, at shutdown, drains
    the queue. Returns the app wrapped in the body-size limit and the browser guard (serve/access.py)."""
    h = _Handlers(engine, config)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.close)  # the server already waited for in-flight requests: drain, join

    def count(scope, status: int) -> None:
        """Count and log a response no endpoint() saw (routing errors, body limits), labelled by the route its path
        names or "other": a fixed set of labels, whatever paths clients send."""
        name = next((r.name for r in routes if r.matches(scope)[0] is not Match.NONE), "other")
        h.metrics.requests.inc(endpoint=name, code=str(status))
        log_refusal(scope, status)

    async def http_error(request, exc: HTTPException):  # 404 / 405 from routing, in OpenAI's shape
        count(request.scope, exc.status_code)
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers,  # 405: Allow
                        code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)).response()

    def api(name, handler):
        return endpoint(name, handler, h.metrics, config.echo_request_id)
    routes = [Route("/v1/images/edits", api("edits", h.edits), methods=["POST"]),
              Route("/v1/images/generations", api("generations", h.generations), methods=["POST"]),
              Route("/v1/inpaint", api("inpaint", h.inpaint), methods=["POST"]),
              Route("/v1/files/{name}", api("files", h.download), methods=["GET"]),
              Route("/v1/models", api("models", h.models), methods=["GET"]),
              Route("/v1/models/{model:path}", api("models", h.model), methods=["GET"]),
              Route("/healthz", h.healthz, methods=["GET"]),
              Route("/readyz", h.readyz, methods=["GET"]),
              Route("/metrics", h.metrics_text, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    return BrowserGuard(BodyLimit(app, config.max_body_bytes, count, config.body_timeout), config.allowed_origins,
                        count)
