"""Helpfulness through lm-eval: one HFLM around the resident model and the tasks loaded once, then
`lm_eval.evaluator.evaluate` per candidate (simple_evaluate would re-probe the environment every call)."""

from __future__ import annotations

import contextlib
import io
import logging
import math

import torch

from ..errors import UserError


def _cache_lm_eval_templates() -> None:
    """lm-eval compiles a task's Jinja templates afresh for every document on every `evaluate` call;
    a search scores the same documents hundreds of times, so compiled templates are kept by their
    source text. Rendering, and so every prompt and target, is unchanged."""
    import functools

    import lm_eval.utils as u

    if getattr(u.apply_template, "_mergeopt_cached", False):
        return
    compiled = functools.lru_cache(maxsize=4096)(u.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template._mergeopt_cached = True  # type: ignore[attr-defined]
    u.apply_template = apply_template


def _greedy_hflm():
    """HFLM whose greedy generation runs the project's KV-cache loop instead of `model.generate`, whose
    per-step machinery (logits processors, stop-string criteria decoding every step) costs more than
    the forward pass on small models. Same tokens; sampling requests still go through HF."""
    from lm_eval.models.huggingface import HFLM

    from .generation import greedy_continue

    class GreedyHFLM(HFLM):
        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
            sampling = generation_kwargs.get("do_sample") or generation_kwargs.get("temperature", 0.0) not in (0, 0.0, None)
            if sampling or self.backend != "causal":
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            mask = generation_kwargs.get("attention_mask")
            if mask is None:
                mask = (context != self.tokenizer.pad_token_id).long()
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            new = greedy_continue(self.model, context, mask, max_new_tokens=max(1, max_length - context.shape[1]),
                                  eos=self.tokenizer.eos_token_id, pad=pad)
            return torch.cat([context, new], dim=1)

    return GreedyHFLM


class LmEvalHelpfulness:
    """Scores each language's task by its primary metric, turned so that higher is better: a metric whose
    `higher_is_better` is false counts as 1 - value when it lies in [0, 1], else as -value."""

    def __init__(self, model, tokenizer, tasks: dict[str, str], include_path: str | None, *, batch_size: int = 128,
                 device: str = "cpu"):
        from lm_eval.tasks import TaskManager

        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
        _cache_lm_eval_templates()
        self.lm = _greedy_hflm()(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size,
                                 add_bos_token=False)
        tm = TaskManager(include_path=include_path, include_defaults=include_path is None)
        known = set(tm.all_tasks)
        for lang, task in tasks.items():
            if task not in known:
                import difflib

                close = difflib.get_close_matches(task, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UserError(f"evaluation tasks.{lang}: lm-eval does not know task {task!r}{hint}")
        self.task_of = dict(tasks)
        with contextlib.redirect_stderr(io.StringIO()):  # datasets' and lm-eval's own progress bars
            self.tasks = tm.load(list(tasks.values()))["tasks"]
        self.metric: dict[str, tuple[str, bool]] = {}
        for name, task in self.tasks.items():
            metric = next(iter(task.aggregation()))
            self.metric[name] = (metric, bool(task.higher_is_better().get(metric, True)))
        self.sizes = {name: len(task.eval_docs) for name, task in self.tasks.items()}

    def score(self, indices: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
        """Per-document scores (higher is better) per language, for the given document indices."""
        from lm_eval import evaluator

        samples = None if indices is None else {self.task_of[lg]: idx for lg, idx in indices.items()}
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars ignore TQDM_DISABLE
            res = evaluator.evaluate(lm=self.lm, task_dict=self.tasks, samples=samples, bootstrap_iters=0,
                                     log_samples=True, verbosity="ERROR")
        out: dict[str, list[float]] = {}
        for lang, task in self.task_of.items():
            metric, hib = self.metric[task]
            vals = []
            for s in res["samples"][task]:
                v = float(s[metric])
                if math.isnan(v):
                    vals.append(v)
                else:
                    vals.append(v if hib else (1.0 - v if 0.0 <= v <= 1.0 else -v))
            out[lang] = vals
        return out
