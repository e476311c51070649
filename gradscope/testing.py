"""Build :class:`~gradscope.Run` objects from plain arrays, without training anything.

For unit tests of detectors and reports (gradscope's and yours): describe the series a run should
hold and get a ``Run`` exactly like one loaded from disk::

    run = synthetic_run(
        loss=np.geomspace(2.3, 0.1, 500),
        grad_norm={"fc1": np.full(500, 0.5), "fc2": np.full(500, 0.4)},
        module_types={"fc1": "Linear", "act": "ReLU", "fc2": "Linear"},
    )

and, to test what reads a run directory (the CLI, a CI step), write it where a Monitor would have::

    save_run(run, "runs/exploding")  # then: gradscope check runs/exploding
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gradscope.errors import expect_int
from gradscope.store import schema
from gradscope.store.run import Run
from gradscope.store.sqlite import SCHEMA_VERSION, Chunk, RunWriter

__all__ = ["save_run", "synthetic_run"]

ArrayLike = npt.ArrayLike


def synthetic_run(
    loss: ArrayLike,
    *,
    grad_norm: Mapping[str, ArrayLike] | None = None,
    weight_norm: Mapping[str, ArrayLike] | None = None,
    update_norm: Mapping[str, ArrayLike] | None = None,
    grad_missing: Mapping[str, ArrayLike] | None = None,
    output_nonfinite: Mapping[str, ArrayLike] | None = None,
    activations: Mapping[str, Mapping[str, ArrayLike]] | None = None,
    activation_steps: ArrayLike | None = None,
    lr: float | ArrayLike | None = 0.1,
    module_types: Mapping[str, str] | None = None,
    optimizer: str | Mapping[str, Any] | None = "SGD",
    meta: Mapping[str, Any] | None = None,
    status: str = "complete",
) -> Run:
    """A run holding the given series.

    Args:
        loss: ``(n_steps,)`` loss per step; it fixes the number of steps.
        grad_norm, weight_norm, update_norm: per layer (module owning parameters), ``(n_steps,)``
            each, or a scalar broadcast over the steps. Layers are taken in the order given.
        grad_missing: per layer, the number of parameters without a gradient at each step.
        output_nonfinite: per module, 1 where its output held NaN/Inf, NaN where it was not checked
            (``"(input)"`` for the batch, ``"(output)"`` for the model's output); 0 by default.
        activations: ``{metric: {module: series}}`` for ``act_*`` metrics, sampled on
            ``activation_steps`` (default: every step).
        lr: learning rate of param group 0 (scalar or per step); ``None`` for no optimizer.
        module_types: module name → class name, in forward order; defaults to ``Linear`` for every
            layer. Include activation modules (``"ReLU"``, ``"Sigmoid"``) to describe the model.
        optimizer: class name or a full description (``{"class": "Adam", "param_groups": [...]}``).
        meta: extra metadata merged over the defaults.
        status: ``"complete"``, ``"failed"`` or ``"running"`` (partial).
    """
    loss_arr = np.asarray(loss, dtype=np.float64).reshape(-1)
    n = len(loss_arr)
    steps = np.arange(n, dtype=np.int64)
    grad_norm = dict(grad_norm or {})
    layers = list(grad_norm) or ["fc"]
    for extra in (weight_norm or {}, update_norm or {}):
        layers += [name for name in extra if name not in layers]
    types = dict(module_types) if module_types is not None else {name: "Linear" for name in layers}
    for layer in layers:
        types.setdefault(layer, "Linear")

    def per_step(value: ArrayLike | None, default: float) -> np.ndarray:
        if value is None:
            return np.full(n, default)
        arr = np.asarray(value, dtype=np.float64)
        return np.broadcast_to(arr, (n,)).copy() if arr.ndim == 0 else arr.reshape(-1)[:n]

    grads = {layer: per_step(grad_norm.get(layer), 0.1) for layer in layers}
    weights = {layer: per_step((weight_norm or {}).get(layer), 1.0) for layer in layers}
    updates = {layer: per_step((update_norm or {}).get(layer), 1e-3) for layer in layers}
    missing = {layer: per_step((grad_missing or {}).get(layer), 0.0) for layer in layers}
    global_norm = np.sqrt(sum(np.where(np.isnan(g), np.nan, g) ** 2 for g in grads.values()))
    lr_arr = per_step(lr, 0.0) if lr is not None else None

    watched = list(types)
    columns: list[tuple[str, str]] = [(schema.RUN_LAYER, "loss"), (schema.RUN_LAYER, "global_grad_norm")]
    values: list[np.ndarray] = [loss_arr, global_norm]
    if lr_arr is not None:
        columns.append((schema.RUN_LAYER, "lr.0"))
        values.append(lr_arr)
    for metric, series in (
        ("grad_norm", grads),
        ("weight_norm", weights),
        ("update_norm", updates),
        ("grad_nonfinite", {k: (~np.isfinite(v)).astype(float) for k, v in grads.items()}),
        ("grad_missing", missing),
    ):
        for layer in layers:
            columns.append((layer, metric))
            values.append(series[layer])
    for metric, series in (
        ("param_grad_norm", grads),
        ("param_weight_norm", weights),
        ("param_update_norm", updates),
        ("param_grad_missing", {k: (v > 0).astype(float) for k, v in missing.items()}),
    ):
        for layer in layers:
            columns.append((f"{layer}.weight", metric))
            values.append(series[layer])
    nonfinite_out = dict(output_nonfinite or {})
    for name in [*watched, schema.INPUT_LAYER, schema.OUTPUT_LAYER]:  # as a Monitor stores them
        columns.append((name, schema.OUTPUT_NONFINITE))
        values.append(per_step(nonfinite_out.get(name), 0.0))
    step_chunk = Chunk(steps, np.stack(values, axis=1).astype(np.float32))

    act_steps = np.asarray(activation_steps if activation_steps is not None else steps, dtype=np.int64)
    act_columns: list[tuple[str, str]] = []
    act_values: list[np.ndarray] = []
    for metric in schema.ACTIVATION_METRICS:
        given: Mapping[str, ArrayLike] = (activations or {}).get(metric, {})
        for name in [*watched, schema.INPUT_LAYER]:
            act_columns.append((name, metric))
            sampled = given.get(name)
            arr = np.full(len(act_steps), np.nan) if sampled is None else np.broadcast_to(
                np.asarray(sampled, dtype=np.float64), (len(act_steps),)
            )
            act_values.append(np.asarray(arr))
    act_chunk = Chunk(act_steps, np.stack(act_values, axis=1).astype(np.float32))

    if isinstance(optimizer, str):
        opt_meta: dict[str, Any] | None = {
            "class": optimizer,
            "defaults": {"lr": float(lr_arr[0]) if lr_arr is not None and n else None},
            "param_groups": [{"lr": float(lr_arr[0]) if lr_arr is not None and n else None, "n_params": len(layers)}],
        }
    else:
        opt_meta = dict(optimizer) if optimizer is not None else None
    full_meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "gradscope_version": "synthetic",
        "torch_version": "synthetic",
        "model_class": "SyntheticModel",
        "modules": [{"name": "", "type": "SyntheticModel", "n_params": 0, "n_trainable": 0, "is_leaf": False}]
        + [
            {
                "name": name,
                "type": kind,
                "n_params": 100 if name in layers else 0,
                "n_trainable": 100 if name in layers else 0,
                "is_leaf": True,
            }
            for name, kind in types.items()
        ],
        "layers": layers,
        "params": [f"{layer}.weight" for layer in layers],
        "param_layers": list(layers),
        "param_numels": [100] * len(layers),
        "frozen_params": [],
        "params_not_in_optimizer": [],
        "watched": watched,
        "forward_order": watched,
        "optimizer": opt_meta,
        "config": {"flush_every": 50, "activation_every": 1, "update_every": 1, "check_outputs": True},
        "steps": n,
        "user": {},
    }
    full_meta.update(meta or {})
    streams: dict[str, tuple[list[tuple[str, str]], Chunk]] = {
        schema.STEP_STREAM: (columns, step_chunk),
        schema.FORWARD_STREAM: (act_columns, act_chunk),
    }
    return Run(full_meta, streams, events=[])


def save_run(run: Run, log_dir: str | os.PathLike[str], *, rows_per_write: int | None = None) -> Path:
    """Write ``run`` to ``log_dir`` as a :class:`~gradscope.Monitor` would have, and return the path.

    ``rows_per_write`` splits each series into writes of that many rows, as a Monitor flushing
    every ``rows_per_write`` steps does (default: one write). A run whose ``meta["status"]`` is
    ``"running"`` is left as a writer that never closed leaves it, as after a crash.
    Raises ``InvalidInputError`` if ``log_dir`` already holds a run or ``rows_per_write`` is not positive.
    """
    if rows_per_write is not None:
        expect_int("rows_per_write", rows_per_write, at_least=1)
    writer = RunWriter(log_dir)
    meta = dict(run.meta)
    status = str(meta.pop("status", "complete"))
    try:
        writer.set_meta(meta)
        for stream in run._streams:
            columns, steps, data = run._whole_stream(stream)
            writer.define_stream(stream, columns)
            size = rows_per_write or max(len(steps), 1)
            writer.append_chunks((stream, steps[i : i + size], data[i : i + size]) for i in range(0, len(steps), size))
    except BaseException:
        writer.close("failed")  # releases the directory; what was written reads as a failed run
        raise
    if status == "running":
        writer.conn.close()  # no close(): the status stays "running"
        writer._release_lock()
    else:
        writer.close(status)
    return Path(log_dir)
