"""LTP proxies for the skipping layers of one compiled graph, built at compile time from the real weights,
and kept in step with them afterwards (`ProxyWatch`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import calibration as calib
from .config import OptionError
from .passes import locate
from .passes.plan import ltp_dims


def build(analysis, plan, cfg, params: dict) -> tuple[dict[int, tuple], list["ProxyWatch"], str]:
    """(layer -> proxy tensors, one watch per layer, "calibration" or "weights"). `params` maps the graph's
    placeholders to their example inputs (the real weights)."""
    calibration = calib.resolve_calibration(cfg.calibration)
    ffns = [l.ffn for l in analysis.layers]
    if calibration is not None:
        try:
            calibration.check_fits(len(ffns), analysis.layers[0].attn.hidden, [f.intermediate for f in ffns],
                                   family=analysis.layers[0].family.name)
        except ValueError as e:   # the user's calibration does not fit this model: theirs to fix, not a fallback
            raise OptionError(str(e)) from None
    proxies, watched = {}, []
    for spec, lp in zip(analysis.layers, plan.layers):
        if lp.mode != "skip":
            continue
        f = spec.ffn
        weights = tuple(locate.slice_value(w, params.__getitem__) for w in (f.w_gate, f.w_up, f.w_down))
        channels, rank = ltp_dims(plan.schedule, f.intermediate, spec.attn.hidden)
        importance = calibration.importance_for(spec.index) if calibration is not None else None
        watch = ProxyWatch(spec.index, weights, channels, rank, importance)
        proxies[spec.index] = tuple(t.contiguous() for t in watch.build().tensors())
        watched.append(watch)
    return proxies, watched, ("calibration" if calibration is not None else "weights")


@dataclass
class ProxyWatch:
    """One layer's proxy recipe and the weight versions it was built from."""

    layer: int
    weights: tuple
    channels: int
    rank: int
    importance: Any
    versions: tuple = ()

    def __post_init__(self):
        self.versions = self._now()

    def _now(self) -> tuple:
        """Each weight's storage, version and a sampled checksum. The version misses writes through `.data`
        (its own version counter), the storage misses in-place writes; the checksum over every 97th element
        catches a weight that was overwritten wholesale, however it was written (about 1% of its elements)."""
        with torch.no_grad():
            return tuple((w.data_ptr(), w._version, float(w.detach().reshape(-1)[::97].double().sum()))
                         for w in self.weights)

    def build(self):
        return calib.build_ltp_proxy(*self.weights, channels=self.channels, rank=self.rank, importance=self.importance)

    def stale(self) -> bool:
        return self._now() != self.versions

    def rebuild(self):
        """The proxy of the current weights; they count as seen from now on."""
        proxy = self.build()
        self.versions = self._now()
        return proxy
