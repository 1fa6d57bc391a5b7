"""Where the base and the task vectors live while a search runs, and how a merge reaches them.

Three tiers (`placement:` in the space file; mergeopt.memory_plan chooses one for `auto`):

- `device`: on the worker's device, in the study's dtype. On a CPU-only node that is the node's one
  shared copy, mapped by every worker.
- `host`: in the node's shared host memory (Ray's object store), one copy for all its workers, moved to
  the device tensor by tensor while the merge runs; on a GPU the next tensor's copy overlaps the
  current tensor's merge. On a CPU-only node this is the same as `device`.
- `int8`: like `host`, with each task vector stored as int8 and one float32 scale per row (absmax / 127),
  dequantized tensor by tensor. This changes the weights being searched, so it is never chosen by
  `auto`, and a recipe records it (`task_vectors: int8`) so `mergeopt merge` reproduces the same bits.

Every tier hands the merge the same thing: the base and each task vector of one tensor, on the merge's
device, in the study's dtype. So the merged bits depend on the tier only through int8's rounding."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PLACEMENTS = ("auto", "device", "host", "int8")
QUANT_BLOCK = 1 << 22  # entries quantized at a time: bounds the float32 temporaries of a huge tensor
DEQUANT_BLOCK = 1 << 15  # entries dequantized at a time on a CPU: the temporaries stay in cache


@dataclass
class Int8Rows:
    """A task vector as int8 with one float32 scale per row (the first dimension; one row for a vector)."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def dense(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """q * scale in float32 (one rounding), then in the study's dtype: the same bits on every device,
        since both steps are correctly rounded IEEE operations. On a CPU in cache-sized row blocks, so the
        float32 temporaries never reach memory (a whole-tensor version ran at a thirtieth of the copy bound)."""
        q = self.q.to(device, non_blocking=True)
        rows = q.reshape(q.shape[0] if q.dim() > 1 else 1, -1)
        scale = self.scale.to(device, non_blocking=True)
        out = torch.empty(rows.shape, dtype=dtype, device=rows.device)
        step = rows.shape[0] if rows.device.type != "cpu" else max(1, DEQUANT_BLOCK // max(1, rows.shape[1]))
        for s in range(0, rows.shape[0], step):
            if dtype == torch.float32:
                torch.mul(rows[s:s + step], scale[s:s + step, None], out=out[s:s + step])
            else:
                out[s:s + step].copy_(rows[s:s + step].float() * scale[s:s + step, None])
        return out.reshape(q.shape)


def quantize_int8(tau: torch.Tensor) -> Int8Rows:
    """Per-row absmax int8 on the CPU (round half to even), a few million entries at a time."""
    tau = tau.detach().cpu()
    rows = tau.reshape(tau.shape[0] if tau.dim() > 1 else 1, -1)
    q = torch.empty(rows.shape, dtype=torch.int8)
    scale = torch.empty(rows.shape[0], dtype=torch.float32)
    step = max(1, QUANT_BLOCK // max(1, rows.shape[1]))
    for s in range(0, rows.shape[0], step):
        block = rows[s:s + step].float()
        amax = block.abs().amax(dim=1)
        sc = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        scale[s:s + step] = sc
        q[s:s + step] = torch.round(block / sc[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Rows(q.reshape(tau.shape), scale)


Stored = torch.Tensor | Int8Rows


def stored_bytes(t: Stored) -> int:
    return t.nbytes if isinstance(t, Int8Rows) else t.numel() * t.element_size()


def task_vectors(base, experts: Sequence, dtype: torch.dtype, *, int8: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor, list[Stored]]]:
    """(name, base, stored task vectors) tensor by tensor, on the CPU: tau_i = theta_i - theta_base in
    float32, then in the study's dtype (and int8 when asked). Only one tensor's inputs are held at a
    time, so the caller decides where the results go (a worker's dicts, or the object store)."""
    for n in base.names:
        raw = base.get(n)
        if not raw.is_floating_point():
            yield n, raw, []
            continue
        b32 = raw.float()
        taus: list[Stored] = []
        for ck in experts:
            tau = (ck.get(n, torch.float32) - b32).to(dtype)
            taus.append(quantize_int8(tau) if int8 else tau)
        yield n, b32.to(dtype), taus


def fetch(t: Stored, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One stored tensor on the merge's device, in the study's dtype."""
    if isinstance(t, Int8Rows):
        return t.dense(dtype, device)
    return t if t.device == device else t.to(device, non_blocking=True)


# -- Ray's object store: one object per tensor name, numpy arrays a node's workers map read-only --

def _np(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    with warnings.catch_warnings():  # shared-memory arrays are read-only; merges never write to them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "torch.bfloat16" else t


def pack(name: str, base: torch.Tensor, taus: list[Stored]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "dtype": str(base.dtype), "base": _np(base)}
    if taus and isinstance(taus[0], Int8Rows):
        out["q"] = [t.q.numpy() for t in taus]
        out["scale"] = [t.scale.numpy() for t in taus]
    else:
        out["taus"] = [_np(t) for t in taus]
    return out


def unpack(payload: dict[str, Any]) -> tuple[str, torch.Tensor, list[Stored]]:
    dt = payload["dtype"]
    base = _torch(payload["base"], dt)
    if "q" in payload:
        taus: list[Stored] = [Int8Rows(_torch(q, "int8"), _torch(s, "float32"))
                              for q, s in zip(payload["q"], payload["scale"], strict=True)]
    else:
        taus = [_torch(a, dt) for a in payload["taus"]]
    return payload["name"], base, taus


def arrays(payload: dict[str, Any]) -> list[np.ndarray]:
    return [payload["base"], *payload.get("taus", []), *payload.get("q", []), *payload.get("scale", [])]


def pin(t: torch.Tensor) -> bool:
    """Page-lock a shared host tensor in place, so its copies to a GPU run asynchronously; best effort
    (read-only mappings need CUDA's read-only registration flag)."""
    if not torch.cuda.is_available() or t.numel() == 0:
        return False
    try:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 8)  # read-only
        return int(getattr(rc, "value", rc)) == 0
    except Exception:  # noqa: BLE001 - unpinned memory still works, synchronously
        return False
