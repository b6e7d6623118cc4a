"""spts-compile: a torch.compile backend for Self-Predictive Token Skipping (SPTS) prefill.

    model.forward = torch.compile(model.forward, backend="spts")

Importing this package also registers the backend (the entry point does it without an import).
"""
from .config import SPTSConfig
from .calibration import Calibration, calibrate
from .backend import last_plan, recorded_selection, reset_warnings, spts_backend
from .kv_positions import CompactedCacheError
from . import selectors

__all__ = ["SPTSConfig", "Calibration", "calibrate", "spts_backend", "last_plan", "recorded_selection",
           "reset_warnings", "selectors", "CompactedCacheError"]


def _register() -> None:
    """Register "spts" on import. When Dynamo has already discovered the entry point, leave it to Dynamo:
    it may be importing this very package from inside `lookup_backend`, and registers it right after."""
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend
    if "spts" in _COMPILER_FNS or _BACKENDS.get("spts") is not None:
        return
    register_backend(compiler_fn=spts_backend, name="spts")


_register()
