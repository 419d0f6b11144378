"""Beyond one machine: the Backdrop server as a Ray Serve deployment (https://docs.ray.io/en/latest/serve/).

One `backdrop serve` process drives one accelerator. To use several GPUs, or several machines, we do not write a
cluster scheduler: Ray Serve already runs replicas across GPUs and nodes, restarts dead ones, autoscales, and puts
one HTTP proxy per node in front of them. Each replica is our single-machine server: it loads the model, runs its
own Batcher + worker thread (dynamic batching stays per GPU, where it pays) and serves the same ASGI app
(serve/server.py), with the differences listed below.

    from backdrop.serve.ray_serve import build_app
    from ray import serve
    serve.run(build_app("/models/sd15-inpaint", num_replicas=4, ray_actor_options={"num_gpus": 1}),
              route_prefix="/")

or from a shell, on a running Ray cluster (`ray start --head` on one node, `ray start --address=HEAD:6379` on
the others), or as a Serve config file's `import_path` + `args` (`serve run` / `serve deploy`; README has one, as
`serve build` cannot write one for a builder; give the replica count in `args`, not under `deployments`):

    serve run backdrop.serve.ray_serve:app_builder model=/models/sd15-inpaint num_replicas=4 num_gpus=1

Then point OpenAI clients at http://<any node>:8000/v1. How it maps onto Ray Serve (serve_options has the numbers):
  * Backpressure stays ours: `max_ongoing_requests` lets a replica take a full queue, a running batch and some
    headroom, so the overflow gets our 429 + Retry-After at once instead of waiting in Ray's router, where
    request_timeout would not count. `max_queued_requests` bounds that router queue (one per proxy) for when every
    replica is at its limit; a burst past both gets a plain-text 503 from Ray.
  * A replica becomes RUNNING only once warm (its __init__ waits for the warm-up; a failed warm-up fails the start)
    and `check_health` fails when the engine cannot serve (failed warm-up, dead batch worker), so Ray replaces it;
    /readyz says the same. Stopping a replica (redeploy, downscale) waits `graceful_shutdown_timeout_s`, derived
    from request_timeout, for the requests it took, then the ASGI lifespan drains and closes the engine.
  * num_replicas="auto": Ray's autoscaler with target_ongoing_requests = max_batch_size, so a replica fills its
    batches before Ray adds one; set max_replicas (Ray's default is 100, i.e. up to 100 GPUs).
  * "url" responses are off (a 400 that says to use b64_json) when more than one replica may run: the file lives in
    the memory of the replica that made it, and Ray's proxy sends the download to any replica.
  * /metrics through the proxy is one replica's, whichever the router picked, with no label saying which: do not
    scrape it. Replicas have no address of their own: scrape Ray's metrics endpoint on each node instead, where each
    replica's serving metrics appear as ray_backdrop_* (batch size, queue depth, latency, status counts, ...) tagged
    with its deployment, replica and application (metrics_to_ray), beside Ray's own ray_serve_deployment_*.
  * HTTP only: the deployment answers through Ray's HTTP proxy; there is no DeploymentHandle method to call.
  * Ray's own errors are plain text, not OpenAI's shape: 503 "Request dropped due to backpressure" (no
    Retry-After) past max_queued_requests, and 500 for a replica that died mid-request.
  * The access line (backdrop.serve, INFO) goes to the replica's Ray log; X-Request-ID is set by Ray's proxy, and
    the app logs the same id without adding the header a second time.
  * A client that disconnects cancels its request in the replica (the handler is cancelled; it calls
    Engine.abandon), as under uvicorn.
Options: model, device, dtype, backend, torch_threads, cuda_graphs, `backdrop serve`'s model options (lora,
textual_inversion, vae, prediction_type, allow_pickle, variant, freeu, controlnet) and every EngineConfig and
ServerConfig
field. Not here: `backdrop serve`'s network and shutdown flags (Ray's http_options and the deployment options above
take their place). Each replica holds its own copy of the model and of its CUDA graphs.
Tested (tests/test_ray_serve.py) on one CPU machine: a private local Ray instance, two replicas of the tiny model.
"""
from __future__ import annotations

import argparse
import logging
import threading
from dataclasses import fields, replace
from types import SimpleNamespace

from backdrop.cli import freeu_spec, lora_spec, textual_inversion_spec
from backdrop.serve.engine import Engine, EngineConfig
from backdrop.serve.metrics import Counter, Histogram, ServerMetrics
from backdrop.serve.server import ServerConfig

__all__ = ["build_app", "app_builder", "serve_options", "replica_server_config", "builder_args", "BackdropReplica",
           "wait_warm", "log_to_ray", "metrics_to_ray"]

# ongoing requests a replica takes beyond a full queue and a running batch: bodies still arriving, requests being
# answered 429 (which is what lets the 429 happen at all), health probes
HEADROOM = 8
# beyond request_timeout + body_timeout at shutdown: encoding the last answers, the worker's last poll and join
SHUTDOWN_MARGIN_S = 10.0


def _flag(text) -> bool:
    """A boolean from `serve run`'s strings (or a config file's YAML booleans)."""
    value = str(text).strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("1", "true", "yes", "on")


# app_builder's arguments that are not EngineConfig / ServerConfig fields, and their types
AUTOSCALING = {"min_replicas": int, "max_replicas": int, "initial_replicas": int, "target_ongoing_requests": float,
               "upscale_delay_s": float, "downscale_delay_s": float}
DEPLOYMENT = {"max_ongoing_requests": int, "max_queued_requests": int, "graceful_shutdown_timeout_s": float,
              "health_check_period_s": float, "health_check_timeout_s": float}


def _freeu(value) -> tuple[float, ...]:
    """`freeu`: "sd1", "sd2", "S1,S2,B1,B2" or a YAML list of four numbers, as `backdrop serve --freeu`."""
    try:
        return freeu_spec(",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


def _specs(parse):
    """A list of `--lora` / `--textual-inversion` specs from a YAML list or a comma-separated string."""
    def specs(value) -> list:
        texts = value if isinstance(value, (list, tuple)) else str(value).split(",")
        try:
            return [parse(str(t).strip()) for t in texts if str(t).strip()]
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None
    return specs


PICKED = {"device": str, "dtype": str, "backend": str, "torch_threads": int, "url_responses": _flag,
          "cuda_graphs": _flag}
# Pipeline.from_pretrained's and `backdrop serve`'s model options, for every replica
MODEL = {"lora": _specs(lora_spec), "textual_inversion": _specs(textual_inversion_spec), "vae": str,
         "prediction_type": str, "allow_pickle": _flag, "variant": str, "freeu": _freeu, "controlnet": _specs(str),
         "ip_adapter": str, "ip_adapter_scale": float}


def serve_options(engine_config: EngineConfig = EngineConfig(), server_config: ServerConfig = ServerConfig(),
                  num_replicas: int | str | None = None, ray_actor_options: dict | None = None,
                  overrides: dict | None = None) -> dict:
    """The deployment's options (Deployment.options), derived from the engine's limits; `overrides` win.
      max_ongoing_requests = max_queue + max_batch_size + HEADROOM: every request a replica can queue, run or refuse
        reaches it, so the overflow gets its 429 + Retry-After (Ray's default, 5, would keep the rest in its router)
      max_queued_requests = max_ongoing_requests: what Ray's router (one per proxy) holds while every replica is at
        its limit. They wait there a moment, then get a replica's 429: a burst of that size still gets our 429s; past
        it, Ray's plain 503 (measured, 2 replicas of queue 4, 40 clients at once: 28 x 429 and no 503 at this value,
        13 x 429 and 15 x 503 at max_queue)
      graceful_shutdown_timeout_s = request_timeout + body_timeout + SHUTDOWN_MARGIN_S: a stopped replica finishes
        what it took (Ray's default, 20 s, force-kills queued work)
      autoscaling_config (num_replicas "auto", or one given, which implies "auto"): target_ongoing_requests =
        max_batch_size unless given. num_replicas None: 1, or "auto" with an autoscaling_config."""
    options = dict(overrides or {})
    replicas = options.pop("num_replicas", num_replicas)
    scaling = options.pop("autoscaling_config", None)
    if hasattr(scaling, "model_dump"):  # Ray's AutoscalingConfig
        scaling = scaling.model_dump(exclude_unset=True)
    if scaling is not None and replicas not in (None, "auto"):
        raise ValueError(f"num_replicas={replicas!r} and an autoscaling_config: give one of them (an "
                         "autoscaling_config, or min_replicas / max_replicas, implies num_replicas='auto')")
    if replicas == "auto" or scaling is not None:
        replicas, scaling = "auto", {"target_ongoing_requests": engine_config.max_batch_size, **(scaling or {})}
    ongoing = engine_config.max_queue + engine_config.max_batch_size + HEADROOM
    out = dict(num_replicas=1 if replicas is None else replicas, ray_actor_options=dict(ray_actor_options or {}),
               max_ongoing_requests=ongoing, max_queued_requests=ongoing,
               graceful_shutdown_timeout_s=engine_config.request_timeout + server_config.body_timeout
               + SHUTDOWN_MARGIN_S)
    if scaling is not None:
        out["autoscaling_config"] = scaling
    out.update(options)
    return out


def replica_server_config(server_config: ServerConfig, options: dict, url_responses: bool | None = None
                          ) -> ServerConfig:
    """server_config as a replica serves it, with the deployment's `options` (serve_options'): X-Request-ID left to
    Ray's proxy, which sets it (echoed by the app as well, the header came twice); "url" responses off (max_files 0:
    a 400 saying to use b64_json) when more than one replica may run, since a file lives in the replica that made it
    and the proxy may route its download to another. url_responses True keeps them on regardless, False turns them
    off."""
    replicas = options["num_replicas"]
    most = options["autoscaling_config"].get("max_replicas", 100) if replicas == "auto" else replicas  # Ray's default
    if url_responses is None:
        url_responses = most == 1
    if url_responses and not server_config.max_files:
        raise ValueError("url_responses=True with max_files=0: no url file could be kept")
    return replace(server_config, echo_request_id=False, max_files=server_config.max_files if url_responses else 0)


def log_to_ray() -> None:
    """In a replica nobody configures the `backdrop` loggers (`backdrop serve` does), so the access lines
    (backdrop.serve, INFO: request id, path, status, why it failed) went nowhere. Unless `backdrop` already has a
    handler, hand its records to Ray Serve's logger, whose handlers write the replica's log file (and stderr), in
    Ray's format, at its level. Neither Ray's loggers nor the root logger are changed."""
    ours = logging.getLogger("backdrop")
    if not ours.handlers:
        ours.addHandler(_ToRayServe())
        if ours.level == logging.NOTSET:
            ours.setLevel(logging.INFO)


def metrics_to_ray(metrics: ServerMetrics, stop: threading.Event, period: float = 5.0) -> threading.Thread:
    """Mirror the replica's serving metrics into Ray's (ray.serve.metrics, which tag each series with its
    deployment, replica and application): each update of ours updates Ray's too, and Ray's Prometheus endpoint on
    every node has them as ray_backdrop_* per replica. The gauges read at scrape time (queue depth, batch wait) are
    sampled every `period` s by a thread, which ends when `stop` is set."""
    from ray.serve import metrics as ray_metrics

    sampled = []
    for m in metrics.served():
        tags = m.labelnames or None
        if isinstance(m, Histogram):
            m.mirror = ray_metrics.Histogram(m.name, m.help, boundaries=list(m.buckets[:-1]), tag_keys=tags)
        elif isinstance(m, Counter):
            m.mirror = ray_metrics.Counter(m.name, m.help, tag_keys=tags)
        else:
            m.mirror = ray_metrics.Gauge(m.name, m.help)
            m.mirror.set(m.value())  # (ready may be set already)
            sampled += [m] if m._fn is not None else []

    def sample():
        while not stop.wait(period):
            for g in sampled:
                g.mirror.set(g.value())
    thread = threading.Thread(target=sample, name="backdrop-ray-metrics", daemon=True)
    thread.start()
    return thread


class _ToRayServe(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        ray_log = logging.getLogger("ray.serve")
        if record.levelno >= ray_log.getEffectiveLevel():
            ray_log.handle(record)


def wait_warm(engine: Engine, poll: float = 0.5) -> None:
    """Start the engine's worker (Engine.start is idempotent: the app's lifespan calls it again) and return once its
    warm-up is done, so that Ray marks the replica RUNNING, and retires old ones in a rolling update, only when it is
    warm. RuntimeError when the warm-up failed: the replica fails to start, Ray retries it and reports why."""
    engine.start()
    while not engine.ready.wait(poll):
        if (problem := engine.problem()) is not None:
            raise RuntimeError(f"backdrop replica: {problem}")


class BackdropReplica:
    """One replica: the model, its Engine and the ASGI app of `backdrop serve`. build_app makes it a Ray Serve
    deployment (serve.deployment + serve.ingress); a plain class here, so that its health logic is testable, and
    importing this module needs no Ray."""

    def __init__(self, model: str, engine_config: EngineConfig, server_config: ServerConfig, device: str | None = None,
                 dtype: str | None = None, backend: str = "torch", torch_threads: int | None = None,
                 cuda_graphs: bool = True, model_options: dict | None = None):
        import torch

        from backdrop.cli import apply_model_options
        from backdrop.diffusion.pipeline import Pipeline
        from backdrop.serve.cuda_graphs import with_cuda_graphs

        log_to_ray()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        options = dict(model_options or {})
        specs = {k: options.pop(k, ()) for k in ("lora", "textual_inversion", "controlnet")} | {
            "freeu": options.pop("freeu", None), "ip_adapter": options.pop("ip_adapter", None),
            "ip_adapter_scale": options.pop("ip_adapter_scale", 1.0)}
        pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype, backend=backend, **options)
        # as `backdrop serve`: LoRAs merged (and ControlNets set) before any CUDA graph is captured, the errors naming
        # the option
        apply_model_options(pipe, SimpleNamespace(**specs, clip_skip=server_config.clip_skip,
                                                  allow_pickle=options.get("allow_pickle", False)))
        self.engine = Engine(with_cuda_graphs(pipe) if cuda_graphs else pipe, engine_config)
        self.server_config = server_config
        self._stop_metrics = threading.Event()
        metrics_to_ray(self.engine.metrics, self._stop_metrics)
        wait_warm(self.engine)

    def __serve_build_asgi_app__(self):
        from backdrop.serve.server import create_app

        return create_app(self.engine, self.server_config)  # its lifespan closes (drains) the engine at shutdown

    def check_health(self) -> None:
        """Ray Serve calls it every health_check_period_s (10 s by default); raising marks the replica unhealthy and
        Ray replaces it. A replica whose batch worker died would otherwise answer every request with a 504."""
        if (problem := self.engine.problem()) is not None:
            raise RuntimeError(f"backdrop replica: {problem}")

    def __del__(self):
        """Ray Serve's stop hook. By now Ray has waited (up to graceful_shutdown_timeout_s) for the requests this
        replica took, and the ASGI lifespan's shutdown has drained and closed the engine; this stops the worker of a
        replica that never got that far (its __init__ failed after the engine started)."""
        if hasattr(self, "_stop_metrics"):
            self._stop_metrics.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.begin_shutdown()
            engine.close(SHUTDOWN_MARGIN_S)


def build_app(model: str, engine_config: EngineConfig = EngineConfig(), server_config: ServerConfig = ServerConfig(),
              num_replicas: int | str | None = None, ray_actor_options: dict | None = None, device: str | None = None,
              dtype: str | None = None, backend: str = "torch", torch_threads: int | None = None,
              name: str = "backdrop", deployment_options: dict | None = None, url_responses: bool | None = None,
              cuda_graphs: bool = True, lora=(), textual_inversion=(), vae: str | None = None,
              prediction_type: str | None = None, allow_pickle: bool = False, variant: str | None = None,
              freeu: tuple[float, float, float, float] | None = None, controlnet=(), ip_adapter: str | None = None,
              ip_adapter_scale: float = 1.0):
    """A Ray Serve application (pass it to `serve.run`): `num_replicas` copies of the server for `model`.
    ray_actor_options: resources per replica, e.g. {"num_gpus": 1} (one GPU each), {"num_gpus": 0.5} (two replicas
    on a GPU: each holds its own model and CUDA graphs) or {"num_cpus": 4}. num_replicas: 1 by default; "auto" lets
    Ray autoscale. deployment_options: Deployment.options() over serve_options' defaults (autoscaling_config, which
    implies "auto"; max_queued_requests, graceful_shutdown_timeout_s, health_check_period_s, ...). url_responses:
    None = only with one replica (replica_server_config). torch_threads: intra-op threads per replica (CPU serving).
    cuda_graphs: replay the UNet from CUDA graphs on CUDA with the torch backend (`backdrop serve`'s default).
    lora: (path, scale) pairs merged into every replica's weights; textual_inversion: (path, token or None) pairs;
    vae, prediction_type, allow_pickle, variant: as Pipeline.from_pretrained's; freeu: (s1, s2, b1, b2), as
    `backdrop serve --freeu`; controlnet: ControlNet paths, as `backdrop serve --controlnet` (/v1/inpaint then
    takes control_image); ip_adapter, ip_adapter_scale: as `backdrop serve --ip-adapter` (/v1/inpaint then takes
    ip_adapter_image). Paths must be readable on every node."""
    from ray import serve

    options = serve_options(engine_config, server_config, num_replicas, ray_actor_options, deployment_options)
    server_config = replica_server_config(server_config, options, url_responses)
    # serve.ingress() with no app: the ASGI app is built per replica, after __init__, by __serve_build_asgi_app__
    deployment = serve.deployment(name=name)(serve.ingress()(BackdropReplica))
    model_options = dict(lora=[(str(p), float(w)) for p, w in lora], vae=vae, prediction_type=prediction_type,
                         textual_inversion=[(str(p), t) for p, t in textual_inversion], allow_pickle=allow_pickle,
                         variant=variant, freeu=None if freeu is None else tuple(map(float, freeu)),
                         controlnet=[str(p) for p in controlnet],
                         ip_adapter=None if ip_adapter is None else str(ip_adapter),
                         ip_adapter_scale=float(ip_adapter_scale))
    return deployment.options(**options).bind(str(model), engine_config, server_config, device, dtype, backend,
                                              torch_threads, cuda_graphs, model_options)


def builder_args(args: dict) -> dict:
    """build_app's keyword arguments from app_builder's `key=value` strings (or a config file's typed `args`)."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("app_builder: give model=PATH (a diffusers folder or .safetensors file every node can read)")
    out: dict = {"model": str(args.pop("model"))}
    if "num_replicas" in args:
        replicas = args.pop("num_replicas")
        out["num_replicas"] = replicas if replicas == "auto" else int(replicas)
    resources = {k: float(args.pop(k)) for k in ("num_gpus", "num_cpus") if k in args}
    scaling = {k: kind(args.pop(k)) for k, kind in AUTOSCALING.items() if k in args}
    options = {k: kind(args.pop(k)) for k, kind in DEPLOYMENT.items() if k in args}
    if scaling:
        options["autoscaling_config"] = scaling
    out.update({k: kind(args.pop(k)) for k, kind in (PICKED | MODEL).items() if k in args})

    def cast(kind: str, text):  # to the field's annotated type (its default's type made 12.5 ms an int)
        if kind.endswith("| None") and (text is None or str(text).lower() in ("none", "null", "")):
            return None  # YAML's null, or none on the command line
        if kind == "bool":
            return _flag(text)
        if kind.startswith("tuple"):  # allowed_origins: a YAML list, or "a,b" on the command line
            return tuple(text) if isinstance(text, (list, tuple)) else tuple(t.strip() for t in str(text).split(","))
        if kind.startswith("int"):  # strict: "8.5" and a YAML 8.5 are errors, not 8
            number = float(text)
            if not number.is_integer():
                raise ValueError("not a whole number")
            return int(number)
        return float(text) if kind == "float" else str(text)

    def typed(name: str, kind: str, text):
        try:
            return cast(kind, text)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"app_builder: {name}={text!r}: expected {kind} ({e})") from None

    def config(cls):
        return cls(**{f.name: typed(f.name, f.type, args.pop(f.name)) for f in fields(cls) if f.name in args})
    out["engine_config"], out["server_config"] = config(EngineConfig), config(ServerConfig)
    if args:
        raise ValueError(f"app_builder: unknown arguments {sorted(args)}")
    return dict(out, ray_actor_options=resources, deployment_options=options)


def app_builder(args: dict):
    """For `serve run backdrop.serve.ray_serve:app_builder model=PATH [num_replicas=N|auto] [num_gpus=G]
    [num_cpus=C] [device=cuda] [dtype=fp16] [max_batch_size=8] [steps=30] ...`, and Serve config files'
    `import_path` + `args`: every EngineConfig and ServerConfig field by name, build_app's device, dtype, backend,
    torch_threads, url_responses and cuda_graphs, the model options (lora=a.safetensors:0.8,b.safetensors and
    textual_inversion=x.safetensors:<tok>, comma-separated or YAML lists; vae, prediction_type, allow_pickle, variant),
    autoscaling (min_replicas, max_replicas, initial_replicas, target_ongoing_requests, upscale_delay_s,
    downscale_delay_s: they imply num_replicas=auto) and the deployment's
    max_ongoing_requests, max_queued_requests, graceful_shutdown_timeout_s, health_check_period_s and
    health_check_timeout_s."""
    return build_app(**builder_args(args))
