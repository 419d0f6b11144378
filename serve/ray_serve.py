"""Beyond one machine: the Backdrop server as a Ray Serve deployment (https://docs.ray.io/en/latest/serve/).

One `backdrop serve` process drives one accelerator. To use several GPUs, or several machines, we do not write a
cluster scheduler: Ray Serve already runs replicas across GPUs and nodes, restarts dead ones, autoscales, and puts
one HTTP proxy per node in front of them. Each replica is exactly our single-machine server: it loads the model,
runs its own Batcher + worker thread (dynamic batching stays per GPU, where it pays) and serves the same ASGI app
(serve/server.py), so every endpoint, error, limit and metric behaves as in `backdrop serve`.

    from backdrop.serve.ray_serve import build_app
    from ray import serve
    serve.run(build_app("/models/sd15-inpaint", num_replicas=4, ray_actor_options={"num_gpus": 1}),
              route_prefix="/")

or from a shell, on a running Ray cluster (`ray start --head` on one node, `ray start --address=HEAD:6379` on
the others):

    serve run backdrop.serve.ray_serve:app_builder model=/models/sd15-inpaint num_replicas=4 num_gpus=1

Then point OpenAI clients at http://<any node>:8000/v1. Things to know:
  * `max_ongoing_requests` is set to the engine's max_queue: Ray's default (5 per replica) would starve the
    batcher. Past it, Ray's proxy queues; our 429 + Retry-After comes from a replica whose queue is full.
  * Put the model on storage every node can read (or the same path on every node): each replica loads it.
  * "url" responses point at the proxy that answered, but the file lives in one replica's memory, so use
    b64_json behind Ray (the default), or add session affinity.
  * Replicas are independent: /metrics through the proxy shows one replica's numbers; scrape the replicas or use
    Ray's own metrics for totals.
  * A client that disconnects cancels its request in the replica (the handler is cancelled; it calls
    Engine.abandon), as under uvicorn.
Tested (tests/test_ray_serve.py) on one CPU machine: a local Ray instance, two replicas of the tiny model.
"""
from __future__ import annotations

from dataclasses import asdict

from backdrop.serve.engine import EngineConfig
from backdrop.serve.server import ServerConfig

__all__ = ["build_app", "app_builder"]


def build_app(model: str, engine_config: EngineConfig = EngineConfig(), server_config: ServerConfig = ServerConfig(),
              num_replicas: int | str = 1, ray_actor_options: dict | None = None, device: str | None = None,
              dtype: str | None = None, backend: str = "torch", torch_threads: int | None = None,
              name: str = "backdrop"):
    """A Ray Serve application (pass it to `serve.run`): `num_replicas` copies of the server for `model`.
    ray_actor_options: resources per replica, e.g. {"num_gpus": 1} (one GPU each) or {"num_cpus": 4}.
    num_replicas="auto" lets Ray autoscale. torch_threads: intra-op threads per replica (CPU serving)."""
    from ray import serve

    @serve.deployment(name=name)
    @serve.ingress()  # the ASGI app is built per replica, after __init__, by __serve_build_asgi_app__
    class BackdropReplica:
        def __init__(self, model, engine_config, server_config, device, dtype, backend, torch_threads):
            import torch

            from backdrop.diffusion.pipeline import Pipeline
            from backdrop.serve.cuda_graphs import GraphedBackend
            from backdrop.serve.engine import Engine

            if torch_threads:
                torch.set_num_threads(torch_threads)
            pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype, backend=backend)
            if backend == "torch" and torch.device(pipe.backend.device).type == "cuda":
                pipe = Pipeline(GraphedBackend(pipe.backend))
            self.engine = Engine(pipe, engine_config)
            self.server_config = server_config

        def __serve_build_asgi_app__(self):
            from backdrop.serve.server import create_app

            return create_app(self.engine, self.server_config)  # its lifespan starts the batch worker

    deployment = BackdropReplica.options(num_replicas=num_replicas, ray_actor_options=ray_actor_options or {},
                                         max_ongoing_requests=engine_config.max_queue)
    return deployment.bind(str(model), engine_config, server_config, device, dtype, backend, torch_threads)


def app_builder(args: dict):
    """For `serve run backdrop.serve.ray_serve:app_builder model=PATH [num_replicas=N] [num_gpus=G]
    [num_cpus=C] [device=cuda] [dtype=fp16] [max_batch_size=8] [steps=30] ...`: every EngineConfig and
    ServerConfig field may be given by name."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("app_builder: give model=PATH (a diffusers folder or .safetensors file every node can read)")
    model = args.pop("model")
    resources = {k: float(args.pop(k)) for k in ("num_gpus", "num_cpus") if k in args}
    replicas = args.pop("num_replicas", 1)
    replicas = replicas if replicas == "auto" else int(replicas)
    picked = {k: args.pop(k) for k in ("device", "dtype", "backend", "torch_threads") if k in args}

    def cast(default, text):  # `serve run` passes strings
        if isinstance(default, bool):
            return str(text).lower() in ("1", "true", "yes")
        return int(text) if default is None else type(default)(text)

    def config(cls):
        return cls(**{k: cast(v, args.pop(k)) for k, v in asdict(cls()).items() if k in args})
    engine_config, server_config = config(EngineConfig), config(ServerConfig)
    if args:
        raise ValueError(f"app_builder: unknown arguments {sorted(args)}")
    if "torch_threads" in picked:
        picked["torch_threads"] = int(picked["torch_threads"])
    return build_app(model, engine_config, server_config, num_replicas=replicas, ray_actor_options=resources,
                     **picked)
