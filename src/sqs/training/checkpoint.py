"""Checkpoints as safetensors: model and AdamW state, no pickle anywhere.

A training checkpoint holds `model.*` and `optim.<param index>.<state name>`
tensors; scalars (step, running sums) go in the safetensors metadata as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sqs.io import atomic_write


class CheckpointError(RuntimeError):
    pass


def _flat_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for name, val in optimizer.state.get(p, {}).items():
                t = val if torch.is_tensor(val) else torch.tensor(val)
                tensors[f"optim.{i}.{name}"] = t.detach().contiguous().cpu()
    return tensors


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    tensors = _flat_state(model, optimizer)
    metadata = {"meta": json.dumps(meta or {})}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def read_meta(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                    ) -> dict[str, Any]:
    """Restore model (strictly) and optimizer state; return the metadata.

    A checkpoint from a model of another shape raises CheckpointError naming the
    first mismatching tensor, instead of PyTorch's long load_state_dict report.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    model_state, optim_state = {}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            for k in f.keys():
                if k.startswith("model."):
                    model_state[k[6:]] = f.get_tensor(k)
                elif k.startswith("optim."):
                    optim_state[k[6:]] = f.get_tensor(k)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({e}); "
                              "delete it to restart the run from scratch") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(model_state))
    extra = sorted(set(model_state) - set(own))
    if missing or extra:
        raise CheckpointError(f"checkpoint {path} is from another model: missing {missing[:3]}, unexpected {extra[:3]}; "
                              "it was made with a different config")
    for k, t in model_state.items():
        if own[k].shape != t.shape:
            raise CheckpointError(f"checkpoint {path} is from another config: {k} has shape {tuple(t.shape)}, "
                                  f"the model expects {tuple(own[k].shape)}")
    model.load_state_dict(model_state)
    if optimizer is not None and optim_state:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for k, t in optim_state.items():
            i, name = k.split(".", 1)
            per_param.setdefault(int(i), {})[name] = t
        for i, state in per_param.items():
            p = params[i]
            optimizer.state[p] = {n: (t.to(p.device) if n != "step" else t) for n, t in state.items()}
    return meta


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Just the model tensors (for analysis), keys without the `model.` prefix."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            if k.startswith("model."):
                out[k[6:]] = f.get_tensor(k)
    return out
