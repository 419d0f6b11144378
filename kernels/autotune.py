"""Triton's autotuner as our kernels use it, alike on every Triton we run: 3.9 on the CPU machines (interpreter),
3.6 in the GPU machine's image."""
from __future__ import annotations

import triton


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read when Triton is imported)."""
    return bool(triton.knobs.runtime.interpret)


def _bench(kernel_call, quantiles):
    # The interpreter can time nothing (there is no GPU driver), so our prune functions keep one config there.
    # Triton >= 3.7 runs a single pruned config untimed; 3.6 still times it and fails, hence this guard.
    if interpreting():
        return [0.0] * len(quantiles)
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def autotune(configs: list, key: list[str], prune):
    """triton.autotune over `configs`, re-tuned when an argument in `key` changes, with `prune(configs, named_args,
    **kwargs)` as early_config_prune (it must keep one config when interpreting)."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, do_bench=_bench)
