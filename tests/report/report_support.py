"""Runs with known series and hand-made findings for the report tests."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from gradscope.findings import Finding, Fix
from gradscope.store.run import Run
from gradscope.testing import synthetic_run

N_STEPS = 600
LAYERS = [f"fc{i}" for i in range(6)]
SPIKE_STEP, NAN_STEP = 200, 450


def sample_run(*, status: str = "complete", lr: Any = "schedule", activations: bool = True, layers: list[str] | None = None) -> Run:
    """A six-layer sigmoid MLP-like run: loss over three decades with a NaN, a gradient spike in the
    first layer, gradients shrinking ×10 per layer towards the input, activation statistics."""
    layers = layers or LAYERS
    rng = np.random.default_rng(0)
    loss = np.geomspace(2.3, 0.002, N_STEPS) * (1 + 0.1 * rng.random(N_STEPS))
    loss[NAN_STEP] = np.nan
    grads = {layer: 10.0 ** (i - len(layers)) * (1 + 0.2 * rng.random(N_STEPS)) for i, layer in enumerate(layers)}
    grads[layers[-1]][SPIKE_STEP] = 1e3
    grads[layers[1]][NAN_STEP] = np.inf
    types: dict[str, str] = {}
    acts = [f"act{i}" for i in range(len(layers))]
    for layer, act in zip(layers, acts, strict=True):
        types[layer] = "Linear"
        types[act] = "Sigmoid"
    activation = {
        "act_dead_frac": {act: 0.1 * i for i, act in enumerate(acts)},
        "act_saturated_frac": {act: 0.05 * i for i, act in enumerate(acts)},
        "act_std": {"(input)": 1.0, **{layer: 1.0 / (i + 1) for i, layer in enumerate(layers)}},
    }
    kwargs: dict[str, Any] = {}
    if activations:
        kwargs = {"activations": activation, "activation_steps": np.arange(0, N_STEPS, 25)}
    return synthetic_run(
        loss,
        grad_norm=grads,
        update_norm={layer: np.full(N_STEPS, 10.0 ** (-2 - i)) for i, layer in enumerate(layers)},
        module_types=types,
        lr=np.linspace(0.1, 0.001, N_STEPS) if isinstance(lr, str) else lr,
        status=status,
        meta={"started_at": 1_700_000_000.0, "ended_at": 1_700_000_095.5, "duration_s": 95.5, "user": {"experiment": "sigmoid-6"}},
        **kwargs,
    )


def sample_findings(layers: list[str] | None = None) -> list[Finding]:
    layers = layers or LAYERS
    return [
        Finding(
            "vanishing_gradients",
            "warning",
            0,
            tuple(layers[:3]),
            "gradients shrink 10x per layer towards the input",
            {"ratio_first_last": 1e-5},
            (Fix("activation", "replace nn.Sigmoid with nn.ReLU"), Fix("normalization", "add nn.LayerNorm after each Linear")),
            last_step=N_STEPS - 1,
        ),
        Finding(
            "exploding_gradients",
            "error",
            SPIKE_STEP,
            (layers[-1],),
            "gradient norm jumped 1000x in one step",
            {"grad_norm": 1e3, "median_before": 0.1, "z": float("inf")},
            (Fix("gradient_clipping", "clip_grad_norm_(model.parameters(), max_norm=1.0)"), Fix("learning_rate", "try lr=0.01")),
        ),
        Finding("stalled_training", "info", None, (), "nothing to see", {}, ()),
    ]


HOSTILE = ['<script>alert("layer")</script>', '<img src=x onerror="window.gsPwned=1">', "</script><b>bold</b>"]


def hostile_run() -> tuple[Run, list[Finding]]:
    """A run whose names, metadata and findings carry markup and script: all of it must show as text."""
    run = sample_run(layers=HOSTILE)
    run.meta["model_class"] = "<script>alert('model')</script>"
    run.meta["user"] = {"<script>k</script>": "</script><script>window.gsPwned=2</script>"}
    run.meta["optimizer"] = {"class": "<svg onload=alert(1)>", "param_groups": [{"lr": "<i>x</i>", "n_params": 3}]}
    findings = [
        Finding(
            "<script>code</script>",
            "error",
            5,
            tuple(HOSTILE),
            "message </script><script>window.gsPwned=3</script>",
            {"<b>k</b>": 1.0},
            (),
        )
    ]
    return run, findings


def page_data(page: str) -> dict[str, Any]:
    """The JSON document the page script reads (figures and findings)."""
    match = re.search(r'<script type="application/json" id="gs-data">(.*?)</script>', page, re.S)
    assert match is not None
    data: dict[str, Any] = json.loads(match.group(1))
    return data


def decode(array: Any) -> np.ndarray:
    """A plotly array as numpy: plain lists, or the base64 typed arrays plotly writes for numpy data."""
    if isinstance(array, dict) and "bdata" in array:
        import base64

        values = np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
        if "shape" in array:
            values = values.reshape([int(n) for n in str(array["shape"]).split(",")])
        return values
    return np.asarray(array)


def strip_timestamp(page: str) -> str:
    return re.sub(r'<span id="gs-generated-at">[^<]*</span>', "", page)
