"""Wall time of one full candidate evaluation on the default zoo (all languages; helpful, harmful and
benign sets) on one core, and the share of it spent outside the model's forward passes. Also the fast
loglik harm mode: its time and how often it agrees with judged generations.

As in a search, one resident model and one evaluator score a sequence of different candidates (the
zoo's models and merges, loaded into the model's buffers in turn), so the evaluator's caches see new
responses on every call; the figures are means over the candidates after a warm-up on the base.

    python bench/eval_overhead.py [--repeats 5] [--json runs/bench/eval_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeopt._env import quiet_libraries
from mergeopt.evaluation.assets import resolve_assets
from mergeopt.evaluation.evaluator import Evaluator
from mergeopt.evaluation.judges import Label
from mergeopt.space import EvaluationConfig
from mergeopt.worker import time_forward


def _merges(root: Path) -> dict[str, dict]:
    """A few merges of the zoo's experts, as a search would propose them."""
    from mergeopt.merge import ResidentMerger, open_models
    from mergeopt.recipe import Recipe

    experts = ["help_en", "help_fr", "help_es", "safety"]
    recipes = [Recipe.model_validate({
        "merge_method": method, "base_model": str(root / "models" / "base"), "seed": i,
        "models": [{"model": str(root / "models" / e),
                    "parameters": {"weight": w, **({"density": 0.5} if method != "task_arithmetic" else {})}}
                   for e in experts]})
        for i, (method, w) in enumerate([("task_arithmetic", 0.7), ("ties", 1.0), ("dare_linear", 0.5)])]
    merger = ResidentMerger(*open_models(recipes[0]))  # the same models: task vectors loaded once
    out = {f"{r.merge_method} {r.models[0].parameters['weight']}": dict(merger.merged(r)) for r in recipes}
    return out


def _argmax_timings(zoo_vocab: int, rows: int = 128, calls: int = 300) -> dict[int, dict[str, float]]:
    """The greedy token of each row, torch's CPU argmax against the numpy path `greedy_tokens` takes;
    the zoo's vocabulary and a 32K one. The two must agree."""
    from mergeopt.evaluation.generation import greedy_tokens

    out = {}
    for vocab in (zoo_vocab, 32_000):
        logits = torch.randn(rows, 1, vocab, generator=torch.Generator().manual_seed(vocab))
        assert torch.equal(logits[:, -1].argmax(-1), greedy_tokens(logits))
        times = {}
        for name, fn in (("torch_us", lambda x=logits: x[:, -1].argmax(-1)), ("numpy_us", lambda x=logits: greedy_tokens(x))):
            fn()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name] = (time.perf_counter() - t) / calls * 1e6
        out[vocab] = times
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="passes over the candidates")
    ap.add_argument("--zoo", default="default", choices=["default", "test"])
    ap.add_argument("--json", default="runs/bench/eval_overhead.json")
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    from mergeopt.zoo import build_zoo

    root = build_zoo(args.zoo, seed=0)
    path = root / "models" / "base"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    clock = SimpleNamespace(forward_s=0.0)
    time_forward(model, clock)
    assets = resolve_assets(EvaluationConfig(zoo=args.zoo), "validation")
    n_items = sum(len(v) for v in assets.harmful.values()) + sum(len(v) for v in assets.benign.values())
    ev = Evaluator(model, tok, assets)
    n_items += sum(ev.helpfulness.sizes.values())
    ev.evaluate()  # warm-up on the base
    names = ["help_en", "help_fr", "help_es", "safety", "data_mix", "pretrained"]
    weights = {n: AutoModelForCausalLM.from_pretrained(root / "models" / n).state_dict() for n in names}
    merged = _merges(root)
    rows = []
    for name, state in [*weights.items(), *merged.items()] * args.repeats:
        model.load_state_dict(state)
        clock.forward_s = 0.0
        t = time.perf_counter()
        m = ev.evaluate()
        wall = time.perf_counter() - t
        rows.append({"candidate": name, "wall_s": wall, "forward_s": clock.forward_s, "help_s": m["time/helpfulness_s"],
                     "safety_s": m["time/safety_s"]})
    best = {k: sum(r[k] for r in rows) / len(rows) for k in ("wall_s", "forward_s", "help_s", "safety_s")}
    overhead = 1 - best["forward_s"] / best["wall_s"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, 1 torch thread, torch {torch.__version__}")
    print(f"one candidate ({n_items} prompts, 3 languages; mean of {len(rows)} candidates): {best['wall_s']:.3f} s (target <= 1 s); "
          f"helpfulness (lm-eval) {best['help_s']:.3f} s, harm + over-refusal {best['safety_s']:.3f} s")
    print(f"forward passes {best['forward_s']:.3f} s; outside the forward passes {overhead:.1%} (target <= 5%)")
    # loglik harm mode against judged generations
    fast = resolve_assets(EvaluationConfig(zoo=args.zoo, mode="loglik"), "validation")
    agree = total = 0
    t_gen = t_ll = 0.0
    for name in ("base", "safety", "help_fr", "data_mix"):
        mp = root / "models" / name
        mm = AutoModelForCausalLM.from_pretrained(mp).eval()
        rows_all = [r for per in assets.harmful.values() for r in per] + [r for per in assets.benign.values() for r in per]
        e_gen, e_ll = Evaluator(mm, tok, assets), Evaluator(mm, tok, fast)
        t = time.perf_counter()
        a = e_gen.safety.label(rows_all)
        t_gen += time.perf_counter() - t
        t = time.perf_counter()
        b = e_ll.safety.label(rows_all)
        t_ll += time.perf_counter() - t
        pairs = [(x, y) for x, y in zip(a, b, strict=True) if x != Label.UNUSABLE]
        agree += sum(x == y for x, y in pairs)
        total += len(pairs)
    print(f"loglik harm mode: agrees with judged generations on {agree / total:.1%} of {total} usable responses "
          f"(4 zoo models); {t_ll:.3f} s against {t_gen:.3f} s for generation + judge")
    argmax = _argmax_timings(len(tok))
    print("greedy token choice per decoding step, 128 rows: " + "; ".join(
        f"vocabulary {v}: torch argmax {a['torch_us']:.0f} us, numpy {a['numpy_us']:.0f} us ({a['torch_us'] / a['numpy_us']:.1f}x)"
        for v, a in argmax.items()))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": rows, "best": best, "overhead_share": overhead, "items": n_items,
                               "loglik_agreement": agree / total, "loglik_s": t_ll, "generate_s": t_gen,
                               "argmax": argmax}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
