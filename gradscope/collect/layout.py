"""What a Monitor tracks for a given model: its trainable parameters, the layers that own them, the
modules whose outputs are watched, and the model summary stored with the run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ModelLayout", "describe_optimizer"]


@dataclass
class ModelLayout:
    param_names: list[str]  # qualified names of tracked (trainable) parameters
    params: list[nn.Parameter]
    param_layer: list[int]  # index into layer_names of the module owning each parameter
    layer_names: list[str]  # modules owning trainable parameters directly, in named_modules() order
    watched_names: list[str]  # modules whose outputs are watched: leaves and parameter owners
    watched_modules: list[nn.Module]
    modules: list[dict[str, Any]]  # the model summary
    frozen_params: list[str]

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayout:
        owner: dict[int, str] = {}
        modules: list[dict[str, Any]] = []
        watched_names: list[str] = []
        watched_modules: list[nn.Module] = []
        for name, module in model.named_modules():
            own = list(module.parameters(recurse=False))
            is_leaf = next(module.children(), None) is None
            modules.append(
                {
                    "name": name,
                    "type": type(module).__name__,
                    "n_params": sum(p.numel() for p in own),
                    "n_trainable": sum(p.numel() for p in own if p.requires_grad),
                    "is_leaf": is_leaf,
                }
            )
            for p in own:
                owner.setdefault(id(p), name)  # a tied parameter belongs to the first module that owns it
            if (is_leaf or own) and (module is not model or is_leaf):
                watched_names.append(name)
                watched_modules.append(module)
        param_names: list[str] = []
        params: list[nn.Parameter] = []
        frozen: list[str] = []
        for pname, p in model.named_parameters():
            if p.requires_grad:
                param_names.append(pname)
                params.append(p)
            else:
                frozen.append(pname)
        layer_names: list[str] = []
        for m in modules:
            if any(owner[id(p)] == m["name"] for p in params):
                layer_names.append(m["name"])
        layer_index = {name: i for i, name in enumerate(layer_names)}
        param_layer = [layer_index[owner[id(p)]] for p in params]
        return cls(param_names, params, param_layer, layer_names, watched_names, watched_modules, modules, frozen)


def describe_optimizer(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """Optimizer class and hyperparameters, JSON-safe, for the run's metadata."""
    if optimizer is None:
        return None
    groups = []
    for group in optimizer.param_groups:
        groups.append({k: _jsonable(v) for k, v in group.items() if k != "params"} | {"n_params": len(group["params"])})
    return {"class": type(optimizer).__name__, "defaults": {k: _jsonable(v) for k, v in optimizer.defaults.items()}, "param_groups": groups}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist() if value.numel() < 16 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)
