"""`backdrop serve MODEL`: the batched HTTP server with OpenAI-compatible image endpoints (serve/server.py).

The model is loaded before the port is bound, so a bad path or checkpoint is a one-line error (exit status 2);
warm-up runs after binding, and /readyz turns 200 when it is done. SIGTERM (or Ctrl-C) stops accepting
connections, finishes the requests in flight and what is queued, then exits; uvicorn re-raises the signal after
its graceful shutdown, so the exit status is the signal's (143 for SIGTERM in a shell), as process managers expect.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from backdrop import __version__
from backdrop.cli import (CLIError, add_checkpoint_options, add_dtype_option, add_freeu_option, add_ip_adapter_options,
                          add_lora_option, add_textual_inversion_option, apply_model_options, check_ip_adapter_options,
                          checkpoint_options, parse_device)
from backdrop.diffusion.recipes import RECIPES, SAMPLING_DEFAULTS
from backdrop.messages import require

__all__ = ["add_parser", "model_id"]

log = logging.getLogger("backdrop.serve")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP with OpenAI-compatible image endpoints",
        description="Serve MODEL over HTTP: POST /v1/images/edits and /v1/images/generations speak OpenAI's "
                    "Images API, so the official openai client's images.edit, images.generate and models.list / "
                    "retrieve work against it (streaming, non-PNG output and transparent backgrounds are refused); "
                    "POST /v1/inpaint takes every inpainting option; /healthz, /readyz and /metrics (Prometheus) "
                    "are for operators. Concurrent requests are grouped into batches on the accelerator (dynamic "
                    "batching).",
        epilog="example: backdrop serve ./my-model --port 8000 --max-batch-size 8; then "
               "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='unused').images.edit(...)")
    p.add_argument("model", metavar="MODEL", help="a diffusers model folder, one .safetensors checkpoint, or a "
                                                  "built-in model's name")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on; 0.0.0.0 exposes the server to the network, which has no "
                          "authentication of its own (default: %(default)s)")
    net.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    net.add_argument("--max-body-mb", type=float, default=32, metavar="MB",
                     help="larger request bodies get 413 (default: %(default)s)")
    net.add_argument("--body-timeout", type=float, default=60, metavar="S",
                     help="a request body not complete this long after it began gets 408 and its connection is "
                          "freed (stalled or trickling uploads) (default: %(default)s)")
    net.add_argument("--header-timeout", type=float, default=60, metavar="S",
                     help="a connection whose request head is not complete this long after it opened or began is "
                          "closed (slowloris; heads over 16 KiB are refused) (default: %(default)s)")
    net.add_argument("--keep-alive", type=float, default=75, metavar="S",
                     help="seconds an idle connection stays open; keep it above the load balancer's idle timeout "
                          "(AWS ALB: 60) (default: %(default)s)")
    net.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                     help="proxies whose X-Forwarded-Proto/For headers are trusted, comma-separated or '*' (the "
                          "scheme of url responses behind a TLS-terminating load balancer) (default: 127.0.0.1)")
    net.add_argument("--max-connections", type=int, default=None, metavar="N",
                     help="open connections at most; a new one past it is answered 503 at once, so that slow or "
                          "idle clients cannot take every file descriptor (default: no limit)")
    net.add_argument("--allowed-origins", default="", metavar="ORIGINS",
                     help="web pages (origins, e.g. https://tool.example.com, comma-separated, or '*') whose "
                          "browsers may call the server; requests with any other Origin header get 403, so that a "
                          "page a user visits cannot drive this unauthenticated server (default: none; API clients "
                          "send no Origin)")
    net.add_argument("--max-files", type=int, default=256, metavar="N",
                     help="images kept for response_format=url, the oldest dropped first; 0 turns url responses "
                          "off (default: %(default)s)")
    net.add_argument("--max-file-mb", type=float, default=256, metavar="MB",
                     help="memory the url images may hold at most, the oldest dropped first (default: %(default)s)")
    net.add_argument("--file-ttl", type=float, default=3600, metavar="S",
                     help="seconds a url image stays downloadable (default: %(default)s)")
    net.add_argument("--shutdown-delay", type=float, default=0, metavar="S",
                     help="on SIGTERM, first answer /readyz and new work with 503 for this long while still "
                          "listening, so that the load balancer stops sending work before connections are refused "
                          "(Kubernetes: a few seconds) (default: %(default)s)")
    net.add_argument("--drain-timeout", type=float, default=None, metavar="S",
                     help="on SIGTERM, the longest to wait for in-flight requests before exiting; set it below "
                          "Kubernetes' terminationGracePeriodSeconds (default: as long as they take, at most "
                          "--request-timeout)")
    m = p.add_argument_group("model")
    m.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                   help="what runs the model (default: %(default)s)")
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    add_dtype_option(m)
    add_checkpoint_options(m)
    add_lora_option(m)
    add_freeu_option(m)
    add_textual_inversion_option(m)
    m.add_argument("--controlnet", action="append", metavar="PATH",
                   help="a ControlNet every request runs (a diffusers ControlNetModel folder or an original "
                        ".safetensors, made for the model's base); repeat for several, their residuals summed. "
                        "POST /v1/inpaint then requires control_image (a list of one per ControlNet, in this "
                        "order) and takes controlnet_conditioning_scale, control_guidance_start / _end and "
                        "guess_mode; the OpenAI endpoints cannot carry a control image and answer 400 (use "
                        "/v1/inpaint). --backend torch only")
    add_ip_adapter_options(m, "POST /v1/inpaint then requires ip_adapter_image (base64: a photo of the scene or "
                              "style wanted, one per request); the OpenAI endpoints cannot carry it and answer 400")
    m.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA with the torch backend, run the UNet eagerly instead of replaying CUDA graphs")
    b = p.add_argument_group("batching")
    b.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                   help="images per model call; 1 turns dynamic batching off (default: %(default)s)")
    b.add_argument("--max-queue-delay-ms", type=float, default=50, metavar="MS",
                   help="the longest a request waits for others to share its batch once the model is free; the "
                        "wait is learned below this: none for a lone client, longer when company was just missed "
                        "(default: %(default)s)")
    b.add_argument("--fixed-queue-delay", dest="adaptive_delay", action="store_false",
                   help="always wait the whole --max-queue-delay-ms for company instead of learning the wait")
    b.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="images waiting at most; more get 429 with Retry-After (default: %(default)s)")
    b.add_argument("--request-timeout", type=float, default=300, metavar="S",
                   help="seconds from arrival to answer, queueing included; later gets 504 (default: %(default)s)")
    s = p.add_argument_group("defaults of the OpenAI endpoints (/v1/inpaint may set its own)")
    s.add_argument("--steps", type=int, default=SAMPLING_DEFAULTS["steps"], metavar="N",
                   help="denoising steps (default: %(default)s)")
    s.add_argument("--max-steps", type=int, default=150, metavar="N",
                   help="the most steps a /v1/inpaint request may ask for: one request's cost, which every other "
                        "client in its batch waits for, stays bounded (default: %(default)s)")
    s.add_argument("--sampler", choices=list(RECIPES), default=SAMPLING_DEFAULTS["sampler"], metavar="NAME",
                   help=f"one of: {', '.join(RECIPES)} (default: %(default)s)")
    s.add_argument("--guidance-scale", type=float, default=SAMPLING_DEFAULTS["guidance_scale"], metavar="SCALE",
                   help="(default: %(default)s)")
    s.add_argument("--clip-skip", type=int, default=0, metavar="N",
                   help="text encoder layers to skip, diffusers' clip_skip (default: 0; --backend torch only)")
    m.add_argument("--cpu-cache-mb", type=float, default=1024, metavar="MB",
                   help="on the CPU, freed memory kept for reuse above the warmed-up footprint: faster (no page "
                        "faults for every large activation), handed back to the OS past this budget; 0 leaves "
                        "malloc alone (default: %(default)s)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text: timestamped lines; json: one JSON object a line with the request id, status and "
                        "latency as fields, for log shippers; both on stderr (default: %(default)s)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:  # python-multipart installs python_multipart (before 0.0.13: multipart), which starlette takes for forms
        require("serving", "serve", "starlette", "uvicorn", "python_multipart|multipart")
    except ModuleNotFoundError as e:
        raise CLIError(str(e)) from None
    from backdrop.serve.engine import EngineConfig
    from backdrop.serve.server import ServerConfig

    if not 0 <= args.port < 65536:
        raise CLIError(f"--port {args.port} must be in [0, 65535]")
    for flag, value in (("--keep-alive", args.keep_alive), ("--drain-timeout", args.drain_timeout),
                        ("--header-timeout", args.header_timeout)):
        if value is not None and not value > 0:
            raise CLIError(f"{flag} {value:g} must be more than 0 seconds")
    if args.max_connections is not None and args.max_connections < 1:
        raise CLIError(f"--max-connections {args.max_connections} must be 1 or more")
    for path in args.controlnet or []:  # before binding and loading, as the other options
        if args.backend != "torch":
            raise CLIError(f"--controlnet needs --backend torch, not {args.backend}: an export's UNet takes no "
                           "ControlNet residuals")
        if not Path(path).expanduser().exists():
            raise CLIError(f"--controlnet {path}: no such file or folder (a diffusers ControlNetModel folder or a "
                           "ControlNet .safetensors file)")
    check_ip_adapter_options(args)
    if not args.shutdown_delay >= 0:
        raise CLIError(f"--shutdown-delay {args.shutdown_delay:g} must be 0 or more seconds")
    for flag in ("--max-body-mb", "--max-file-mb"):  # before int(MB * 2**20), which nan and inf break
        value = getattr(args, flag[2:].replace("-", "_"))
        if not 0 < value < 2**40:
            raise CLIError(f"{flag}: {value:g} is out of range")
    try:
        engine_config = EngineConfig(args.max_batch_size, args.max_queue_delay_ms, args.max_queue,
                                     args.request_timeout, model_name=model_id(args.model),
                                     cpu_cache_mb=args.cpu_cache_mb, adaptive_delay=args.adaptive_delay)
        server_config = ServerConfig(steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                                     clip_skip=args.clip_skip, max_body_bytes=int(args.max_body_mb * 2**20),
                                     max_steps=args.max_steps, body_timeout=args.body_timeout,
                                     max_files=args.max_files, file_ttl=args.file_ttl,
                                     max_file_bytes=int(args.max_file_mb * 2**20),
                                     allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",")
                                                           if o.strip()))
    except ValueError as e:  # "EngineConfig.max_queue = 0 is out of range" -> the flag's name
        field = str(e).split(".", 1)[1].split(" ", 1)[0]
        in_mb = {"max_body_bytes": "max_body_mb", "max_file_bytes": "max_file_mb"}.get(field)  # given in MB
        value = f"{getattr(args, in_mb):g} is out of range" if in_mb else str(e).split(" = ", 1)[1]
        raise CLIError(f"--{(in_mb or field).replace('_', '-')}: {value}") from None
    from backdrop.serve.running import stderr_logging

    with stderr_logging(args.log_level, args.log_format):
        _run_server(args, engine_config, server_config)
    return 0


def _run_server(args, engine_config, server_config) -> None:
    """Bind, load, warm up and serve until a signal (`_serve` has checked the options)."""
    from backdrop.serve.running import bind, run
    from backdrop.serve.server import create_app

    try:  # before the model loads: a port in use is said at once
        sock = bind(args.host, args.port)
    except OSError as e:
        raise CLIError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from the network, and this server has no authentication of its "
                    "own; put it behind your gateway", args.host)
    try:
        engine = _load(args, engine_config)
    except BaseException:
        sock.close()
        raise
    log.info("backdrop %s serving %s: %s backend on %s in %s; batches up to %d, queue %d, request timeout %g s; "
             "defaults: %d steps (at most %d), %s, guidance %g", __version__, args.model, args.backend,
             engine.pipe.backend.device, str(engine.pipe.backend.dtype).removeprefix("torch."),
             engine_config.max_batch_size, engine_config.max_queue, engine_config.request_timeout, args.steps,
             args.max_steps, args.sampler, args.guidance_scale)

    try:
        app = create_app(engine, server_config)
    except ValueError as e:  # --sampler / --steps this model's scheduler cannot run (DDIM at 1000 steps)
        raise CLIError(f"--sampler {args.sampler} --steps {args.steps}: {e}") from None
    print(f"serving {args.model} on http://{args.host}:{args.port} (OpenAI base_url: "
          f"http://{args.host}:{args.port}/v1)", flush=True)
    run(app, sock, log_level=args.log_level, keep_alive=args.keep_alive, drain_timeout=args.drain_timeout,
        forwarded_allow_ips=args.forwarded_allow_ips, shutdown_delay=args.shutdown_delay,
        on_shutdown=engine.begin_shutdown, max_connections=args.max_connections, head_timeout=args.header_timeout)


def model_id(model: str) -> str:
    """The model's id in /v1/models: a folder's name or a checkpoint file's stem, never the server's path; a
    built-in model's name as given."""
    path = Path(model).expanduser()
    if not path.exists():
        return str(model)
    path = path.resolve()  # "." and "./my-model/" have a name once resolved
    return path.stem if path.is_file() else path.name


def _load(args, engine_config):
    from backdrop.diffusion.pipeline import Pipeline
    from backdrop.serve.cuda_graphs import with_cuda_graphs
    from backdrop.serve.engine import Engine

    try:
        pipe = Pipeline.from_pretrained(args.model, device=parse_device(args.device), dtype=args.dtype,
                                        backend=args.backend, **checkpoint_options(args))
    except (FileNotFoundError, ValueError, OSError) as e:  # CheckpointError is a ValueError naming file and key
        raise CLIError(str(e)) from None
    apply_model_options(pipe, args)  # LoRAs merged before any CUDA graph is captured
    if args.controlnet:  # set by apply_model_options, before the engine's warm-up
        log.info("ControlNets (/v1/inpaint requires control_image, in this order): %s", ", ".join(args.controlnet))
    return Engine(with_cuda_graphs(pipe) if args.cuda_graphs else pipe, engine_config)
