"""Build (or find in the cache) the embedded zoo: world, tokenizer, models, evaluation assets and
`zoo.json` with every model's report card.

The folder is named by a hash of the world, the size's configuration, the seed and the code, so a
second call is a cache hit that returns at once; a build writes into a temporary folder and renames
it at the end, so a killed build leaves nothing that looks finished."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from .modeling import SIZES, ZooSize, make_config, make_tokenizer
from .world import (
    LANGUAGES,
    World,
    WorldConfig,
    build_world,
    expert_corpus,
    format_sft_corpus,
    pretraining_corpus,
)

ZOO_FORMAT = 1  # bump when the report card's semantics change (the judge, the metrics)
SAFETY_SHARE_MIX = 0.15  # the data-mix baseline's safety share, as in Mix Data or Merge Models?


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    language: str | None
    objective: str
    languages: tuple[str, ...]
    safety_share: float
    steps_factor: int = 1


def expert_specs() -> list[ExpertSpec]:
    specs = [ExpertSpec(f"help_{lang}", lang, "helpful", (lang,), 0.0) for lang in LANGUAGES]
    specs.append(ExpertSpec("safety", None, "safety", LANGUAGES, 1.0))
    return specs


DATA_MIX = ExpertSpec("data_mix", None, "mixed", LANGUAGES, SAFETY_SHARE_MIX, steps_factor=len(LANGUAGES) + 1)


def default_root() -> Path:
    """$MERGEOPT_ZOO_DIR, or ~/.cache/mergeopt/zoo when it is unset or empty (an empty value must not
    put a zoo into the current folder)."""
    return Path(os.environ.get("MERGEOPT_ZOO_DIR") or Path.home() / ".cache" / "mergeopt" / "zoo")


def _code_digest() -> str:
    here = Path(__file__).parent
    files = sorted(here.glob("*.py")) + [here.parent / "evaluation" / "generation.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def zoo_key(size: str, seed: int) -> str:
    spec = {"format": ZOO_FORMAT, "size": SIZES[size].as_dict(), "seed": seed, "world": WorldConfig(seed=seed).digest(),
            "code": _code_digest(), "torch": torch.__version__, "transformers": transformers.__version__,
            "mergeopt": __version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def zoo_dir(size: str = "default", seed: int = 0, root: Path | None = None) -> Path:
    return (root or default_root()) / f"{size}-s{seed}-{zoo_key(size, seed)}"


def _save(model, tok, path: Path) -> None:
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def _train_expert(spec: ExpertSpec, size: ZooSize, seed: int, base_dir: str, out_dir: str) -> dict:
    """One expert, in its own process on one torch thread, from the shared chat checkpoint."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from .._env import quiet_libraries
    from .train import train

    quiet_libraries()
    torch.set_num_threads(1)
    t0 = time.time()
    world = build_world(WorldConfig(seed=seed))
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    steps = size.expert_steps * spec.steps_factor
    rng = random.Random(f"{seed}/{spec.name}")
    corpus = expert_corpus(world, rng, steps * size.batch, languages=spec.languages, safety_share=spec.safety_share)
    loss = train(model, tok, corpus, steps=steps, lr=size.expert_lr, batch=size.batch, seed=seed,
                 response_only=True, freeze_embeddings=True)
    _save(model, tok, Path(out_dir))
    return {"name": spec.name, "loss": round(loss, 4), "seconds": round(time.time() - t0, 1)}


def _write_eval_assets(world: World, tmp: Path, final: Path) -> dict:
    """lm-eval task folders (YAML + jsonl) for the helpful sets, and jsonl prompt files for the red-team
    and benign sets. Task YAMLs name the data by its final absolute path."""
    data = tmp / "eval" / "data"
    tasks = tmp / "eval" / "lm_eval"
    data.mkdir(parents=True)
    tasks.mkdir(parents=True)
    for stem, rows in world.eval_sets().items():
        with open(data / f"{stem}.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    for lang in LANGUAGES:
        for split in ("validation", "test"):
            name = f"zoo_help_{lang}_{split}"
            path = final / "eval" / "data" / f"help_{lang}_{split}.jsonl"
            yaml_text = f"""task: {name}
tag: [zoo_help_{split}]
dataset_path: json
dataset_kwargs:
  data_files:
    {split}: {path}
{"validation_split" if split == "validation" else "test_split"}: {split}
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
generation_kwargs:
  until: ["</s>", "<user>"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: ["\\\\s+$"]
metadata:
  version: 1.0
  language: {lang}
"""
            (tasks / f"{name}.yaml").write_text(yaml_text)
    return {
        "include_path": "eval/lm_eval",
        "tasks": {split: {lang: f"zoo_help_{lang}_{split}" for lang in LANGUAGES} for split in ("validation", "test")},
        "prompts": {split: {kind: {lang: f"eval/data/{kind}_{lang}_{split}.jsonl" for lang in LANGUAGES}
                            for kind in ("harmful", "benign")} for split in ("validation", "test")},
        "chat_template": "<user> {prompt} <bot>",
    }


def _merge_checks(models_dir: Path, world: World, seed: int) -> dict:
    """Simple merges the issue asks the testbed to show: task arithmetic of all experts with equal
    weights, and DARE on each single expert (own-language helpfulness kept at p = 0.5 and 0.9)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from .report import report_card

    tok = AutoTokenizer.from_pretrained(models_dir / "base")
    base_model = LlamaForCausalLM.from_pretrained(models_dir / "base", dtype=torch.float32)
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    experts = [s.name for s in expert_specs()]
    taus = {}
    for name in experts:
        sd = LlamaForCausalLM.from_pretrained(models_dir / name, dtype=torch.float32).state_dict()
        taus[name] = {k: sd[k] - base[k] for k in base}

    def load(weights: dict[str, float], drop: float = 0.0) -> None:
        merged = {}
        for k, b in base.items():
            acc = b.clone()
            for i, (name, w) in enumerate(weights.items()):
                t = taus[name][k]
                if drop > 0:
                    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{i}/{k}".encode()))
                    t = t * (torch.rand(t.shape, generator=g) >= drop) / (1 - drop)
                acc += w * t
            merged[k] = acc
        base_model.load_state_dict(merged)

    out: dict = {"merges": {}, "dare": {}}
    for label, w in (("task_arithmetic_equal_1.0", 1.0), ("linear_equal", 1.0 / len(experts))):
        load(dict.fromkeys(experts, w))
        out["merges"][label] = {"recipe": {"method": "task_arithmetic", "weights": dict.fromkeys(experts, round(w, 4))},
                                "validation": report_card(base_model, tok, world, "validation"),
                                "test": report_card(base_model, tok, world, "test")}
    for lang in LANGUAGES:
        name = f"help_{lang}"
        load({name: 1.0})
        full = report_card(base_model, tok, world, "validation")[f"helpfulness/{lang}"]
        row = {"p0.0": full}
        for p in (0.5, 0.9):
            load({name: 1.0}, drop=p)
            row[f"p{p}"] = report_card(base_model, tok, world, "validation")[f"helpfulness/{lang}"]
            row[f"retention_p{p}"] = round(row[f"p{p}"] / full, 4) if full else 0.0
        out["dare"][name] = row
    return out


def _clear_dead_builds(final: Path) -> None:
    """Remove the temporary folders of builds of this zoo whose process is gone (killed mid-build);
    a build still running in another process keeps its folder."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            os.kill(int(stale.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours to judge: a name we did not write, or another user's live process


def build_zoo(size: str = "default", seed: int = 0, root: Path | None = None, *, progress: bool = True,
              force: bool = False) -> Path:
    """Return the zoo folder for (size, seed), building it when it is not cached. Processes that ask at
    once (parallel test workers, two studies) build it once: the others wait on a file lock and find it."""
    import fcntl

    if size not in SIZES:
        raise ValueError(f"unknown zoo size {size!r}; expected one of {sorted(SIZES)}")
    final = zoo_dir(size, seed, root)
    _clear_dead_builds(final)
    if (final / "zoo.json").exists() and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".lock-{final.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "zoo.json").exists() and not force:
            return final
        return _build(size, seed, final, progress=progress)


def _build(size: str, seed: int, final: Path, *, progress: bool) -> Path:
    from transformers import LlamaForCausalLM

    from .._env import quiet_libraries
    from .report import report_card, tau_ratio

    quiet_libraries()
    from .train import train

    cfg = SIZES[size]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    models_dir = tmp / "models"
    models_dir.mkdir(parents=True)
    t_start = time.time()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    specs = expert_specs() + [DATA_MIX]
    total = cfg.pretrain_steps + cfg.sft_steps + sum(cfg.expert_steps * s.steps_factor for s in specs) + len(specs) + 2 + 3
    timings: dict[str, float] = {}
    with Progress(TextColumn("[bold]zoo[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), disable=not progress, transient=False) as bar:
        task = bar.add_task(f"{size}: world", total=total)
        world = build_world(WorldConfig(seed=seed))
        tok = make_tokenizer(world.vocabulary())

        bar.update(task, description=f"{size}: pretraining")
        t0 = time.time()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(make_config(cfg, tok))
        rng = random.Random(f"{seed}/pretrain")
        sentences = pretraining_corpus(world, rng, cfg.pretrain_steps * cfg.batch * 2)
        corpus = [" ".join(sentences[i: i + 2]) for i in range(0, len(sentences), 2)]
        train(model, tok, corpus, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, batch=cfg.batch, seed=seed,
              response_only=False, on_step=lambda _: bar.advance(task))
        _save(model, tok, models_dir / "pretrained")
        timings["pretrained"] = time.time() - t0

        bar.update(task, description=f"{size}: chat checkpoint")
        t0 = time.time()
        sft = format_sft_corpus(world, random.Random(f"{seed}/sft"), cfg.sft_steps * cfg.batch)
        train(model, tok, sft, steps=cfg.sft_steps, lr=cfg.sft_lr, batch=cfg.batch, seed=seed, response_only=True,
              on_step=lambda _: bar.advance(task))
        _save(model, tok, models_dir / "base")
        timings["base"] = time.time() - t0

        bar.update(task, description=f"{size}: experts and data mix (2 processes)")
        # Longest job first so the two processes finish together.
        jobs = sorted(specs, key=lambda s: -s.steps_factor)
        with cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_train_expert, s, cfg, seed, str(models_dir / "base"), str(models_dir / s.name)): s
                    for s in jobs}
            for fut in cf.as_completed(futs):
                res = fut.result()
                timings[res["name"]] = res["seconds"]
                bar.advance(task, cfg.expert_steps * futs[fut].steps_factor)

        bar.update(task, description=f"{size}: report cards")
        eval_info = _write_eval_assets(world, tmp, final)
        base_sd = LlamaForCausalLM.from_pretrained(models_dir / "base").state_dict()
        models: dict[str, dict] = {}
        roles = {"pretrained": ("pretrained", None, None), "base": ("base", None, None),
                 **{s.name: ("expert", s.language, s.objective) for s in expert_specs()},
                 "data_mix": ("baseline", None, "mixed")}
        for name, (role, lang, obj) in roles.items():
            m = LlamaForCausalLM.from_pretrained(models_dir / name, dtype=torch.float32)
            entry = {"path": f"models/{name}", "role": role, "language": lang, "objective": obj,
                     "parameters": sum(p.numel() for p in m.parameters()),
                     "tau_ratio": tau_ratio(base_sd, m.state_dict()) if role in ("expert", "baseline") else None,
                     "report": {"validation": report_card(m, tok, world, "validation"),
                                "test": report_card(m, tok, world, "test")},
                     "build_seconds": round(timings.get(name, 0.0), 1)}
            models[name] = entry
            bar.advance(task)
        checks = _merge_checks(models_dir, world, seed)
        bar.advance(task, 3)
    torch.set_num_threads(prev_threads)
    counts = {f"{k}/{lang}/{s}": len(v) for (lang, k, s), v in world.examples.items()}
    zoo = {"format": ZOO_FORMAT, "key": final.name, "size": size, "seed": seed, "config": cfg.as_dict(),
           "languages": list(LANGUAGES), "vocab_size": len(tok), "world": counts, "eval": eval_info,
           "models": models, **checks, "build_seconds": round(time.time() - t_start, 1)}
    (tmp / "zoo.json").write_text(json.dumps(zoo, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_zoo(path: Path) -> dict:
    return json.loads((Path(path) / "zoo.json").read_text())
