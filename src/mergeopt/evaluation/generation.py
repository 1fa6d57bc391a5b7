"""Batched greedy generation with left padding and a KV cache: the hot loop of harm and
over-refusal scoring, and of the zoo's report card."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.inference_mode()
def greedy_continue(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, eos: int,
                    pad: int) -> torch.Tensor:
    """Greedy new tokens for a left-padded batch, [batch, <= max_new_tokens]; `pad` after a row's EOS.
    Stops as soon as every row has produced EOS."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    past = None
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    step_ids = ids
    for _ in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        new.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        pos = pos[:, -1:] + 1
    return torch.stack(new, dim=1)


def greedy_generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], *,
                    max_new_tokens: int = 8, batch_size: int = 128) -> list[str]:
    """Greedy continuations of `prompts`, decoded without special tokens and stripped.

    Prompts are sorted by length so a batch carries little padding; the result keeps input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].split()))
    out: list[str] = [""] * len(prompts)
    eos = tok.eos_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = greedy_continue(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, eos=eos,
                              pad=eos)
        for row, i in enumerate(idx):
            toks = gen[row].tolist()
            if eos in toks:
                toks = toks[: toks.index(eos)]
            out[i] = tok.decode(toks, skip_special_tokens=True).strip()
    return out
