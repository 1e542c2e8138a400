"""Safetensors save / load for tokenizer modules: weights plus their JSON config in the file's metadata.

One file describes itself: ``save_module(module, config_dict, path)`` writes the state dict and
``{"config": json, "kind": ...}`` as safetensors metadata; ``load_state(path, kind)`` reads them back
and checks the file is what the caller expects. No pickle is ever loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def save_module(module: torch.nn.Module, config: dict, path: str | Path, kind: str) -> Path:
    """Write ``module``'s state dict and ``config`` to ``path`` (a ``.safetensors`` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    # safetensors refuses shared storage; tied weights are cloned, and re-tied by load_state_dict.
    seen: dict[int, str] = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            state[key] = tensor.clone()
        seen[ptr] = key
    save_file(state, str(path), metadata={"kind": kind, "config": json.dumps(config)})
    return path


def load_state(path: str | Path, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``(config, state_dict)`` from a file written by ``save_module`` for the same ``kind``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a safetensors file, or holds another kind of module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path} (expected a .safetensors file written by save())")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if metadata.get("kind") != kind:
        raise ValueError(f"{path} holds a {metadata.get('kind', 'unknown')!r} module, expected {kind!r}")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} has no valid JSON config in its metadata") from err
    return config, state
