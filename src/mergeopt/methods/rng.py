"""Counter-based random numbers for the random masks (DARE, DELLA).

Entry i of a tensor gets 24 random bits from a hash of (key, i): a first round mixes i with a word of the
(recipe seed, tensor name), which all models share, a second mixes the result with a word of the
(seed, name, model index). Nothing is sequential: any block of a tensor can be drawn on its own, on any
device, eagerly or inside a compiled kernel, and gives the same bits. A stateful generator cannot do
that: its numbers depend on how many were drawn before, and it runs on one device.

The hash is two rounds of Chris Wellons' `lowbias32` integer mixer on int32 arithmetic that wraps (it
does on every torch backend); `bits24_reference` is the same function on Python integers, for tests.
"""

from __future__ import annotations

import hashlib

import torch

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
BITS = 24
ONE = 1 << BITS  # a keep threshold of ONE keeps every entry


def _signed(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _word(text: str) -> int:
    return _signed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little"))


def mask_key(seed: int, name: str, model_index: int) -> tuple[int, int]:
    """Two int32 words (as signed Python ints): one of (seed, tensor name), shared by the models of a
    tensor so the first hash round is computed once, and one of (seed, name, model index)."""
    return _word(f"{seed}/{name}"), _word(f"{seed}/{name}/{model_index}")


def keep_threshold(keep_prob: float) -> int:
    """Entries whose bits are below this are kept: P(keep) = threshold / 2**24."""
    return max(0, min(ONE, int(keep_prob * ONE + 0.5)))


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 values (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (32 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shr(x, 16)
    x = x * _M1
    x = x ^ _shr(x, 15)
    x = x * _signed(_M2)
    return x ^ _shr(x, 16)


def stream(index: torch.Tensor, k0: int | torch.Tensor) -> torch.Tensor:
    """The first round, shared by every model of a tensor."""
    return _mix(index ^ k0)


def bits_from(stream_values: torch.Tensor, k1: int | torch.Tensor) -> torch.Tensor:
    """The second round: 24 random bits (int32 in [0, 2**24)) per entry for one model."""
    return _shr(_mix(stream_values ^ k1), 32 - BITS)


def bits24(index: torch.Tensor, k0: int | torch.Tensor, k1: int | torch.Tensor) -> torch.Tensor:
    """24 random bits for each int32 element index."""
    return bits_from(stream(index, k0), k1)


def block_bits(key: tuple[int, int], start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The bits of entries [start, start + n) of a flattened tensor."""
    if start + n > 2**31 - 1:
        raise ValueError(f"random masks index tensors of up to 2**31 - 1 entries, not {start + n}")
    idx = torch.arange(start, start + n, dtype=torch.int32, device=device)
    return bits24(idx, key[0], key[1])


def uniform(key: tuple[int, int], n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 uniforms in [0, 1), exact multiples of 2**-24."""
    return block_bits(key, 0, n, device).to(torch.float32) * (1.0 / ONE)


def bits24_reference(i: int, k0: int, k1: int) -> int:
    def mix(x: int) -> int:
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * _M1) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * _M2) & 0xFFFFFFFF
        return x ^ (x >> 16)

    return mix(mix(i ^ (k0 & 0xFFFFFFFF)) ^ (k1 & 0xFFFFFFFF)) >> (32 - BITS)
