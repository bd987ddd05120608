"""The MoE debugger: on-device routing counters and traces, sessions, analysis, exports.

``MoEDebugger(model)`` finds every MoE layer of ours in a torch, Flax NNX or Keras model and
switches the ``routing_stats`` observer on while a session runs; ``MoEAnalyzer`` turns a session
record (or a list of manual events) into utilisation, balance, issues and suggestions. See
``docs/debugging.md``.
"""

from __future__ import annotations

from typing import Any

from ..layer.observers import TraceConfig
from .debugger import MoEDebugger

__all__ = ["MoEAnalyzer", "MoEDebugger", "TraceConfig"]


def __getattr__(name: str) -> Any:
    if name == "MoEAnalyzer":
        from .analyzer import MoEAnalyzer

        return MoEAnalyzer
    raise AttributeError(name)
