"""What every ``moe-router`` subcommand shares: the error type, argument types, quiet logging.

A subcommand module defines ``add_parser(sub)``: it adds its parser to ``sub`` (the
``argparse`` sub-parsers) and sets ``handler=fn(args, rest) -> int`` on it. Handlers raise
:class:`CLIError` (or a :class:`~moe_router.errors.MoERouterError`) for a bad argument or input;
:func:`moe_router.cli.main` prints ``moe-router CMD: error: MESSAGE`` and returns 2, with no
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence

__all__ = ["CLIError", "choice_list", "native_logs_dropped", "non_negative_int", "positive_int",
           "quiet_frameworks"]


class CLIError(Exception):
    """A user error on the command line: printed as one line, exit status 2."""


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    return _bounded_int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """``argparse`` type: an integer >= 0."""
    return _bounded_int(text, 0, "an integer >= 0")


def _bounded_int(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def choice_list(choices: Sequence[str], allow_empty: bool = False) -> Callable[[str], list[str]]:
    """``argparse`` type: a comma-separated list of names from ``choices`` (order kept,
    duplicates dropped); an unknown name is an error that lists the valid ones."""

    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
        if not names and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(choices)}")
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown))}: expected a comma list of "
                f"{', '.join(choices)}")
        return names

    parse.__name__ = "name list"  # argparse names the type in its messages
    return parse


def quiet_frameworks(verbose: bool = False) -> None:
    """Silence TensorFlow / absl / XLA start-up logging unless ``verbose``: set before the
    frameworks are imported (their C++ logging reads the environment once)."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name in ("tensorflow", "absl", "jax._src.xla_bridge", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="tensorflow")


NATIVE_LOG_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] "
                             r"|WARNING: All log messages before absl::InitializeLog\(\)")


@contextlib.contextmanager
def native_logs_dropped(enabled: bool = True) -> Iterator[None]:
    """Drop the absl/glog lines (``I0000 00:00:... port.cc:153] ...``) that C++ libraries write to
    file descriptor 2 inside the block; other output is written back to ``sys.stderr``, and
    everything is when the block raises.

    TensorFlow logs such lines while it is imported, before ``absl::InitializeLog()``, where
    ``TF_CPP_MIN_LOG_LEVEL`` is not applied yet (abseil/abseil-cpp#1718), so the environment
    alone cannot silence them."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = lines if failed else [ln for ln in lines if not NATIVE_LOG_LINE.match(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
