"""The MoE debugger: on-device routing counters and traces, sessions, analysis, exports.

``MoEDebugger(model)`` finds every MoE layer of ours in a torch, Flax NNX or Keras model and
switches the ``routing_stats`` observer on while a session runs; ``MoEAnalyzer`` turns a session
record (or a list of manual events) into utilisation, balance, issues and suggestions. See
``docs/debugging.md``.

The analyzer, the exporters and the report are imported on first use (``moe_router.debug.X``),
so ``import moe_router.debug`` loads neither TensorBoard, ``prometheus_client`` nor matplotlib
(they are imported only when a file is written, a server started or a plot drawn).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..layer.observers import TraceConfig
from .debugger import MoEDebugger

if TYPE_CHECKING:
    from .analyzer import MoEAnalyzer
    from .files import load_session, read_json, write_csv, write_json
    from .prometheus import MetricsServer, MoERouterCollector, serve_metrics
    from .report import render_report, write_report
    from .tensorboard import write_tensorboard

#: lazily imported names -> their module
_LAZY = {"MoEAnalyzer": "analyzer", "load_session": "files", "read_json": "files",
         "write_csv": "files", "write_json": "files", "write_tensorboard": "tensorboard",
         "MoERouterCollector": "prometheus", "MetricsServer": "prometheus",
         "serve_metrics": "prometheus", "render_report": "report", "write_report": "report"}

__all__ = ["MetricsServer", "MoEAnalyzer", "MoEDebugger", "MoERouterCollector", "TraceConfig",
           "load_session", "read_json", "render_report", "serve_metrics", "write_csv",
           "write_json", "write_report", "write_tensorboard"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
