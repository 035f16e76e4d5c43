"""Spark's libsvm text format: ``label index:value ...`` with 1-based ascending indices."""

from __future__ import annotations

import os

import numpy as np


def read_libsvm(path: str | os.PathLike, num_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense features ``X`` (float32, one row per example) and labels ``y`` (float64) from a libsvm file.

    As Spark's ``MLUtils.loadLibSVMFile``: blank lines and lines starting with ``#`` are skipped, indices are
    1-based and strictly increasing within a line, absent features are 0. ``num_features`` None (or <= 0)
    infers it as the largest index. Raises ``ValueError`` naming the file, line and token on bad input.
    """
    name = os.fspath(path)
    labels: list[float] = []
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            tokens = line.split()
            where = f"{name}, line {lineno}"
            try:
                labels.append(float(tokens[0]))
            except ValueError:
                raise ValueError(f"{where}: the label {tokens[0]!r} is not a number") from None
            idx = np.empty(len(tokens) - 1, dtype=np.int64)
            val = np.empty(len(tokens) - 1, dtype=np.float64)
            for j, tok in enumerate(tokens[1:]):
                i, sep, v = tok.partition(":")
                try:
                    if not sep:
                        raise ValueError
                    idx[j], val[j] = int(i), float(v)
                except ValueError:
                    raise ValueError(f"{where}: expected index:value, got {tok!r}") from None
            if idx.size and idx[0] < 1:
                raise ValueError(f"{where}: indices are 1-based, got index {idx[0]}")
            if np.any(np.diff(idx) <= 0):
                k = int(np.argmax(np.diff(idx) <= 0))
                raise ValueError(f"{where}: indices must be strictly increasing, got {idx[k]} then {idx[k + 1]}")
            rows.append((idx - 1, val))
    inferred = max((int(i[-1]) + 1 for i, _ in rows if i.size), default=0)
    if num_features is None or num_features <= 0:
        num_features = inferred
    elif inferred > num_features:
        line = next(n for n, (i, _) in enumerate(rows) if i.size and i[-1] + 1 > num_features)
        raise ValueError(f"{name}: example {line} has feature index {int(rows[line][0][-1]) + 1} but "
                         f"num_features is {num_features}")
    x = np.zeros((len(rows), num_features), dtype=np.float32)
    for r, (i, v) in enumerate(rows):
        x[r, i] = v
    return x, np.asarray(labels, dtype=np.float64)
