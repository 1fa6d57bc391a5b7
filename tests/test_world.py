"""The synthetic world: splits, families, look-alikes, and what pretraining may and may not see."""

from __future__ import annotations

import random

from mergeopt.zoo.world import (
    BOT,
    HELP_FAMILIES,
    LANGUAGES,
    LEXICONS,
    USER,
    WorldConfig,
    build_world,
    expert_corpus,
    format_sft_corpus,
    pretraining_corpus,
)


def test_splits_are_disjoint_by_instance_and_prompt():
    w = build_world(WorldConfig(seed=0))
    for lang in LANGUAGES:
        for kind in ("help", "harmful", "benign"):
            parts = {s: w.get(lang, kind, s) for s in ("train", "validation", "test")}
            inst = {s: {e.instance for e in v} for s, v in parts.items()}
            prompts = {s: {e.prompt for e in v} for s, v in parts.items()}
            assert all(parts.values()), (lang, kind)
            assert not inst["train"] & inst["validation"] and not inst["train"] & inst["test"]
            assert not inst["validation"] & inst["test"]
            assert not prompts["train"] & prompts["test"] and not prompts["validation"] & prompts["test"]


def test_every_language_has_every_family_and_lookalikes():
    w = build_world(WorldConfig(seed=0))
    for lang in LANGUAGES:
        fams = {e.category for e in w.get(lang, "help", "validation")}
        assert fams == set(HELP_FAMILIES)
        harmful = w.get(lang, "harmful", "validation")
        benign = w.get(lang, "benign", "validation")
        lx = LEXICONS[lang]
        # Look-alikes share verbs and shapes: only the object differs.
        assert {e.category for e in harmful} <= set(lx.harmful) and {e.category for e in benign} <= set(lx.benign)
        for e in harmful + benign:
            assert any(v in e.prompt.split() for v in lx.verbs)
        # Each answer of a helpful prompt is exactly checkable.
        for e in w.get(lang, "help", "test"):
            assert e.answer and e.answer in w.vocabulary() or all(t in w.vocabulary() for t in e.answer.split())


def test_world_is_deterministic_and_seed_dependent():
    a, b, c = (build_world(WorldConfig(seed=s)) for s in (0, 0, 1))
    assert a.examples == b.examples
    assert a.examples != c.examples


def test_pretraining_never_sees_chat_markers_or_held_out_prompts():
    w = build_world(WorldConfig(seed=0))
    text = pretraining_corpus(w, random.Random(0), 20000)
    held_out = {e.prompt for (_, k, s), exs in w.examples.items() if s != "train" and k == "help" for e in exs}
    assert not any(USER in t or BOT in t for t in text)
    assert not any(t.rsplit(" ", 2)[0] in held_out or any(t.startswith(p + " ") for p in held_out) for t in text)


def test_training_corpora_use_train_split_only():
    w = build_world(WorldConfig(seed=0))
    held_out = {e.prompt for (_, _, s), exs in w.examples.items() if s != "train" for e in exs}
    rng = random.Random(0)
    chats = format_sft_corpus(w, rng, 500) + expert_corpus(w, rng, 500, languages=LANGUAGES, safety_share=0.5)
    for c in chats:
        prompt = c.split(USER, 1)[1].split(BOT, 1)[0].strip()
        assert prompt not in held_out
