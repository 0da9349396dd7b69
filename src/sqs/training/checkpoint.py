"""Checkpoints as safetensors: model and AdamW state, no pickle anywhere, content-verified.

A training checkpoint holds `model.*` and `optim.<param index>.<state name>`
tensors; scalars (step, running sums) go in the safetensors metadata as JSON.

Integrity: every file carries, in its safetensors metadata (`sqs_sha256`), the sha256 of
its content: each tensor's name, dtype, shape and bytes (in name order) and the metadata
JSON. The hash travels with the file (a renamed or copied checkpoint still verifies), and
loading recomputes it, so a file with flipped bits is refused with its name instead of
being trained on. A file is written to a temporary name, read back and verified, then
renamed into place; with `keep_previous` the file it replaces stays as
`<name>.prev.safetensors` until then. Files from before this scheme (no hash) still load,
with a one-time note. Tensors that are not finite are never written (`NonFiniteState`).

What is called damage: only what an integrity check finds, a header safetensors cannot parse or a
sha256 that does not match. An operating-system error (read-only, full disk, permission, quota, a
path safetensors cannot encode) stays an OSError naming the file, and a save or read holds Ctrl-C
and SIGTERM back until it ends (`sqs.training.signals.deferred_signals`), so an interruption is
never mistaken for a damaged file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sqs.io import DataWarning, UserError, atomic_write, naming_errors
from sqs.training.signals import deferred_signals

HASH_KEY = "sqs_sha256"


class CheckpointError(UserError, RuntimeError):
    """A weights file that cannot be used: missing, unreadable, or from another model."""


class CheckpointCorrupt(CheckpointError):
    """A weights file whose content does not match its stored sha256 (damaged on disk)."""


class NonFiniteState(CheckpointError):
    """Refused to write a checkpoint whose parameters or optimizer state hold inf or NaN."""

    def __init__(self, message: str, tensor: str):
        super().__init__(message)
        self.tensor = tensor


def previous_path(path: str | Path) -> Path:
    """Where `save_checkpoint(..., keep_previous=True)` keeps the file it replaces."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _flat_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for name, val in optimizer.state.get(p, {}).items():
                t = val if torch.is_tensor(val) else torch.tensor(val)
                tensors[f"optim.{i}.{name}"] = t.detach().contiguous().cpu()
    return tensors


def content_hash(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order, then the metadata."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(b"meta|" + meta_json.encode())
    return h.hexdigest()


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding inf or NaN, else None."""
    for k, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return k
    return None


def os_error(err: SafetensorError, path: str | os.PathLike) -> OSError | None:
    """The OSError inside a safetensors error (its I/O errors carry "(os error N)"; a path it
    cannot encode says "not valid UTF-8"), naming `path`; None for a format error."""
    text = str(err)
    m = re.search(r"\(os error (\d+)\)", text)
    if m:
        n = int(m.group(1))
        return OSError(n, os.strerror(n), os.fspath(path))
    if "not valid UTF-8" in text:
        return OSError(errno.EILSEQ, "the path is not valid UTF-8, which safetensors needs (name not encodable)",
                       os.fspath(path))
    return None


def _open_error(err: SafetensorError, path: Path) -> Exception:
    """What a safetensors error on `path` means: an OSError, or a header that does not parse (damage)."""
    return os_error(err, path) or CheckpointCorrupt(
        f"checkpoint {path} is not a valid safetensors file ({err}); it is not used; move it away "
        "(or the run directory, to start over)")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with deferred_signals(), naming_errors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise _open_error(e, path) from e
        except FileNotFoundError as e:  # gone since the check above
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(path)) from e
    return tensors, metadata


_NOTED: set[str] = set()


def _verify(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    stored = metadata.get(HASH_KEY)
    meta_json = metadata.get("meta", "{}")
    if stored is None:
        key = str(path.resolve())
        if key not in _NOTED:
            _NOTED.add(key)
            warnings.warn(f"{path} has no content hash (written by an older sqs); loaded without verification",
                          DataWarning, stacklevel=3)
    elif content_hash(tensors, meta_json) != stored:
        raise CheckpointCorrupt(f"checkpoint {path} is damaged: its content does not match its sha256 "
                                "(bits changed on disk); it is not used")
    return _parse_meta(meta_json, path)


def _parse_meta(meta_json: str, path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata (a JSON object in its header); CheckpointCorrupt, naming `path`, when
    it does not parse: a header sqs wrote always does, so this is damage, not an unknown error."""
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as e:
        raise CheckpointCorrupt(f"checkpoint {path} has unreadable metadata ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointCorrupt(f"checkpoint {path} has metadata that is not a JSON object")
    return meta


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read `path` completely and check its sha256; return its metadata (step, ...).

    Raises CheckpointCorrupt naming the file when its header does not parse or its sha256 does
    not match; an OSError (naming it) when it cannot be read."""
    path = Path(path)
    return _verify(path, *_read(path))


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    meta: dict[str, Any] | None = None, *, keep_previous: bool = False) -> Path:
    """Write model (+ optimizer) state and `meta` to `path`, verified, atomically.

    Raises NonFiniteState (and writes nothing) if any tensor holds inf/NaN. With
    `keep_previous`, the file being replaced stays as `previous_path(path)`.
    """
    path = Path(path)
    tensors = _flat_state(model, optimizer)
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise NonFiniteState(f"not writing {path}: tensor {bad} holds inf or NaN", bad)
    meta_json = json.dumps(meta or {})
    metadata = {"meta": meta_json, HASH_KEY: content_hash(tensors, meta_json)}

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise (os_error(e, tmp) or e) from e
        verify_checkpoint(tmp)  # what is on disk reads back as what we meant to write

    with deferred_signals():  # a Ctrl-C or SIGTERM waits until the file is in place (or removed)
        if keep_previous and path.exists():
            _keep_as_previous(path)
        return atomic_write(path, write)


def _keep_as_previous(path: Path) -> None:
    """Make `previous_path(path)` the file now at `path` (a hard link; a copy where links fail)."""
    prev = previous_path(path)
    tmp_link = prev.with_name(f".{prev.name}.link")
    with naming_errors(prev, tmp_link):
        tmp_link.unlink(missing_ok=True)
        try:
            try:
                os.link(path, tmp_link)  # cheap: the old file keeps its inode under the new name
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise  # a copy would fail the same way
                shutil.copy2(path, tmp_link)
            os.replace(tmp_link, prev)
        except BaseException:
            tmp_link.unlink(missing_ok=True)
            raise


def header_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of `path` (its header only: nothing verified).

    CheckpointCorrupt when the header does not parse, an OSError when the file cannot be read."""
    path = Path(path)
    with deferred_signals(), naming_errors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {})
        except SafetensorError as e:
            raise _open_error(e, path) from e
        except FileNotFoundError as e:  # safetensors' own has no errno: give it one, naming the file
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(path)) from e


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint (step, ...), read from the header only: not verified.

    CheckpointCorrupt when the header or the metadata does not parse, an OSError when the file
    cannot be read."""
    return _parse_meta(header_metadata(path).get("meta", "{}"), path)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                    ) -> dict[str, Any]:
    """Verify `path`, restore model (strictly) and optimizer state; return the metadata.

    A damaged file raises CheckpointCorrupt naming it. A checkpoint from a model of
    another shape raises CheckpointError naming the first mismatching tensor, instead of
    PyTorch's long load_state_dict report.
    """
    path = Path(path)
    tensors, metadata = _read(path)
    meta = _verify(path, tensors, metadata)
    model_state = {k[6:]: t for k, t in tensors.items() if k.startswith("model.")}
    optim_state = {k[6:]: t for k, t in tensors.items() if k.startswith("optim.")}
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
        try:
            for k, t in optim_state.items():
                i, name = k.split(".", 1)
                per_param.setdefault(int(i), {})[name] = t
            names = {frozenset(s) for s in per_param.values()}
            if len(names) > 1:
                raise ValueError(f"parameters hold different optimizer state names: {sorted(map(sorted, names))[:2]}")
            need = {"step", "exp_avg", "exp_avg_sq"} if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) else set()
            if names and need - set(next(iter(names))):
                raise ValueError(f"Adam state without {sorted(need - set(next(iter(names))))}")
            for i, state in per_param.items():
                if not 0 <= i < len(params):
                    raise ValueError(f"optimizer state {i} for a model with {len(params)} parameters")
                p = params[i]
                for n, t in state.items():
                    if n != "step" and t.shape != p.shape:
                        raise ValueError(f"optimizer state {i}.{n} has shape {tuple(t.shape)}, "
                                         f"the parameter {tuple(p.shape)}")
                optimizer.state[p] = {n: (t.to(p.device) if n != "step" else t) for n, t in state.items()}
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"checkpoint {path} holds optimizer state for another model ({e}); "
                                  "it was made with a different config") from e
    return meta


def load_weights(path: str | Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """Just the model tensors (for analysis), keys without the `model.` prefix; verified
    against the file's sha256 unless `verify` is False."""
    path = Path(path)
    tensors, metadata = _read(path)
    if verify:
        _verify(path, tensors, metadata)
    return {k[6:]: t for k, t in tensors.items() if k.startswith("model.")}
