"""Named LoRA adapters on a Pipeline, as diffusers' pipelines have them: load_lora_weights(adapter_name=),
set_adapters, delete_adapters, disable_lora / enable_lora, fuse_lora / unfuse_lora, unload_lora_weights.

diffusers keeps each LoRA beside the weights (PEFT layers) and adds its output at run time; we merge the LoRAs into
the weights (nn/lora.py: no cost per step, and CUDA graphs and exports see plain weights). What a diffusers pipeline
remembers is kept here: the loaded adapters, the active ones with their weights, whether LoRA is enabled, and what
fuse_lora merged at which lora_scale. Every change takes the merged LoRAs out (bit-exactly, unfuse_lora) and merges
the active ones again, each component at

    lora_scale (our load_lora_weights') x adapter weight (set_adapters') x fuse_lora's lora_scale (until unfused)

which is what diffusers' forward computes with the same calls (tests/test_lora_adapters.py compares the images).
As in diffusers 0.42, loading an adapter makes it the only active one; set_adapters(names, weights) combines
several. After fuse_lora, unload_lora_weights keeps what was fused in the weights and forgets the adapters (diffusers'
"fuse, then unload" recipe), freeing the copies an unload would need. A change that fails (a file gone, an
inf/NaN merge) merges the previous state again and raises; the adapters stay as they were.
"""
from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from backdrop.nn.lora import COMPONENTS, FusedLora, fuse_lora, lora_components, unfuse_lora

log = logging.getLogger(__name__)

_FUSED = ("fuse_lora() merged the adapters for good until unfuse_lora(): call unfuse_lora() first (diffusers "
          "leaves fused weights as they are meanwhile)")


@dataclass(frozen=True)
class Adapter:
    source: Path | dict                  # the LoRA's file, or a copy of the state dict given
    scale: float                         # load_lora_weights' lora_scale
    components: tuple[str, ...]          # those it changes, in COMPONENTS order


@dataclass(frozen=True)
class AdapterState:
    """What a Pipeline's adapters are; what is merged is a function of this alone (plan)."""
    loaded: dict[str, Adapter] = field(default_factory=dict)            # name -> adapter, in loading order
    active: dict[str, float] = field(default_factory=dict)              # name -> set_adapters' weight
    enabled: bool = True                                                # disable_lora() / enable_lora()
    fused: dict[tuple[str, str], float] = field(default_factory=dict)   # (name, component) -> fuse_lora's scale

    def plan(self, fused_only: bool = False) -> list[tuple[Adapter, dict[str, float]]]:
        """[(adapter, {component: scale})] to merge, in order; fused_only: only what fuse_lora merged."""
        if not self.enabled:
            return []
        return [(self.loaded[name], {c: self.loaded[name].scale * weight * self.fused.get((name, c), 1.0)
                                     for c in self.loaded[name].components
                                     if not fused_only or (name, c) in self.fused})
                for name, weight in self.active.items()]


def _number(value, what: str) -> float:
    if isinstance(value, Mapping):
        raise ValueError(f"{what} is a dict (weights per component or block): not supported, give one number")
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


class Adapters:
    """The adapter bookkeeping of one Pipeline; `model` is its torch Model (the caller holds WEIGHT_CHANGES)."""

    def __init__(self):
        self.state = AdapterState()
        self.merged: list[FusedLora] = []  # what is in the weights now, oldest first

    # ------------------------------------------------------------------------------------------- queries
    def active(self) -> list[str]:
        return list(self.state.active)

    def by_component(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, adapter in self.state.loaded.items():
            for c in adapter.components:
                out.setdefault(c, []).append(name)
        return out

    # ------------------------------------------------------------------------------------------- changes
    def load(self, model, source, adapter_name: str | None, scale: float) -> None:
        self._not_fused("load_lora_weights")
        loaded = self.state.loaded
        if adapter_name is None:  # diffusers: default_<number loaded>; past deleted ones, the next free number
            adapter_name = next(f"default_{i}" for i in range(len(loaded), 2 * len(loaded) + 1)
                                if f"default_{i}" not in loaded)
        elif not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if adapter_name in loaded:
            raise ValueError(f"adapter name {adapter_name} is already in use: give another adapter_name= (or "
                             "delete_adapters it first)")
        scale = _number(scale, "load_lora_weights: lora_scale")
        kept = dict(source) if isinstance(source, Mapping) else source  # later changes to the dict do not leak in
        path, components = lora_components(model, kept)  # a bad file or key is refused before anything changes
        adapter = Adapter(path.resolve() if path else kept, scale, components)  # read again from there, whatever cwd
        self.change(model, replace(self.state, loaded={**loaded, adapter_name: adapter}, active={adapter_name: 1.0}))

    def set_active(self, model, adapter_names, adapter_weights=None) -> None:
        self._not_fused("set_adapters")
        names = self._loaded(adapter_names, "set_adapters")
        if len(set(names)) != len(names):
            raise ValueError(f"set_adapters: {names} names an adapter twice")
        weights = adapter_weights if isinstance(adapter_weights, Sequence) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(names)} adapter names but {len(weights)} adapter_weights")
        active = {n: 1.0 if w is None else _number(w, f"set_adapters: the weight of {n}")
                  for n, w in zip(names, weights)}
        self.change(model, replace(self.state, active=active))

    def delete(self, model, adapter_names) -> None:
        self._not_fused("delete_adapters")
        names = self._loaded(adapter_names, "delete_adapters")
        s = self.state
        self.change(model, replace(s, loaded={n: a for n, a in s.loaded.items() if n not in names},
                                   active={n: w for n, w in s.active.items() if n not in names}))

    def enable(self, model, enabled: bool) -> None:
        self._not_fused("enable_lora" if enabled else "disable_lora")
        self.change(model, replace(self.state, enabled=enabled))

    def fuse(self, model, components: Sequence[str], lora_scale: float, adapter_names) -> None:
        if bad := [c for c in components if c not in COMPONENTS]:
            raise ValueError(f"fuse_lora: components {bad}: LoRAs change {' and '.join(COMPONENTS)} only")
        if not components:
            raise ValueError("fuse_lora: components= is empty")
        lora_scale = _number(lora_scale, "fuse_lora: lora_scale")
        names = list(self.state.active) if adapter_names is None else self._loaded(adapter_names, "fuse_lora")
        fused = dict(self.state.fused)
        for key in ((n, c) for n in names for c in components):
            if key in fused:
                log.warning("fuse_lora: %s's %s LoRA is fused already (at lora_scale %g): left so; unfuse_lora() "
                            "first to fuse it at another", *key, fused[key])
            fused.setdefault(key, lora_scale)
        self.change(model, replace(self.state, fused=fused))

    def unfuse(self, model, components: Sequence[str]) -> None:
        s = self.state
        self.change(model, replace(s, fused={k: v for k, v in s.fused.items() if k[1] not in components}))

    def unload(self, model) -> None:
        """Forget every adapter; what fuse_lora merged stays in the weights (and can no longer be undone)."""
        try:
            self._merge(model, self.state.plan(fused_only=True))
        finally:  # failed (a fused adapter's file gone): the weights are the base ones; forgotten all the same
            self.merged.clear()  # the fused part stays: nothing to undo
            self.state = AdapterState()

    # ------------------------------------------------------------------------------------------- merging
    def _loaded(self, adapter_names, what: str) -> list[str]:
        """A name or names given to `what`, each of a loaded adapter (else a ValueError naming those loaded)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"{what}: adapter names are strings, got {adapter_names!r}")
        if missing := [n for n in names if n not in self.state.loaded]:
            raise ValueError(f"{what}: no adapter {', '.join(missing)}; loaded: "
                             f"{', '.join(self.state.loaded) or 'none'}")
        return names

    def _not_fused(self, what: str) -> None:
        if self.state.fused:
            raise ValueError(f"{what}: {_FUSED}")

    def change(self, model, new: AdapterState) -> None:
        """Merge `new`'s plan instead of the current one; on failure merge the current one again and raise."""
        try:
            self._merge(model, new.plan())
        except BaseException:
            try:
                self._merge(model, self.state.plan())
            except Exception as e:  # noqa: BLE001 - e.g. an active adapter's file is gone: the weights stay plain
                log.error("the LoRA adapters active before could not be merged again (%s): none is active", e)
                self.state = replace(self.state, active={})
            raise
        self.state = new

    def _merge(self, model, plan: list[tuple[Adapter, dict[str, float]]]) -> None:
        unfuse_lora(self.merged)  # together: a later LoRA holds no copy of weights an earlier one saved
        self.merged.clear()
        try:
            for adapter, scales in plan:
                self.merged.append(fuse_lora(model, adapter.source, scales, after=self.merged, warn=False))
        except BaseException:
            unfuse_lora(self.merged)
            self.merged.clear()
            raise
