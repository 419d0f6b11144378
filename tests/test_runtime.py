"""backdrop.runtime.keep_freed_memory: large blocks are reused instead of page-faulted in again (glibc only).
Each case runs in its own interpreter: the setting is process-wide and must not leak into the test session."""
import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# A real workload: the tiny preset's VAE decoder at 512x512 (1x32x512x512 fp32 activations, 32 MB each); count the
# page faults of a second call, when every block it needs has been allocated and freed once already.
PROBE = """
import json, resource, sys
import torch
torch.set_num_threads(1)
applied = None
if sys.argv[1] == "tuned":
    from backdrop.runtime import keep_freed_memory
    applied = keep_freed_memory()
from backdrop.nn.checkpoint import init_model
vae = init_model("tiny", seed=0).vae.eval()
z = torch.randn(1, 4, 64, 64)
with torch.inference_mode():
    vae.decode(z)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    vae.decode(z)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(mode: str, env_extra: dict | None = None) -> dict:
    import os

    env = dict(os.environ, **(env_extra or {}))
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_keep_freed_memory_stops_refaulting_large_blocks():
    plain, tuned = _probe("plain"), _probe("tuned")
    assert tuned["applied"] is True
    assert plain["faults"] > 50_000  # every large block is a fresh mmap, faulted in one 4 KiB page at a time
    assert tuned["faults"] < plain["faults"] / 5  # measured: ~245 thousand vs 0 (at most 25 thousand)


def test_opt_out_leaves_malloc_alone():
    out = _probe("tuned", {"BACKDROP_MALLOC": "system"})
    assert out["applied"] is False
    assert out["faults"] > 50_000


# The command decides per subcommand: one-shot jobs keep freed memory; the long-running server leaves it to its
# engine (budgeted, below). Each command here fails fast (no such model), after main() has made that choice.
COMMAND = """
import sys
from backdrop.cli import main
from backdrop.runtime import keeping_freed_memory
sys.argv = ["backdrop"] + sys.argv[1:]
code = main()
print(code, keeping_freed_memory())
"""


@pytest.mark.parametrize("argv, keeps", [
    (["generate", "--model", "/no/such/model", "--prompt", "x"], True),
    (["serve", "/no/such/model"], False),
])
def test_command_keeps_freed_memory_for_jobs_not_servers(tmp_path, argv, keeps):
    r = subprocess.run([sys.executable, "-c", COMMAND, *argv], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    code, kept = r.stdout.split()[-2:]
    assert code == "2" and kept == str(keeps), (r.stdout, r.stderr)


# The server's engine keeps freed memory within a budget: with 1 MiB above the warmed-up footprint, a request at
# 4x the native size grows RSS past it and the worker hands the freed memory back after the batch.
ENGINE = """
import sys, threading
import torch
from backdrop import runtime
from backdrop.diffusion.pipeline import Pipeline
from backdrop.export.backends import make_backend
from backdrop.nn.checkpoint import init_model
from backdrop.serve.engine import Engine, EngineConfig, Item, ServeKey
torch.set_num_threads(1)
pipe = Pipeline(make_backend("torch", init_model("tiny", seed=0), device="cpu", dtype=torch.float32))
engine = Engine(pipe, EngineConfig(cpu_cache_mb=float(sys.argv[1])))
engine.start()
assert engine.ready.wait(120)
done = threading.Event()
key = ServeKey("generate", 256, 256, 2, "dpmpp-2m", engine.config.model_name, (("guidance_scale", 7.5),))
engine.submit(key, [Item("a red mug", seed=s) for s in range(2)], done.set)
assert done.wait(300)
engine.close(60)
m = engine.metrics  # what /metrics says of it
print(runtime.keeping_freed_memory(), engine.memory_trims, int(m.memory_trims.value()), m.cpu_cache_limit.value() > 0)
"""


@pytest.mark.parametrize("budget_mb, keeps", [(1, True), (0, False)])
def test_server_engine_keeps_freed_memory_within_budget(budget_mb, keeps):
    r = subprocess.run([sys.executable, "-c", ENGINE, str(budget_mb)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    kept, trims, counted, limit = r.stdout.split()[-4:]
    assert kept == str(keeps) and limit == str(keeps) and counted == trims
    assert (int(trims) >= 1) if keeps else (trims == "0")
