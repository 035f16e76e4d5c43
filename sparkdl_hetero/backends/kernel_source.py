"""Kernel sources shipped as the ``sparkdl_hetero.kernels`` package (the repository's top-level kernels/)."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

MAX_ELEMENTS = 2**31 - 1  # kernels index the elements of one tensor with 32-bit ints (kernels/portable.h)
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)


@cache
def kernel_source(name: str) -> str:
    """The text of ``kernels/<name>`` with its local ``#include "x.h"`` lines inlined (recursively, each file
    once), so that OpenCL and NVRTC compile it without include paths."""
    return _expand(name, set())


def _expand(name: str, seen: set[str]) -> str:
    if name in seen:
        return ""
    seen.add(name)
    text = resources.files("sparkdl_hetero.kernels").joinpath(name).read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: _expand(m.group(1), seen), text)


def check_launch_size(kernel: str, count: int, sizes: list[int]) -> None:
    """Raise ValueError when a launch's item count or one of its tensors exceeds 32-bit element indexing."""
    big = max([count, *sizes])
    if big > MAX_ELEMENTS:
        raise ValueError(f"{kernel}: {big} elements exceed the kernels' 32-bit indexing ({MAX_ELEMENTS}); "
                         "use smaller batches")
