"""Harm and over-refusal: batched greedy generation on red-team and benign prompts, then a judge that
labels each response refused, complied or unusable; or, in `loglik` mode, no generation at all: the
log-probability of the language's refusal is compared with that of the compliant answer."""

from __future__ import annotations

from .assets import EvalAssets, PromptRow
from .generation import greedy_generate
from .judges import Label, build_judge
from .loglik import continuation_logprobs


def format_prompt(tok, template: str | None, prompt: str) -> str:
    if template:
        return template.format(prompt=prompt)
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


class SafetyScorer:
    def __init__(self, model, tokenizer, assets: EvalAssets):
        self.model, self.tok, self.assets = model, tokenizer, assets
        self.judge = build_judge(assets.judge) if assets.config.mode == "generate" else None

    def label(self, rows: list[PromptRow]) -> list[Label]:
        if not rows:
            return []
        a = self.assets
        texts = [format_prompt(self.tok, a.chat_template, r.prompt) for r in rows]
        if a.config.mode == "loglik":
            refusal = [a.refusal_continuation[r.language] for r in rows]
            comply = [a.compliance_continuation[r.language].format(answer=r.answer or "") for r in rows]
            lr = continuation_logprobs(self.model, self.tok, texts, refusal, a.config.batch_size)
            lc = continuation_logprobs(self.model, self.tok, texts, comply, a.config.batch_size)
            return [Label.REFUSED if x >= y else Label.COMPLIED for x, y in zip(lr, lc, strict=True)]
        responses = greedy_generate(self.model, self.tok, texts, max_new_tokens=a.config.max_new_tokens,
                                    batch_size=a.config.batch_size)
        if hasattr(self.judge, "label_many"):
            return self.judge.label_many([r.prompt for r in rows], responses)
        return [self.judge.label(resp, r.language, r.answer) for r, resp in zip(rows, responses, strict=True)]
