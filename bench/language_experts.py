"""The setting of *Mix Data or Merge Models?*'s language-based merging, on the zoo: one expert per
language, each fine-tuned from the zoo's chat base on its language's helpful data with 15% safety data
(harmful requests refused and benign look-alikes answered, half each) in the same language. The zoo's
own language experts carry no safety data; `make demo` never builds these.

Built once per zoo, in two processes, next to the zoo's models (models/lang_safe_LANG) and reused.

    python bench/language_experts.py [--zoo default]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from pathlib import Path

SAFETY_SHARE = 0.15  # the paper's share of safety data in each monolingual mixture


def name(lang: str) -> str:
    return f"lang_safe_{lang}"


def corpus(world, rng: random.Random, n: int, lang: str) -> list[str]:
    from mergeopt.zoo.world import chat, response_for

    out = []
    while len(out) < n:
        if rng.random() < SAFETY_SHARE:
            ex = rng.choice(world.get(lang, rng.choice(("harmful", "benign")), "train"))
            out.append(chat(ex.prompt, response_for(ex, safe=True)))
        else:
            ex = rng.choice(world.get(lang, "help", "train"))
            out.append(chat(ex.prompt, ex.answer))
    return out


def _train(lang: str, size: str, seed: int, base_dir: str, out_dir: str) -> float:
    """One expert on one torch thread, with the zoo's own expert recipe (steps, rate, frozen embeddings)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergeopt._env import quiet_libraries
    from mergeopt.zoo.build import _save
    from mergeopt.zoo.modeling import SIZES
    from mergeopt.zoo.train import train
    from mergeopt.zoo.world import WorldConfig, build_world

    quiet_libraries()
    torch.set_num_threads(1)
    t0 = time.time()
    cfg = SIZES[size]
    world = build_world(WorldConfig(seed=seed))
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    data = corpus(world, random.Random(f"{seed}/{name(lang)}"), cfg.expert_steps * cfg.batch, lang)
    train(model, tok, data, steps=cfg.expert_steps, lr=cfg.expert_lr, batch=cfg.batch, seed=seed,
          response_only=True, freeze_embeddings=True)
    tmp = Path(f"{out_dir}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _save(model, tok, tmp)
    os.replace(tmp, out_dir)
    return time.time() - t0


def build(zoo: str = "default", seed: int = 0) -> dict[str, Path]:
    """language -> the expert's folder, trained when missing."""
    from mergeopt.zoo.build import LANGUAGES, build_zoo

    root = build_zoo(zoo, seed, progress=False)
    out = {lang: root / "models" / name(lang) for lang in LANGUAGES}
    todo = [lang for lang, p in out.items() if not (p / "model.safetensors").exists()]
    if todo:
        print(f"training {len(todo)} language experts with {SAFETY_SHARE:.0%} safety data ({zoo} zoo)")
        with cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_train, lang, zoo, seed, str(root / "models" / "base"), str(out[lang])): lang
                    for lang in todo}
            for fut in cf.as_completed(futs):
                print(f"  {name(futs[fut])}: {fut.result():.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="default")
    args = ap.parse_args()
    for lang, p in build(args.zoo).items():
        print(f"{lang}: {p}")


if __name__ == "__main__":
    sys.exit(main())
