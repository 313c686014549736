"""Checkpoints: atomic writes (temporary file, then rename), loading for resume, and models from
checkpoints or `energyvit export` files."""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from energyvit.model import ENERGY_ONLY_KEYS, EnergyViT, config_from_dict


def atomic_write(path: str | Path, write) -> None:
    """Call write(file_object) on a temporary file beside `path`, then rename it over `path`.

    A crash mid-write leaves the previous file intact: rename is atomic on POSIX filesystems. The
    file gets the permissions of any new file (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def save_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A checkpoint's contents, read weights-only: tensors and plain data (dicts, lists, numbers,
    strings) load, anything else is refused before it is built, so no code in the file runs.
    mmap: map the tensors from the file instead of reading them (cheap when only the plain
    entries, such as "args", are needed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL (\S+)", str(e))
        if blocked:
            raise ValueError(f"checkpoint {path} refused: it holds a Python object ({blocked.group(1)}) beyond tensors "
                             "and plain data, and loading it could run code; energyvit checkpoints never hold one, "
                             "so this file was not written by energyvit") from None
        raise ValueError(f"checkpoint {path} could not be read: not a PyTorch checkpoint, or damaged") from None
    except Exception as e:  # a truncated or foreign file: say which file, not a pickle traceback
        raise ValueError(f"checkpoint {path} could not be read: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not the dict energyvit writes")
    return state


PRETRAIN_KEYS = {"model": dict, "model_config": dict, "optimizer": dict, "epoch": int, "step_in_epoch": int,
                 "steps_per_epoch": int, "global_step": int, "args": dict}


def load_pretrain_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A `pretrain` checkpoint to resume from: weights-only, with every entry resuming needs."""
    state = load_checkpoint(path, mmap)
    wrong = [f"'{k}' ({t.__name__})" for k, t in PRETRAIN_KEYS.items() if not isinstance(state.get(k), t)]
    if not wrong and not isinstance(state["args"].get("model"), str):
        wrong = ["the model name in 'args'"]
    if wrong:
        raise ValueError(f"checkpoint {path} lacks {', '.join(wrong)}: not a checkpoint of `energyvit pretrain`")
    return state


FINETUNE_KEYS = {**PRETRAIN_KEYS, "num_classes": int, "pretrained": str, "history": list}


def load_finetune_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A `finetune` checkpoint-last.pth to resume from: weights-only, with every entry resuming needs."""
    state = load_checkpoint(path, mmap)
    wrong = [f"'{k}' ({t.__name__})" for k, t in FINETUNE_KEYS.items() if not isinstance(state.get(k), t)]
    if wrong:
        raise ValueError(f"checkpoint {path} lacks {', '.join(wrong)}: not a checkpoint-last.pth of `energyvit "
                         "finetune`")
    return state


def load_weights(module: torch.nn.Module, state: dict, path: str | Path, strict: bool = True):
    """module.load_state_dict(state), with a mismatch said in one line naming the file."""
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(f"{path} does not match its model config: {first}") from None


TRAINED_ON = ("mask_fill", "tasks")  # metadata of `load_model` that a full export keeps for `restore`


def load_model(path: str | Path, need_energy: bool = True, attn_backend: str = "math") -> tuple[EnergyViT, dict]:
    """(EnergyViT, metadata) from a `pretrain` checkpoint (.pth) or an `export` file (.safetensors).
    The metadata's TRAINED_ON entries, "mask_fill" (JSON) and "tasks" (the --tasks text), say what
    the energy was trained on, where the file records it.

    need_energy: the caller restores images, so the energy readout and step sizes must be in the
    file; an encoder-only export then raises. attn_backend replaces the saved one: the weights do
    not depend on it, and the evaluation tools should run where the training backend may not (the
    LayerNorm/GELU backend goes back to aten for the same reason).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        if "energyvit_model_config" not in meta:
            raise ValueError(f"{path} has no energyvit model config in its metadata; "
                             "was it written by `energyvit export`?")
        config = json.loads(meta["energyvit_model_config"])
    else:
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_config"), dict):
            raise ValueError(f"checkpoint {path} lacks 'model' or 'model_config': not a checkpoint of "
                             "`energyvit pretrain`")
        state, config, meta = ckpt["model"], ckpt["model_config"], {"contents": "full"}
        method = ckpt.get("method", "energy")
        if need_energy and method != "energy":
            raise ValueError(f"{path} was pretrained with --method {method}: its encoder has no trained "
                             "energy to restore with (probe, finetune and export take it)")
        trained = ckpt.get("args") if method == "energy" else None
        trained = trained if isinstance(trained, dict) else {}
        if "mask_fill" in trained:
            meta["mask_fill"] = json.dumps(trained["mask_fill"])
        if isinstance(trained.get("tasks"), str):
            meta["tasks"] = trained["tasks"]
    try:
        model = EnergyViT(replace(config_from_dict(config), attn_backend=attn_backend, ln_gelu_backend="aten"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has an unusable model config: {e}") from None
    missing, unexpected = load_weights(model, state, path, strict=False)
    if unexpected or any(not k.startswith(ENERGY_ONLY_KEYS) for k in missing):
        raise ValueError(f"{path} does not match its model config: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    if missing and need_energy:
        raise ValueError(f"{path} is an encoder-only export without {', '.join(missing)}; "
                         "use the pretraining checkpoint or an `energyvit export --full` file")
    return model.eval(), meta


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} could not be read as safetensors: {e}") from None
