"""Helpfulness through lm-eval: one HFLM around the resident model and the tasks loaded once, then
`lm_eval.evaluator.evaluate` per candidate (simple_evaluate would re-probe the environment every call)."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from .memo import DocMemo, Memo


def _cache_lm_eval_templates() -> None:
    """lm-eval compiles a task's Jinja templates afresh for every document on every `evaluate` call,
    and renders each target twice per call; a search scores the same documents hundreds of times, so
    compiled templates are kept by their source text and renderings by (template, document). The
    documents are the resident ones (`_make_resident`), so a rendering is keyed by the document object
    itself and is never stale. Every prompt and target is unchanged."""
    import functools

    import lm_eval.utils as u

    if getattr(u.apply_template, "_mergeopt_cached", False):
        return
    compiled = functools.lru_cache(maxsize=4096)(u.env.from_string)
    rendered = DocMemo()

    def apply_template(template: str, doc: dict) -> str:
        return rendered.get(doc, template, lambda: compiled(template).render(**doc))

    apply_template._mergeopt_cached = True  # type: ignore[attr-defined]
    u.apply_template = apply_template


class _DocJson:
    """Stands in for `json` inside `lm_eval.evaluator`, which serializes every document (indent=2, so
    with the pure-Python encoder) on every call, only to hash it into the sample log. The documents are
    resident and never change, so each one's text is kept, keyed by the document object itself."""

    def __init__(self) -> None:
        import json

        self._json, self._texts = json, DocMemo()

    def __getattr__(self, name: str):
        return getattr(self._json, name)

    def dumps(self, obj, **kw) -> str:
        if not isinstance(obj, dict):
            return self._json.dumps(obj, **kw)
        return self._texts.get(obj, (kw.get("indent"), kw.get("ensure_ascii", True)), lambda: self._json.dumps(obj, **kw))


def _cache_sample_log() -> None:
    """lm-eval's sample log: each document's JSON (`_DocJson`) and the hashes of every document, prompt
    and target, which lm-eval computes again on every call from the same strings."""
    import functools

    import lm_eval.evaluator as ev

    if not isinstance(ev.json, _DocJson):
        ev.json = _DocJson()
    if not hasattr(ev.hash_string, "cache_info"):
        ev.hash_string = functools.lru_cache(maxsize=100_000)(ev.hash_string)


def _greedy_hflm():
    """HFLM whose greedy generation runs the project's KV-cache loop instead of `model.generate`, whose
    per-step machinery (logits processors, stop-string criteria decoding every step) costs more than
    the forward pass on small models. Same tokens; sampling requests still go through HF."""
    from lm_eval.models.huggingface import HFLM

    from .generation import greedy_continue

    class GreedyHFLM(HFLM):
        """Also keeps the token ids of every context it has encoded, and the text of short generations it
        has decoded: a search sends the same contexts on every call and its candidates often give the
        same answers; tokenizing and decoding again cost as much as a tenth of the forward passes."""

        dry = False  # set by `LmEvalHelpfulness.prepare`: lm-eval's work runs, the model is never called

        def _memo(self, key: tuple, compute):
            memo = self.__dict__.setdefault("_mergeopt_memo", Memo(100_000))  # per instance: each has its tokenizer
            return memo.get(key, compute)

        def tok_encode(self, string: str, left_truncate_len=None, add_special_tokens=None) -> list[int]:
            return list(self._memo(("encode", string, left_truncate_len, add_special_tokens),
                                   lambda: super(GreedyHFLM, self).tok_encode(string, left_truncate_len, add_special_tokens)))

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            key = tokens if isinstance(tokens, int) else tuple(tokens)
            return self._memo(("decode", key, skip_special_tokens),
                              lambda: super(GreedyHFLM, self).tok_decode(tokens, skip_special_tokens))

        def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len=None,
                             truncation: bool = False):
            # read only: lm-eval moves the tensors to the device and slices them
            return self._memo(("batch", tuple(strings), padding_side, left_truncate_len, truncation),
                              lambda: super(GreedyHFLM, self).tok_batch_encode(strings, padding_side, left_truncate_len,
                                                                               truncation))

        def _model_call(self, inps, attn_mask=None, labels=None):
            if self.dry:  # uniform logits, the shape the model would give
                vocab = max(int(self.model.config.vocab_size), len(self.tokenizer))
                return torch.zeros(*inps.shape, vocab, device=inps.device)
            return super()._model_call(inps, attn_mask, labels)

        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
            if self.dry:  # one end-of-sequence token per row
                return torch.cat([context, torch.full_like(context[:, :1], self.tokenizer.eos_token_id)], dim=1)
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


def _make_resident(task) -> None:
    """Keep a task's documents and built requests for the life of the worker.

    lm-eval re-reads the documents through `datasets` and rebuilds every request (prompt rendering,
    few-shot sampling) on each `evaluate` call. A search scores the same documents hundreds of times,
    so the documents are held as a list, the requests built once per document selection (each call
    starts from empty responses), and each (document, response) scored once. A side effect that a
    search needs: a few-shot task gives every candidate the same prompts, where lm-eval's sampler would
    draw new shots on each call."""
    docs = list(task.eval_docs)
    setattr(task, "test_docs" if task.has_test_docs() else "validation_docs", lambda: docs)
    build = task.build_all_requests
    built: dict[tuple, list] = {}

    def build_all_requests(*, samples: list[int] | None = None, chat_template=None, **kw) -> None:
        # lm-eval passes a fresh bound method as `chat_template`: only whether there is one matters
        key = (tuple(samples) if samples is not None else None, chat_template is not None, tuple(sorted(kw.items())))
        if key not in built:
            build(samples=samples, chat_template=chat_template, **kw)
            built[key] = list(task._instances)
        for inst in built[key]:
            inst.resps.clear()
            inst.filtered_resps.clear()
        task._instances = list(built[key])

    task.build_all_requests = build_all_requests

    # Scoring a response is a pure function of the document and the response, and candidates of one
    # search often give the same answers: keep the scores (keyed by the resident document itself).
    score = task.process_results
    scored = DocMemo()

    def process_results(doc: dict, results: list) -> dict:
        return dict(scored.get(doc, repr(results), lambda: score(doc, results)))

    task.process_results = process_results

    # The configuration does not change once the task is loaded; lm-eval deep-copies it through
    # dataclasses.asdict on every call, only to report it.
    config = task.dump_config()
    task.dump_config = lambda: config


@dataclass
class Entry:
    """One name under a language's `tasks`: a task, a group or a tag, and the leaf tasks it runs."""

    name: str
    leaves: list[str]
    group: Any = None  # lm-eval's Group, when the name is one with an aggregate_metric_list


def oriented(value: float, higher_is_better: bool) -> float:
    """A score turned so that higher is better: 1 - value for a share, else -value."""
    if higher_is_better:
        return value
    return 1.0 - value if 0.0 <= value <= 1.0 else -value


class LmEvalHelpfulness:
    """Helpfulness per language from lm-eval tasks, groups and tags.

    Each leaf task is scored by its primary metric and filter, the first that lm-eval reports for it
    (`exact_match,strip`, `acc,none`, ...). A group with an `aggregate_metric_list` is aggregated by
    lm-eval's own `Group.aggregate` (size-weighted unless the group says otherwise); a group without one,
    or a tag, by the plain mean of its tasks. A language's helpfulness is the mean of its entries, each
    turned so that higher is better (see `oriented`). The raw values are kept too, under lm-eval's names,
    for results.json."""

    def __init__(self, model, tokenizer, tasks: dict[str, list[str]], include_path: str | None, *, batch_size: int = 128,
                 device: str = "cpu", chat: bool = False, lm=None):
        from lm_eval.tasks import TaskManager

        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
        _cache_lm_eval_templates()
        _cache_sample_log()
        # add_bos_token as lm-eval's CLI leaves it (the tokenizer's own), so `lm_eval` on an export agrees
        self.lm = lm if lm is not None else _greedy_hflm()(pretrained=model, tokenizer=tokenizer, device=device,
                                                            batch_size=batch_size)
        self.chat = chat  # lm-eval's apply_chat_template: the tokenizer carries the study's format
        tm = TaskManager(include_path=include_path, include_defaults=include_path is None)
        check_task_names(tm, tasks)
        self.entries: dict[str, list[Entry]] = {}
        self.tasks: dict[str, Any] = {}  # leaf name -> lm-eval Task, each loaded once
        with contextlib.redirect_stderr(io.StringIO()):  # datasets' and lm-eval's own progress bars
            for lang, names in tasks.items():
                for name in names:
                    loaded = tm.load([name])
                    for leaf, task in loaded["tasks"].items():
                        self.tasks.setdefault(leaf, task)
                    group = loaded["groups"].get(name)
                    group = group if group is not None and group.has_aggregation else None
                    self.entries.setdefault(lang, []).append(Entry(name, sorted(loaded["tasks"]), group))
        for task in self.tasks.values():
            _make_resident(task)
        self.metric: dict[str, tuple[str, str, bool]] = {}  # leaf -> (metric, filter, higher is better)
        for name, task in self.tasks.items():
            metric = next(iter(task.aggregation()))
            filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
            self.metric[name] = (metric, filters[0], bool(task.higher_is_better().get(metric, True)))
        self.sizes = {name: len(task.eval_docs) for name, task in self.tasks.items()}

    def key(self, leaf: str) -> str:
        """A leaf task's primary metric as lm-eval names it in results: `metric,filter`."""
        metric, filt, _ = self.metric[leaf]
        return f"{metric},{filt}"

    def prepare(self, indices: dict[str, list[int]] | None = None) -> None:
        """A dry run of `score` on the same selection, with the model never called: lm-eval builds the
        requests (kept by `_make_resident`), the contexts are encoded and the documents' sample-log
        entries made. The first candidate then pays none of these one-off costs, so its timings are like
        every other's, and a task that lm-eval cannot run fails at start-up, before any trial."""
        self.lm.dry = True
        try:
            self.score(indices)
        finally:
            self.lm.dry = False

    def score(self, indices: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
        """Raw per-document values of each leaf task's primary metric, for the given document indices."""
        from lm_eval import evaluator

        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars ignore TQDM_DISABLE
            res = evaluator.evaluate(lm=self.lm, task_dict=self.tasks, samples=indices, bootstrap_iters=0,
                                     log_samples=True, verbosity="ERROR", apply_chat_template=self.chat)
        out: dict[str, list[float]] = {}
        for leaf, (metric, filt, _) in self.metric.items():
            out[leaf] = [float(s[metric]) for s in res["samples"].get(leaf, []) if s.get("filter", filt) == filt]
        return out

    def summarize(self, per_doc: dict[str, list[float]]) -> dict[str, float]:
        """`helpfulness/<language>` and `helpfulness`, plus each task's and group's raw value under
        lm-eval's own name: `lm_eval/<task>/<metric>,<filter>`."""
        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else float("nan")

        m: dict[str, float] = {}
        raw = {leaf: {self.key(leaf): mean(v), "sample_len": len(v)} for leaf, v in per_doc.items() if v}
        for leaf, r in raw.items():
            m[f"lm_eval/{leaf}/{self.key(leaf)}"] = r[self.key(leaf)]
        per_lang: dict[str, float] = {}
        for lang, entries in self.entries.items():
            scores = []
            for e in entries:
                present = [leaf for leaf in e.leaves if leaf in raw]
                if not present:
                    continue
                if e.group is not None:
                    agg = e.group.aggregate(raw)
                    key = next((k for k in agg if "," in k and "_stderr" not in k), None)
                    if key is not None:
                        m[f"lm_eval/{e.name}/{key}"] = float(agg[key])
                        hib = self.metric[present[0]][2]
                        scores.append(oriented(float(agg[key]), hib))
                        continue
                scores.append(mean([oriented(raw[leaf][self.key(leaf)], self.metric[leaf][2]) for leaf in present]))
            if scores:
                per_lang[lang] = mean(scores)
        out = {f"helpfulness/{lg}": v for lg, v in per_lang.items()}  # first: a NaN is reported by language
        if per_lang:
            out["helpfulness"] = mean(list(per_lang.values()))
        return out | m


def check_task_names(tm, tasks: dict[str, list[str]]) -> None:
    """Every name is a task, group or tag lm-eval knows, or one line naming the first that is not."""
    import difflib

    known = set(tm.all_tasks)
    for lang, names in tasks.items():
        for task in names:
            if task not in known:
                close = difflib.get_close_matches(task, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UserError(f"evaluation tasks.{lang}: lm-eval does not know task {task!r}{hint}")
