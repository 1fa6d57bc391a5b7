"""Hugging Face model folders: safetensors reading tensor by tensor (single file or sharded), the
compatibility checks between experts and the base, and resident task vectors."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class Checkpoint:
    """A lazily read model folder: names and shapes come from the safetensors headers; a tensor is
    read only when asked for, so a merge can stream models larger than memory."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: model folder not found")
        cfg_file = self.path / "config.json"
        if not cfg_file.exists() and (self.path / "adapter_config.json").exists():
            raise CheckpointError(f"{self.path}: a PEFT adapter folder (adapter_config.json), not a model; merge it into "
                                  "its base first (PEFT's merge_and_unload, then save_pretrained) and give that folder")
        if not cfg_file.exists():
            raise CheckpointError(f"{cfg_file}: missing; expected a Hugging Face model folder with config.json")
        try:
            self.config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if self.config.get("auto_map") and not trust_remote_code:
            raise CheckpointError(f"{cfg_file}: auto_map: the model needs remote code; pass --trust-remote-code to allow it")
        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {k: self.path / v for k, v in weight_map.items()}
            missing = sorted({str(f) for f in self._files.values() if not f.exists()})
            if missing:
                raise CheckpointError(f"{index}: weight_map names shard {missing[0]}, which does not exist")
        elif single.exists():
            self._files = dict.fromkeys(_header(single), single)
        else:
            pickles = [n for n in PICKLE_NAMES if (self.path / n).exists()]
            if pickles and not allow_pickle:
                raise CheckpointError(f"{self.path / pickles[0]}: pickle checkpoint refused (it can run code when loaded); "
                                      "convert it to safetensors or pass --allow-pickle")
            if not pickles:
                raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
            self._load_pickle(self.path / pickles[0])
        if not hasattr(self, "_pickled"):
            for f in sorted(set(self._files.values())):
                for k, info in _header(f).items():
                    if self._files.get(k) == f:
                        self._shapes[k] = tuple(info["shape"])
                        self._dtypes[k] = info["dtype"]

    def _load_pickle(self, file: Path) -> None:
        if file.name.endswith(".index.json"):
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for s in shards:
                sd.update(torch.load(self.path / s, map_location="cpu", weights_only=True))
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        self._pickled = sd
        self._files = dict.fromkeys(sd, file)
        self._shapes = {k: tuple(v.shape) for k, v in sd.items()}
        self._dtypes = {k: str(v.dtype) for k, v in sd.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def is_floating(self, name: str) -> bool:
        d = self._dtypes[name]
        return d.startswith(("F", "BF", "torch.float", "torch.bfloat", "torch.half"))

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0) or 0)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, checked for NaN and inf."""
        if hasattr(self, "_pickled"):
            t = self._pickled[name]
        else:
            with safe_open(self._files[name], "pt") as fh:
                t = fh.get_tensor(name)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{self.path}: tensor {name} holds NaN or inf values; expected finite weights")
        return t

    def iter_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self.names:
            yield n, self.get(n, dtype)

    def shard_files(self) -> list[Path]:
        return sorted(set(self._files.values()))


def check_compatible(base: Checkpoint, other: Checkpoint) -> None:
    """Raise a CheckpointError that says precisely what differs between `other` and the base."""
    defaults = {"tie_word_embeddings": True}  # transformers' default when a config leaves it out
    for key in ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings"):
        a, b = base.config.get(key, defaults.get(key)), other.config.get(key, defaults.get(key))
        if a != b:
            raise CheckpointError(f"{other.path / 'config.json'}: {key} is {b!r}, expected {a!r} as in the base {base.path}")
    missing = sorted(set(base.names) - set(other.names))
    extra = sorted(set(other.names) - set(base.names))
    if missing:
        raise CheckpointError(f"{other.path}: tensor {missing[0]} is missing; the base {base.path} has it"
                              + (f" ({len(missing)} missing)" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{other.path}: tensor {extra[0]} is not in the base {base.path}")
    for n in base.names:
        if base.shape(n) != other.shape(n):
            raise CheckpointError(f"{other.path}: tensor {n} has shape {list(other.shape(n))}, "
                                  f"expected {list(base.shape(n))} as in the base")


def _header(file: Path) -> dict[str, dict]:
    """A safetensors file's tensor entries (dtype, shape), read from its JSON header alone: no mapping
    of the file, whatever its size."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header
