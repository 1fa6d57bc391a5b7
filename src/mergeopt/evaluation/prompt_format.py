"""The prompt format: one rule for every evaluation, lm-eval tasks and red-team and benign prompts alike.

1. `evaluation.chat_template` when given: a format with one `{prompt}`, such as `<|user|>\\n{prompt}\\n<|assistant|>\\n`.
   It is turned into a Jinja chat template and put on the tokenizer, so lm-eval's chat path, the red-team
   prompts and the exported tokenizer all use it. `{prompt}` alone means no template (a base model).
2. Otherwise the tokenizer's own chat template.
3. A tokenizer without one needs rule 1: preflight stops with one line.

Special tokens: a chat template writes its own; a raw prompt gets the tokenizer's (a BOS where it adds
one), which is what lm-eval does with its default `add_bos_token`.

lm-eval's tasks then run with `apply_chat_template` (as `lm_eval --apply_chat_template` does), so
helpfulness and harm are measured under the same format, and lm-eval's CLI on an exported folder
reproduces the numbers."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

RAW = "{prompt}"


def jinja_from_format(fmt: str) -> str:
    """A Jinja chat template that renders a user turn as `fmt` and an assistant turn as its text; a
    system turn comes first, followed by a blank line. Literal text is quoted, so braces and Jinja
    syntax in the format are kept as they are."""
    if fmt.count("{prompt}") != 1:
        raise UserError(f"evaluation.chat_template: {fmt!r} must hold {{prompt}} exactly once")
    before, after = fmt.split("{prompt}")

    def lit(text: str) -> str:
        return "{{ " + json.dumps(text) + " }}" if text else ""

    return ("{%- for m in messages -%}"
            "{%- if m['role'] == 'user' -%}" + lit(before) + "{{ m['content'] }}" + lit(after) +
            "{%- elif m['role'] == 'system' -%}{{ m['content'] }}" + lit("\n\n") +
            "{%- else -%}{{ m['content'] }}{%- endif -%}"
            "{%- endfor -%}")


def apply_prompt_format(tok, chat_template: str | None, *, where: str = "the base model") -> bool:
    """Put the study's prompt format on `tok`; True when prompts go through a chat template (lm-eval's
    `apply_chat_template`), False for raw prompts."""
    if chat_template is not None:
        if chat_template == RAW:
            return False
        tok.chat_template = jinja_from_format(chat_template)
        return True
    if not getattr(tok, "chat_template", None):
        raise UserError(f"evaluation.chat_template: the tokenizer of {where} has no chat template to format the "
                        "evaluation prompts; set evaluation.chat_template, '{prompt}' for a base model (no template) "
                        "or a format such as '<|user|>\\n{prompt}\\n<|assistant|>\\n'")
    return True


def format_prompt(tok, chat: bool, prompt: str) -> str:
    """One red-team or benign prompt as the model sees it."""
    if not chat:
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def write_chat_template(folder: Path, chat_template: str | None) -> None:
    """Make an exported tokenizer carry the format the study evaluated with, so `lm_eval
    --apply_chat_template` on the folder sees the same prompts. Nothing to do without an explicit
    format (the tokenizer's own template was copied) or for raw prompts."""
    if chat_template is None or chat_template == RAW:
        return
    (folder / "chat_template.json").unlink(missing_ok=True)  # an older form of the template, which would compete
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if cfg.pop("chat_template", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (folder / "chat_template.jinja").write_text(jinja_from_format(chat_template))
