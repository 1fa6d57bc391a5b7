"""Apply a recipe: in place into a resident model (what a search worker does per trial), or streamed
tensor by tensor into a Hugging Face folder (`mergeopt merge`)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import tensor_store
from .atomic import atomic_folder
from .checkpoints import Checkpoint, check_compatible
from .errors import CheckpointError, UserError
from .methods import TensorContext, get_method, resolve_value
from .recipe import Recipe
from .refs import resolve_model_path

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def open_models(recipe: Recipe, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> tuple[Checkpoint, list[Checkpoint]]:
    """The base and the experts of a recipe, checked against each other."""
    kw = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    experts_refs = [m.model for m in recipe.experts()]
    base_ref = recipe.base_model or experts_refs[0]
    base = Checkpoint(resolve_model_path(base_ref), **kw)
    if recipe.layer_range is not None and list(recipe.layer_range) != [0, base.num_layers]:
        raise UserError(f"slices: layer_range {list(recipe.layer_range)} covers part of {base_ref} "
                        f"({base.num_layers} layers); mergeopt merges whole models: use [0, {base.num_layers}]")
    experts = []
    for ref in experts_refs:
        ck = base if ref == base_ref else Checkpoint(resolve_model_path(ref), **kw)
        if ck is not base:
            check_compatible(base, ck)
        experts.append(ck)
    return base, experts


def merge_tensor(recipe: Recipe, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor], num_layers: int,
                 models: list[dict] | None = None, params: dict | None = None, *, out: torch.Tensor | None = None,
                 memo: dict | None = None) -> torch.Tensor:
    """Merge one tensor (into `out` when given). Per-layer list values are resolved at the tensor's
    layer position."""
    spec = get_method(recipe.merge_method)
    models = recipe.resolved_models() if models is None else models
    params = recipe.resolved_globals() if params is None else params
    m_here = [{k: resolve_value(v, name, num_layers) for k, v in m.items()} for m in models]
    g_here = {k: resolve_value(v, name, num_layers) for k, v in params.items()}
    return spec.fn(base, list(taus), m_here, g_here, TensorContext(name, recipe.seed, out=out, memo=memo))


class ResidentMerger:
    """Holds the base weights and the task vectors tau_i = theta_i - theta_base, computed once, in one
    tier of mergeopt.tensor_store (on the merge's device, or in host memory, full or int8), and merges
    any recipe over the same models into a resident model's own buffers (no new model per candidate).
    Each tensor is merged in float32 and written in the model's dtype."""

    def __init__(self, base: Checkpoint, experts: Sequence[Checkpoint], *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", placement: str = "device"):
        held = torch.device(device) if placement == "device" else torch.device("cpu")
        entries = tensor_store.task_vectors(base, experts, dtype, int8=placement == "int8")
        self._hold(((n, b.to(held), [t.to(held) if isinstance(t, torch.Tensor) else t for t in ts])
                    for n, b, ts in entries), base.num_layers, dtype, device)

    def _hold(self, entries, num_layers: int, dtype: torch.dtype, device: str | torch.device) -> None:
        self.num_layers, self.dtype, self.device = num_layers, dtype, torch.device(device)
        self.base: dict[str, torch.Tensor] = {}
        self.taus: list[dict[str, tensor_store.Stored]] = []
        for n, b, ts in entries:
            self.base[n] = b
            if not self.taus:
                self.taus = [{} for _ in ts]
            for d, t in zip(self.taus, ts, strict=True):
                d[n] = t
        self.names = list(self.base)
        self.memo: dict = {}  # values derived from the task vectors alone (TIES magnitude sketches)

    @classmethod
    def from_entries(cls, entries, num_layers: int, dtype: torch.dtype, device: str | torch.device = "cpu",
                     experts: int | None = None) -> ResidentMerger:
        """From (name, base, stored task vectors) triples, as mergeopt.tensor_store yields or unpacks them."""
        self = cls.__new__(cls)
        self._hold(entries, num_layers, dtype, device)
        if not self.taus and experts:
            self.taus = [{} for _ in range(experts)]
        return self

    @classmethod
    def from_tensors(cls, base: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]], num_layers: int) -> ResidentMerger:
        first = next((v for v in base.values() if v.is_floating_point()), None)
        return cls.from_entries(((n, base[n], [t[n] for t in taus] if base[n].is_floating_point() else [])
                                 for n in sorted(base)), num_layers, first.dtype if first is not None else torch.float32,
                                first.device if first is not None else "cpu", experts=len(taus))

    def stored_bytes(self) -> int:
        return sum(tensor_store.stored_bytes(t) for d in [self.base, *self.taus] for t in d.values())

    def _inputs(self, targets: dict[str, torch.Tensor] | None):
        """(name, base, task vectors) on the device each tensor is merged on (its model buffer's). From a
        host tier to a GPU, the next tensor's copy is issued on a side stream while the current one merges."""
        def where(n: str) -> torch.device:
            return targets[n].device if targets is not None and n in targets else self.device

        def get(n: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
            dev = where(n)
            b = self.base[n]
            if not b.is_floating_point():
                return b, []
            return tensor_store.fetch(b, self.dtype, dev), [tensor_store.fetch(t[n], self.dtype, dev) for t in self.taus]

        copying = [n for n in self.names if self.base[n].device != where(n)]
        if not copying or where(copying[0]).type != "cuda":
            for n in self.names:
                yield (n, *get(n))
            return
        side = torch.cuda.Stream(where(copying[0]))
        with torch.cuda.stream(side):
            nxt = get(self.names[0])
        for i, n in enumerate(self.names):
            torch.cuda.current_stream().wait_stream(side)
            cur = nxt
            for t in (cur[0], *cur[1]):
                if t.device.type == "cuda":
                    t.record_stream(torch.cuda.current_stream())
            if i + 1 < len(self.names):
                with torch.cuda.stream(side):
                    nxt = get(self.names[i + 1])
            yield (n, *cur)

    def merged(self, recipe: Recipe, targets: dict[str, torch.Tensor] | None = None):
        """Yield (name, merged tensor) for every tensor, in name order; written into `targets[name]`
        when that buffer has the right shape, dtype and device."""
        if len(recipe.experts()) != len(self.taus):
            raise UserError(f"recipe has {len(recipe.experts())} experts, the resident merger holds {len(self.taus)}")
        models, params = recipe.resolved_models(), recipe.resolved_globals()
        for n, b, taus in self._inputs(targets):
            if not b.is_floating_point():
                yield n, b
                continue
            yield n, merge_tensor(recipe, n, b, taus, self.num_layers, models, params,
                                  out=None if targets is None else targets.get(n), memo=self.memo)

    @torch.no_grad()
    def merge_into(self, model: torch.nn.Module, recipe: Recipe) -> None:
        """Write the merged weights into `model`'s parameters in place."""
        targets = {n: p.data for n, p in model.named_parameters()}
        targets.update(dict(model.named_buffers()))
        for n, t in self.merged(recipe, targets):
            if n in targets and t.data_ptr() != targets[n].data_ptr():
                targets[n].copy_(t)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


def merge_to_folder(recipe: Recipe, out: str | Path, *, force: bool = False, max_shard_bytes: int = 2 * 1024**3,
                    allow_pickle: bool = False, trust_remote_code: bool = False, device: str = "cpu",
                    recipe_text: str | None = None) -> Path:
    """Stream the merge tensor by tensor into a Hugging Face folder. Peak memory stays near one output
    shard plus the tensors being merged; inputs are read lazily from their safetensors files. The
    folder is written under a temporary name and renamed at the end, so a failed merge leaves nothing."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out}: output folder exists; pass --force to replace it")
    base, experts = open_models(recipe, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    compute = TORCH_DTYPES[recipe.torch_dtype]
    out_dtype = TORCH_DTYPES[recipe.output_dtype]
    models, params = recipe.resolved_models(), recipe.resolved_globals()
    with atomic_folder(out) as tmp:
        shards: list[dict[str, str]] = []
        current: dict[str, torch.Tensor] = {}
        size = 0
        total = 0

        def flush() -> None:
            nonlocal current, size
            if current:
                name = f"shard-{len(shards):05d}.safetensors"
                save_file(current, str(tmp / name), metadata={"format": "pt"})
                shards.append({k: name for k in current})
                current, size = {}, 0

        for n in base.names:
            b = base.get(n)
            if b.is_floating_point():
                b32 = b.float()
                b = b32.to(compute).to(device)
                taus = [(ck.get(n, torch.float32) - b32).to(compute) for ck in experts]
                if recipe.task_vectors == "int8":  # the search's storage, so its rounding is reproduced
                    taus = [tensor_store.quantize_int8(t).dense(compute, device) for t in taus]
                taus = [t.to(device) for t in taus]
                t = merge_tensor(recipe, n, b, taus, base.num_layers, models, params)
                if not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"merged tensor {n} holds NaN or inf (check weights that sum to zero with normalize)")
                t = t.to(out_dtype).cpu().contiguous()
            else:
                t = b
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[n] = t
            size += nbytes
            total += nbytes
        flush()
        _finish_shards(tmp, shards, total)
        cfg = dict(base.config)
        cfg["dtype"] = recipe.output_dtype  # transformers 5's name; `torch_dtype` is deprecated there
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for f in TOKENIZER_FILES:
            if (base.path / f).exists():
                shutil.copy2(base.path / f, tmp / f)
        (tmp / "mergeopt_recipe.yaml").write_text(recipe_text if recipe_text is not None else recipe.to_yaml())
    return out


def _finish_shards(folder: Path, shards: list[dict[str, str]], total: int) -> None:
    """Name the shards as transformers expects: one `model.safetensors`, or `model-0000i-of-0000N`
    files with an index."""
    if len(shards) == 1:
        os.replace(folder / next(iter(shards[0].values())), folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        old = next(iter(shard.values()))
        new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / old, folder / new)
        weight_map.update(dict.fromkeys(shard, new))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
