"""Training loops of the zoo: causal-LM pretraining on plain text and supervised fine-tuning on chat
text with the loss on the response only. Deterministic for a given seed on one torch thread."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from .world import BOT


def encode_batch(tok: PreTrainedTokenizerFast, texts: list[str], response_only: bool) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels; chat texts are supervised after the `<bot>` marker only."""
    ids = [tok.convert_tokens_to_ids(t.split()) for t in texts]
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    bot = tok.convert_tokens_to_ids(BOT)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
        start = x.index(bot) + 1 if response_only and bot in x else 1
        labels[r, start: len(x)] = torch.tensor(x[start:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, corpus: list[str], *, steps: int, lr: float,
          batch: int, seed: int, response_only: bool, freeze_embeddings: bool = False, warmup: int = 20,
          on_step: Callable[[int], None] | None = None) -> float:
    """AdamW with linear warm-up and cosine decay; returns the mean loss of the last 10% of steps."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    if freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    order: list[int] = []
    tail: list[float] = []
    for step in range(steps):
        if len(order) < batch:
            fresh = list(range(len(corpus)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[:batch], order[batch:]
        enc = encode_batch(tok, [corpus[i] for i in idx], response_only)
        loss = model(**enc).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if on_step:
            on_step(step)
    model.get_input_embeddings().weight.requires_grad_(True)
    model.eval()
    return sum(tail) / len(tail)
