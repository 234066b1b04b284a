"""glibc's malloc tuned around a model load, so weights that are copied once do not stay resident twice.

glibc serves large blocks with mmap only below a *dynamic* threshold: once a multi-megabyte block is
freed, blocks of that size come from the heap from then on, and freed heap memory is not given back to
the system. A model load allocates every weight once, and the engine's fast path then fuses some of
them (q/k/v, gate/up) into new tensors and frees the originals; under the dynamic rule those freed
originals stay in the process's resident memory next to their fused copies (measured on SmolLM2-135M in
fp32: 742 MB above the weights' 513 MB instead of 553 MB).

`load_phase()` fixes the threshold at 1 MiB while weights are allocated, so each weight tensor is its
own mapping and freeing it returns its pages at once, and afterwards fixes it at 32 MiB (the dynamic
rule's own ceiling), so the per-step activations of serving keep coming from the heap without page
faults. Outside Linux glibc it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
LOAD_MMAP_THRESHOLD = 1 << 20
SERVE_MMAP_THRESHOLD = 32 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only (musl has no mallopt)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def load_phase() -> Iterator[None]:
    """Allocate weights as separate mappings inside; give freed heap back and serve from the heap after."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(_M_MMAP_THRESHOLD, SERVE_MMAP_THRESHOLD)
