"""What every ``moe-router`` subcommand shares: the error type, argument types, quiet logging.

A subcommand module defines ``add_parser(sub)``: it adds its parser to ``sub`` (the
``argparse`` sub-parsers) and sets ``handler=fn(args, rest) -> int`` on it. Handlers raise
:class:`CLIError` (or a :class:`~moe_router.errors.MoERouterError`) for a bad argument or input;
:func:`moe_router.cli.main` prints ``moe-router CMD: error: MESSAGE`` and returns 2, with no
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Callable, Sequence

__all__ = ["CLIError", "choice_list", "positive_int", "quiet_frameworks", "non_negative_int"]


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
    warnings.filterwarnings("ignore", message=".*tf.function retracing.*")
