"""Read safetensors files tensor by tensor through a memory map, releasing each tensor's pages after use.

The format is an 8-byte little-endian header length, a JSON header (`name -> {dtype, shape, data_offsets}`)
and the raw little-endian tensor bytes. Each tensor is copied into its destination from
zero-copy views of the mapped file, a chunk of rows at a time (converting dtype and moving to the device
in one `copy_`), and each chunk's pages are dropped from this process's resident set right after
(`MADV_DONTNEED`: the page cache keeps them, the process no longer counts them). That is why this reader
exists next to `safetensors`' own `safe_open`, which maps the whole file for as long as it is open: with
it a single-file checkpoint is resident twice at the end of a load (mapped pages plus the model); here
the peak is the model plus one chunk. Nothing is unpickled; a malformed header is refused with the file's name.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import pathlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fleetlm_runtime.models.errors import ModelLoadError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
CHUNK_BYTES = 16 * 1024 * 1024  # host memory a load needs beyond the model (a 7B model's embedding is 500 MB)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the file
    end: int


def read_header(path: pathlib.Path) -> list[TensorInfo]:
    """The tensors in a safetensors file, in file order, with absolute byte offsets (checked)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise ModelLoadError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError as error:
            raise ModelLoadError(f"{path} has an unreadable safetensors header: {error}") from None
    start = 8 + length
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (start + int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: tensor {name!r} has an unsupported or malformed header entry") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not start <= begin <= end <= size or end - begin != nbytes:
            raise ModelLoadError(f"{path}: tensor {name!r} lies outside the file or has the wrong size")
        tensors.append(TensorInfo(name, dtype, shape, begin, end))
    tensors.sort(key=lambda t: t.begin)  # sequential reads: the kernel's readahead does the rest
    return tensors


class MappedFile:
    """One safetensors file mapped copy-on-write (never written: views of it are only read and copied)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.tensors = read_header(path)
        with path.open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def copy_into(self, info: TensorInfo, target: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> None:
        """Copy tensor `info` into `target` (any dtype, any device), `chunk_bytes` of the file at a time,
        dropping each chunk's pages as soon as it is copied: the host holds at most one chunk beyond the model."""
        if info.end == info.begin:
            return
        row_bytes = (info.end - info.begin) // info.shape[0] if info.shape and info.shape[0] else info.end - info.begin
        rows_per_chunk = max(1, chunk_bytes // max(row_bytes, 1)) if info.shape else 1
        num_rows = info.shape[0] if info.shape else 1
        for first in range(0, num_rows, rows_per_chunk):
            last = min(num_rows, first + rows_per_chunk)
            begin, end = info.begin + first * row_bytes, info.begin + last * row_bytes
            self._advise("MADV_WILLNEED", begin, end, outward=True)  # one read request per chunk (a PVC)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch warns on any mmap-backed buffer
                flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=begin)
            source = flat.view(info.dtype).view((last - first, *info.shape[1:]) if info.shape else ())
            with torch.no_grad():
                (target[first:last] if info.shape else target).copy_(source)  # converts dtype, moves device
            del flat, source  # views must go before the pages are dropped and the map is closed
            self._advise("MADV_DONTNEED", begin, end, outward=False)

    def _advise(self, advice: str, begin: int, end: int, *, outward: bool) -> None:
        """madvise on whole pages: `outward` covers [begin, end); inward drops only pages inside it (a page
        shared with the next tensor stays until that tensor is copied)."""
        flag = getattr(mmap, advice, None)
        if flag is None:  # not every platform has every advice; they only change residency, never results
            return
        page = mmap.PAGESIZE
        if outward:
            start, stop = begin - begin % page, min(-(-end // page) * page, len(self._map))
        else:
            start, stop = -(-begin // page) * page, end - end % page
        if stop > start:
            self._map.madvise(flag, start, stop - start)

    def close(self) -> None:
        # A view that outlived its copy (an error mid-copy holds one) keeps the map; it is unmapped when it goes.
        with contextlib.suppress(BufferError):
            self._map.close()


@contextlib.contextmanager
def mapped(path: pathlib.Path) -> Iterator[MappedFile]:
    file = MappedFile(path)
    try:
        yield file
    finally:
        file.close()
