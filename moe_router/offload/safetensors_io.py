"""Lazy, counted reads of safetensors checkpoints (the disk tier), framework-free.

Only the headers are parsed when a checkpoint is opened (``model.safetensors`` or the shards
of ``model.safetensors.index.json``); tensor bytes are read on request, one byte range at a time,
with positional reads (``os.pread``: safe from several threads) straight into the caller's
buffer. :class:`ByteReader` counts every read (``bytes_read``, ``reads``, ``max_read``) so that a
test can prove a file is never read whole.

The format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data (offsets relative to it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
from collections.abc import Mapping
from typing import Any

from ..errors import InputError

#: safetensors dtype -> (name, bytes per element)
DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
          "BF16": ("bfloat16", 2), "I64": ("int64", 8), "I32": ("int32", 4),
          "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1)}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``file``, absolute byte ``offset``, ``nbytes``; its
    ``dtype`` name (:data:`DTYPES` values) and ``shape``."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def itemsize(self) -> int:
        return next(size for name, size in DTYPES.values() if name == self.dtype)

    def row_range(self, index: int) -> tuple[int, int]:
        """``(offset, nbytes)`` of ``tensor[index]`` (a leading-dimension row: contiguous)."""
        if not self.shape or not 0 <= index < self.shape[0]:
            raise InputError("index", f"expected 0 <= index < {self.shape[:1]} for {self.name}")
        row = self.nbytes // self.shape[0]
        return self.offset + index * row, row


def read_header(path: str) -> dict[str, TensorEntry]:
    """The tensors of one ``.safetensors`` file (reads only its header).

    Raises:
        InputError: not a safetensors file, or an unknown dtype.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise InputError("path", f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise InputError("path", f"{path} is not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise InputError("path", f"{path} is not a safetensors file: {err}") from err
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise InputError("path", f"{path}: tensor {name} has unsupported dtype "
                             f"{info['dtype']}")
        begin, end = info["data_offsets"]
        out[name] = TensorEntry(path, name, DTYPES[info["dtype"]][0], tuple(info["shape"]),
                                base + begin, end - begin)
    return out


def checkpoint_entries(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint folder (single file or sharded index) or file.

    Raises:
        InputError: naming ``path``, when it holds no safetensors checkpoint.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return read_header(path)
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, TensorEntry] = {}
        for name in files:
            out.update(read_header(os.path.join(path, name)))
        return out
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return read_header(single)
    raise InputError("path", f"{path!r} has no {SINGLE_FILE} or {INDEX_FILE} (save the model "
                     "with save_pretrained(..., safe_serialization=True))")


class ByteReader:
    """Positional reads with counters (thread-safe); ``close()`` releases the files.

    Attributes:
        bytes_read: bytes read so far; reads: read calls; max_read: the largest single read.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads = 0
        self.max_read = 0

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def read_into(self, file: str, offset: int, buffer: Any) -> int:
        """Fill the writable byte buffer ``buffer`` (anything ``memoryview`` takes, e.g. a
        ``uint8`` NumPy array) from ``file`` at ``offset``; returns the bytes read.

        Raises:
            InputError: the file ended early.
        """
        view = memoryview(buffer).cast("B")
        fd, done, n = self._fd(file), 0, view.nbytes
        while done < n:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise InputError("path", f"{file} ended at byte {offset + done}, expected "
                                 f"{offset + n}")
            done += got
        with self._lock:
            self.bytes_read += n
            self.reads += 1
            self.max_read = max(self.max_read, n)
        return n

    def stats(self) -> Mapping[str, int]:
        with self._lock:
            return {"bytes_read": self.bytes_read, "reads": self.reads,
                    "max_read": self.max_read}

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
