"""Batched greedy generation with left padding and a KV cache: the hot loop of harm and
over-refusal scoring, and of the zoo's report card."""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .memo import Memo


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token of each row's last position. On CPU the argmax runs in numpy, with the same
    rule (the first maximum; a NaN counts as the maximum): torch's CPU argmax over a vocabulary row is
    several times slower (`bench/eval_overhead.py` measures both)."""
    last = logits[:, -1]
    if last.device.type == "cpu" and last.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(last.numpy().argmax(-1))
    return last.argmax(-1)


def cache_argument(model: PreTrainedModel) -> str:
    """The forward argument (and output field) that carries the KV cache: `cache` from transformers
    5.24, where `past_key_values` is deprecated (gone in 5.40); `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy_continue(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, eos: int,
                    pad: int) -> torch.Tensor:
    """Greedy new tokens for a left-padded batch, [batch, <= max_new_tokens]; `pad` after a row's EOS.
    Stops as soon as every row has produced EOS. The attention mask and positions of every step are
    views of tensors made once, so a step costs the forward pass and a handful of small operations."""
    rows, width = ids.shape
    full_mask = torch.ones(rows, width + max_new_tokens, dtype=mask.dtype, device=mask.device)
    full_mask[:, :width] = mask
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    out = torch.full((rows, max_new_tokens), pad, dtype=ids.dtype, device=ids.device)
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    past = None
    name = cache_argument(model)
    step_ids, step_pos = ids, positions[:, :width]
    for step in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=full_mask[:, : width + step], position_ids=step_pos,
                    use_cache=True, **{name: past})
        past = getattr(res, name)
        nxt = greedy_tokens(res.logits).to(ids.device).masked_fill_(done, pad)
        out[:, step] = nxt
        done |= nxt == eos
        if bool(done.all()):
            return out[:, : step + 1]
        step_ids, step_pos = nxt[:, None], positions[:, width + step: width + step + 1]
    return out


Batch = tuple[list[int], torch.Tensor, torch.Tensor]  # (prompt indices, input ids, attention mask)


def encode_prompts(tok: PreTrainedTokenizerBase, prompts: list[str], *, batch_size: int = 128,
                   add_special_tokens: bool = False) -> list[Batch]:
    """Left-padded batches of `prompts`, sorted by length so a batch carries little padding. A scorer that
    sends the same prompts for every candidate encodes them once and keeps the batches."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].split()))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        batches.append((idx, enc["input_ids"], enc["attention_mask"]))
    return batches


def generate_encoded(model: PreTrainedModel, tok: PreTrainedTokenizerBase, batches: list[Batch], *,
                     max_new_tokens: int = 8, decoded: Memo | None = None) -> list[str]:
    """Greedy continuations of encoded prompts, in prompt order, decoded without special tokens and
    stripped. `decoded` keeps texts by token sequence across calls: a search's candidates often give
    the same short answers, and decoding is pure."""
    n = sum(len(idx) for idx, _, _ in batches)
    out: list[str] = [""] * n
    eos = tok.eos_token_id
    memo = Memo() if decoded is None else decoded
    for idx, ids, mask in batches:
        gen = greedy_continue(model, ids, mask, max_new_tokens=max_new_tokens, eos=eos, pad=eos).tolist()
        for i, toks in zip(idx, gen, strict=True):
            row = tuple(toks[: toks.index(eos)] if eos in toks else toks)
            out[i] = memo.get(row, lambda row=row: tok.decode(list(row), skip_special_tokens=True).strip())
    return out


def greedy_generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], *,
                    max_new_tokens: int = 8, batch_size: int = 128) -> list[str]:
    """Greedy continuations of `prompts`, decoded without special tokens and stripped, in input order."""
    return generate_encoded(model, tok, encode_prompts(tok, prompts, batch_size=batch_size),
                            max_new_tokens=max_new_tokens)
