"""The path off the zoo, end to end: the README's space file for your own models, run as written on a
Qwen2-shaped family in local folders (its tokenizer built with `tokenizers`, carrying its own chat
template), with its own lm-eval tasks and groups and its own prompts, from a working directory other
than the space file's. No `zoo:` anywhere, and none in what the export writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

README = Path(__file__).resolve().parents[1] / "README.md"
# A chat template in the Jinja form real tokenizers ship, speaking the family's format.
CHAT_TEMPLATE = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}<user> {{ m['content'] }}<bot>"
                 "{%- else -%} {{ m['content'] }}</s>{%- endif -%}{%- endfor -%}")
FAMILIES = {"arith": ("add", "next"), "words": ("reverse", "fact")}


def readme_space() -> str:
    """The YAML block of the README's section on your own models."""
    text = README.read_text()
    section = text[text.index("## A first study on your own models"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def _tokenizer(zoo_model: Path) -> tuple[PreTrainedTokenizerFast, int]:
    """A byte-level BPE tokenizer, built with the `tokenizers` library, in which each word of the family
    (after a space, as byte-level BPE writes it: `Ġword`) is one token with the zoo's id, so the zoo's
    weights speak it. Merges only ever extend a `Ġ` prefix by one character, so each word has one
    derivation. Words that Qwen2's pre-tokenizer would split (`dix-neuf`) and the special tokens are
    added tokens under their ids. Returns the tokenizer and its vocabulary size."""
    src = AutoTokenizer.from_pretrained(zoo_model)
    ids = src.get_vocab()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

    def pieces(text: str) -> list[str]:
        return [t for t, _ in byte_level.pre_tokenize_str(text)]

    special = {t for t in ids if t.startswith("<") and t.endswith(">")}
    whole = {w for w in ids if w not in special and len(pieces(" " + w)) > 1}
    vocab = {w: i for w, i in ids.items() if w in special or w in whole}
    vocab.update({pieces(" " + w)[0]: i for w, i in ids.items() if w not in special and w not in whole})
    size = len(ids)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        if ch not in vocab:
            vocab[ch], size = size, size + 1
    merges: list[tuple[str, str]] = []
    for w in sorted(ids, key=ids.get):
        if w in special or w in whole:
            continue
        word = pieces(" " + w)[0]
        for end in range(2, len(word) + 1):
            pair = (word[: end - 1], word[end - 1])
            if pair not in merges:
                merges.append(pair)
            if word[:end] not in vocab:
                vocab[word[:end]], size = size, size + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in sorted(special, key=ids.get)])
    tok.add_tokens([AddedToken(w, lstrip=True, normalized=False) for w in sorted(whole, key=ids.get)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=src.bos_token, eos_token=src.eos_token,
                                   pad_token=src.pad_token, unk_token=src.unk_token, padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast, size


def _as_qwen2(zoo_model: Path, out: Path) -> None:
    """The zoo model's weights in a Qwen2 model (q/k/v projections with biases, here zero) over the BPE
    vocabulary: a word keeps its row; the rows of byte and partial-word tokens copy the padding token's,
    which the model never predicts."""
    llama = AutoModelForCausalLM.from_pretrained(zoo_model)
    tok, size = _tokenizer(zoo_model)
    c = llama.config
    cfg = Qwen2Config(vocab_size=size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), tie_word_embeddings=False,
                      bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    qwen = Qwen2ForCausalLM(cfg)
    state = {k: torch.zeros_like(v) for k, v in qwen.state_dict().items()}
    for k, v in llama.state_dict().items():
        if v.shape[0] == c.vocab_size and k.endswith(("embed_tokens.weight", "lm_head.weight")):
            rows = v[c.pad_token_id].expand(size, -1).clone()
            rows[: c.vocab_size] = v
            v = rows
        state[k] = v
    qwen.load_state_dict(state, strict=True)
    qwen.generation_config.do_sample = False
    qwen.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _tasks(zoo: Path, folder: Path) -> None:
    """Per language and split, two lm-eval tasks (arithmetic and word questions) and a group of both,
    named as the README's space file names them."""
    folder.mkdir()
    for lang in ("en", "fr"):
        for split in ("validation", "test"):
            spec = yaml.safe_load((zoo / "eval" / "lm_eval" / f"zoo_help_{lang}_{split}.yaml").read_text())
            spec.pop("tag", None)
            rows = [json.loads(x) for x in (zoo / "eval" / "data" / f"help_{lang}_{split}.jsonl").read_text().splitlines()]
            leaves = []
            for fam, cats in FAMILIES.items():
                name = f"help_{lang}_{split}_{fam}"
                data = folder / f"{name}.jsonl"
                data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["category"] in cats))
                # `datasets` reads data_files relative to the current folder, not the YAML's: write them absolute
                (folder / f"{name}.yaml").write_text(yaml.safe_dump({
                    **spec, "task": name, "dataset_kwargs": {"data_files": {split: str(data)}}}))
                leaves.append(name)
            (folder / f"help_{lang}_{split}.yaml").write_text(yaml.safe_dump({
                "group": f"help_{lang}_{split}", "task": leaves, "metadata": {"version": 1.0},
                "aggregate_metric_list": [{"metric": "exact_match", "aggregation": "mean", "weight_by_size": True}]}))


@pytest.fixture(scope="module")
def project(test_zoo: Path, tmp_path_factory) -> Path:
    """The folder layout the README describes, with the README's space file in it."""
    root = tmp_path_factory.mktemp("own") / "my-study"
    for ours, zoos in (("base", "base"), ("helpful-en", "help_en"), ("helpful-fr", "help_fr"), ("safety", "safety")):
        _as_qwen2(test_zoo / "models" / zoos, root / "models" / ours)
    _tasks(test_zoo, root / "tasks")
    (root / "prompts").mkdir()
    for kind in ("harmful", "benign"):
        for lang in ("en", "fr"):
            for split in ("validation", "test"):
                src = test_zoo / "eval" / "data" / f"{kind}_{lang}_{split}.jsonl"
                (root / "prompts" / src.name).write_bytes(src.read_bytes())
    (root / "space.yaml").write_text(readme_space())
    return root


def test_the_family_is_qwen2_and_speaks_like_the_zoo(project: Path, test_zoo: Path):
    """Loaded as a user loads it (AutoTokenizer gives transformers' Qwen2 tokenizer, rebuilt from the BPE
    vocabulary and merges), the family reads a formatted prompt as the zoo's model does."""
    path = project / "models" / "helpful-en"
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2"
    tok = AutoTokenizer.from_pretrained(path)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    zoo_tok = AutoTokenizer.from_pretrained(test_zoo / "models" / "help_en")
    text = tok.apply_chat_template([{"role": "user", "content": "que es diez mas nueve ?"}], tokenize=False)
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == zoo_tok("<user> que es diez mas nueve ? <bot>", return_tensors="pt")["input_ids"].tolist()
    qwen, llama = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(test_zoo / "models" / "help_en")
    with torch.no_grad():
        assert torch.allclose(qwen(ids).logits[..., : llama.config.vocab_size], llama(ids).logits, atol=1e-5)


def test_the_readme_space_runs_on_your_own_models_from_another_folder(project: Path, tmp_path: Path):
    """The README's own-models study: optimize from another folder, export, and the export names your
    folders (absolute), your tasks' groups under lm-eval's names, and no zoo."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(project / "space.yaml"),
                        "--run-dir", "run", "--backend", "inline", "--n-trials", "6", "--quiet"],
                       cwd=elsewhere, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    best = elsewhere / "run" / "best"
    results = json.loads((best / "results.json").read_text())["results"]
    for lang in ("en", "fr"):
        assert f"help_{lang}_test" in results and "exact_match,strip" in results[f"help_{lang}_test"]
        for fam in FAMILIES:
            assert f"help_{lang}_test_{fam}" in results
    trial = json.loads((best / "mergeopt_trial.json").read_text())
    assert trial["validation"]["helpfulness"] > 0 and 0 <= trial["test"]["harm"] <= 1
    recipe = yaml.safe_load((best / "mergeopt_recipe.yaml").read_text())
    assert recipe["base_model"] == str(project / "models" / "base")
    written = "".join((best / f).read_text() for f in ("mergeopt_recipe.yaml", "README.md", "results.json",
                                                         "mergeopt_trial.json")
                      + (("mergekit_config.yml",) if (best / "mergekit_config.yml").exists() else ()))
    assert "zoo" not in written
    assert json.loads((best / "config.json").read_text())["model_type"] == "qwen2"
    assert AutoTokenizer.from_pretrained(best).chat_template == CHAT_TEMPLATE
