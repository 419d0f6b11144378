"""Shared by the kernel tests: compile our Triton kernels for an H100 without a GPU."""
import json
import os
import subprocess
import sys

import pytest

# Compiles kernels for an H100 (sm_90a) in a fresh interpreter without TRITON_INTERPRET: triton.compile runs the
# real code generator and the bundled ptxas, no GPU needed. Prints, per kernel, what its PTX contains.
COMPILE_FOR_H100 = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod = importlib.import_module(sys.argv[1])
POINTERS = dict.fromkeys("Q K V O DO DQ DK DV X Y W Bias DY DX".split())  # in the input dtype
POINTERS.update(dict.fromkeys("O32 LSE DELTA PMEAN PM2 MEAN RSTD PS1 PS2 PDW PDB".split(), "fp32"))
for name, dtype, constexprs, ints, warps, stages in json.loads(sys.argv[2]):
    fn = getattr(mod, name).fn  # the autotuner's JITFunction
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.name in constexprs:
            sig[p.name] = "constexpr"
        elif ints.get(p.name) == 1:  # Triton's launcher turns an int argument equal to 1 into a constant
            sig[p.name], constexprs[p.name] = "constexpr", 1
        elif p.name in POINTERS:  # 16-byte aligned, as torch allocates them
            sig[p.name] = "*" + (POINTERS[p.name] or dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "fp32" if p.name in ("qk_scale", "sm_scale", "eps") else "i32"
            if ints.get(p.name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    ptx = k.asm["ptx"]
    print(json.dumps([name, k.metadata.shared, "wgmma" in ptx, "cp.async" in ptx, "ld.global.v4" in ptx]))
"""


def compile_for_h100(module: str, jobs: list) -> list:
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100, module, json.dumps(jobs)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]
