"""Training checkpoints: weights, updater state, iteration and history as ``.npz`` + JSON, never pickle.

Layout of ``checkpointDir``::

    ckpt-00000010/state.npz   weights, the model's non-trained state (``model_state``, batch normalization's
                              running statistics; empty for most topologies), the updater's arrays under
                              ``updater/<name>``
    ckpt-00000010/meta.json   iteration, objective history, solver, number of weights, trainer extras
    latest.json               {"name": "ckpt-00000010"} -- replaced atomically once the directory is complete

A checkpoint directory is written under a temporary name and renamed into place, then ``latest.json`` is
replaced (``os.replace``), so a crash never leaves a half-written checkpoint as the latest. Older checkpoints
beyond the last ``keep`` are deleted. Paths are local (or mounted) file systems on the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field

import numpy as np

from ..nn.solvers import SolverState

_LATEST = "latest.json"
_UPDATER = "updater/"


@dataclass
class Checkpoint:
    """One saved training state."""

    weights: np.ndarray
    iteration: int
    history: list[float] = field(default_factory=list)
    updater_state: dict[str, np.ndarray] = field(default_factory=dict)
    solver: str = ""
    extra: dict = field(default_factory=dict)  # JSON-able trainer state (epoch, step in epoch, ...)
    model_state: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the model's non-trained state

    @classmethod
    def of(cls, state: SolverState, solver: str, extra: dict | None = None,
           model_state: np.ndarray | None = None) -> Checkpoint:
        """A checkpoint of a solver's state; ``extra``: a mode's own JSON-able state besides the solver's;
        ``model_state``: the model's non-trained state (None: the topology has none)."""
        return cls(state.weights, state.iteration, state.history, state.updater_state, solver,
                   {**state.extra(), **(extra or {})}, np.zeros(0) if model_state is None else model_state)

    def solver_state(self) -> SolverState:
        """The solver's state this checkpoint holds (float64 weights)."""
        state = SolverState(self.weights.astype(np.float64), self.iteration, list(self.history),
                            dict(self.updater_state))
        state.load_extra(self.extra)
        return state


def save_checkpoint(directory: str, ckpt: Checkpoint, keep: int = 2) -> str:
    """Write ``ckpt`` atomically under ``directory``; returns the checkpoint's path."""
    os.makedirs(directory, exist_ok=True)
    name = f"ckpt-{ckpt.iteration:08d}"
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    arrays = {"weights": np.asarray(ckpt.weights), "model_state": np.asarray(ckpt.model_state, dtype=np.float64)}
    arrays.update({_UPDATER + k: np.asarray(v) for k, v in ckpt.updater_state.items()})
    np.savez(os.path.join(tmp, "state.npz"), **arrays)
    meta = {"format": 1, "iteration": int(ckpt.iteration), "history": [float(v) for v in ckpt.history],
            "solver": ckpt.solver, "num_weights": int(np.asarray(ckpt.weights).size), "extra": ckpt.extra}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = os.path.join(directory, f".{_LATEST}.{uuid.uuid4().hex[:8]}")
    with open(latest_tmp, "w") as f:
        json.dump({"name": name}, f)
    os.replace(latest_tmp, os.path.join(directory, _LATEST))
    old = sorted(e for e in os.listdir(directory) if e.startswith("ckpt-") and e != name)
    for e in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(directory, e), ignore_errors=True)
    return final


def load_checkpoint(directory: str) -> Checkpoint | None:
    """The latest checkpoint in ``directory``, or ``None`` when there is none."""
    latest = os.path.join(directory, _LATEST)
    if not directory or not os.path.exists(latest):
        return None
    with open(latest) as f:
        name = json.load(f)["name"]
    path = os.path.join(directory, name)
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        with np.load(os.path.join(path, "state.npz"), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is unreadable: {e}") from e
    if "weights" not in arrays or meta.get("format") != 1:
        raise ValueError(f"checkpoint {path} is not a sparkdl-hetero checkpoint (format 1 with weights)")
    return Checkpoint(weights=arrays["weights"], iteration=int(meta["iteration"]), history=list(meta["history"]),
                      updater_state={k[len(_UPDATER):]: v for k, v in arrays.items() if k.startswith(_UPDATER)},
                      solver=meta.get("solver", ""), extra=meta.get("extra", {}),
                      model_state=arrays.get("model_state", np.zeros(0)))


def load_compatible(directory: str, solver: str, num_weights: int) -> Checkpoint | None:
    """The latest checkpoint when it was written by the same solver for the same number of weights;
    ValueError naming both when ``directory`` holds another training's checkpoint."""
    ckpt = load_checkpoint(directory) if directory else None
    if ckpt is None:
        return None
    if ckpt.solver != solver or ckpt.weights.size != num_weights:
        raise ValueError(f"checkpointDir {directory!r} holds a checkpoint of solver {ckpt.solver!r} with "
                         f"{ckpt.weights.size} weights; this fit uses solver {solver!r} with {num_weights} weights "
                         f"(use another checkpointDir or delete it)")
    return ckpt
