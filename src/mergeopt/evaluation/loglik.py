"""Log-probabilities of continuations, batched: the fast harm mode and the LLM judge use it."""

from __future__ import annotations

import torch


@torch.inference_mode()
def continuation_logprobs(model, tok, contexts: list[str], continuations: list[str], batch_size: int = 128) -> list[float]:
    """Sum of log p(continuation tokens | context) for each pair."""
    out: list[float] = []
    dev = model.device
    for s in range(0, len(contexts), batch_size):
        ctx_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts[s: s + batch_size]]
        cont_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations[s: s + batch_size]]
        seqs = [a + b for a, b in zip(ctx_ids, cont_ids, strict=True)]
        width = max(len(x) for x in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(seqs):  # left padding, so every sequence ends at the last column
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float(), -1)
        for i, b in enumerate(cont_ids):
            n = len(b)
            positions = torch.arange(width - n - 1, width - 1, device=dev)
            out.append(float(logp[i, positions, torch.tensor(b, device=dev)].sum()))
    return out
