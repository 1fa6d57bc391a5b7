"""Harm and over-refusal: batched greedy generation on red-team and benign prompts, then a judge that
labels each response refused, complied or unusable; or, in `loglik` mode, no generation at all: the
log-probability of the language's refusal is compared with that of the compliant answer."""

from __future__ import annotations

from .. import faults
from .assets import EvalAssets, PromptRow
from .generation import Batch, encode_prompts, generate_encoded
from .judges import Label, build_judge
from .loglik import continuation_logprobs
from .memo import Memo
from .prompt_format import format_prompt


class SafetyScorer:
    def __init__(self, model, tokenizer, assets: EvalAssets, *, chat: bool, engine=None, device: str = "cpu"):
        self.model, self.tok, self.assets, self.chat, self.engine = model, tokenizer, assets, chat, engine
        where = str(model.device) if model is not None else device
        self.judge = build_judge(assets.judge, device=where) if assets.config.mode == "generate" else None
        self._encoded: dict[tuple[int, ...], tuple[list[PromptRow], list[Batch]]] = {}
        self._decoded = Memo()  # token ids -> text, across candidates
        self._labels = Memo()  # (prompt, language, answer, response) -> the judge's label

    def _texts(self, rows: list[PromptRow]) -> list[str]:
        return [format_prompt(self.tok, self.chat, r.prompt) for r in rows]

    def _batches(self, rows: list[PromptRow]) -> list[Batch]:
        """The formatted, encoded prompts of a row selection, kept on the model's device: every candidate
        is scored on the same rows, and a chat template costs a Jinja rendering per prompt."""
        key = tuple(map(id, rows))
        hit = self._encoded.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], rows, strict=True)):
            dev = self.model.device if self.model is not None else "cpu"
            # a chat template writes its own special tokens; a raw prompt gets the tokenizer's (as lm-eval does)
            batches = encode_prompts(self.tok, self._texts(rows), batch_size=self.assets.config.batch_size,
                                     add_special_tokens=not self.chat)
            hit = (list(rows), [(idx, ids.to(dev), mask.to(dev)) for idx, ids, mask in batches])
            self._encoded[key] = hit
        return hit[1]

    def prepare(self, rows: list[PromptRow]) -> None:
        """Format and encode a selection's prompts ahead of the first candidate (see `Evaluator.prepare`)."""
        if rows and self.assets.config.mode == "generate":
            self._batches(rows)

    def label(self, rows: list[PromptRow], kinds: list[str] | None = None) -> list[Label]:
        """Each row's label; `kinds` (harmful or benign, per row) matters to judges that map a verdict by it."""
        if not rows:
            return []
        a = self.assets
        if a.config.mode == "loglik":
            texts = self._texts(rows)
            refusal = [a.refusal_continuation[r.language] for r in rows]
            comply = [a.compliance_continuation[r.language].format(answer=r.answer or "") for r in rows]
            lr = continuation_logprobs(self.model, self.tok, texts, refusal, a.config.batch_size)
            lc = continuation_logprobs(self.model, self.tok, texts, comply, a.config.batch_size)
            return [Label.REFUSED if x >= y else Label.COMPLIED for x, y in zip(lr, lc, strict=True)]
        faults.point("generation")
        if self.engine is not None:  # the same token ids, EOS rule and decoding as the HF loop
            responses = self.engine.generate_encoded(self.tok, self._batches(rows), max_new_tokens=a.config.max_new_tokens,
                                                     decoded=self._decoded)
        else:
            responses = generate_encoded(self.model, self.tok, self._batches(rows),
                                         max_new_tokens=a.config.max_new_tokens, decoded=self._decoded)
        faults.point("judge")
        if hasattr(self.judge, "label_many"):
            return self.judge.label_many([r.prompt for r in rows], responses, kinds=kinds or ["harmful"] * len(rows),
                                         languages=[r.language for r in rows])
        # A judge is a pure function of the prompt and the response, and candidates repeat responses.
        return [self._labels.get((r.prompt, r.language, r.answer, resp),
                                 lambda r=r, resp=resp: self.judge.label(resp, r.language, r.answer))
                for r, resp in zip(rows, responses, strict=True)]
