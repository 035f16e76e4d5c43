"""Kernel sources shipped as the ``sparkdl_hetero.kernels`` package (the repository's top-level kernels/)."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

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
