"""Parity with mergekit: the same YAML merged by `mergekit-yaml` and by `mergeopt merge` on the zoo.

Deterministic methods: the max absolute difference over all tensors (target <= 1e-6 in float32).
DARE / DELLA draw random masks (mergekit from the global torch generator in tensor order, mergeopt per
(seed, tensor, model)), so their statistics are compared instead: the share of task-vector entries kept,
and the mean and L2 norm of the merged delta.

mergekit is LGPL and optional: install it in its own environment and point MERGEKIT_YAML at its
`mergekit-yaml`, or have it on PATH.

    MERGEKIT_YAML=/path/to/mergekit-yaml python bench/mergekit_parity.py [--size test] [--json runs/bench/mergekit_parity.json]

Exported configs: a short study on the zoo, every front member exported (`export --all-front`), and each
export's `mergekit_config.yml` run by `mergekit-yaml` exactly as written, from another folder; the result
must match the export's own weights (max |diff| <= 1e-6 on float32 zoo checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from mergeopt._env import quiet_libraries

DETERMINISTIC = {
    "linear": ({"weight": [0.2, 0.5]}, {}, False),
    "task_arithmetic": ({"weight": 0.6}, {"lambda": 0.9}, True),
    "ties": ({"weight": 0.7, "density": 0.4}, {}, True),
    "breadcrumbs": ({"weight": 0.5, "density": 0.8, "gamma": 0.05}, {}, True),
    "slerp": ({}, {"t": [0.3, 0.7]}, True),
}
RANDOM = {
    "dare_linear": ({"weight": 0.5, "density": 0.3}, {}),
    "dare_ties": ({"weight": 0.5, "density": 0.3}, {}),
    "della": ({"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}),
}


def config(method: str, zoo: Path, per_model: dict, glob: dict, with_base: bool = True) -> dict:
    experts = ["help_en"] if method == "slerp" else ["help_en", "help_fr", "safety"]
    models = [{"model": str(zoo / "models" / e), "parameters": dict(per_model)} for e in experts]
    if method == "slerp":
        models = [{"model": str(zoo / "models" / "base")}, *[{"model": m["model"]} for m in models]]
    cfg = {"merge_method": method, "models": models, "dtype": "float32"}
    if with_base:
        cfg["base_model"] = str(zoo / "models" / "base")
    if glob:
        cfg["parameters"] = glob
    return cfg


def run_both(cfg: dict, work: Path, mergekit: str) -> tuple[dict, dict]:
    path = work / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    mk, mo = work / "mk", work / "mo"
    subprocess.run([mergekit, str(path), str(mk), "--random-seed", "1"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "mergeopt.cli", "merge", str(path), "--out", str(mo), "--force"], check=True,
                   capture_output=True)
    return load_file(mk / "model.safetensors"), load_file(mo / "model.safetensors")


def exported(size: str, work: Path, mergekit: str) -> list[dict]:
    """The exported mergekit_config.yml of every front member of a short study, run as written."""
    from mergeopt.space import SPACES_DIR

    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    prefix = "zoo:" if size == "default" else f"zoo-{size}:"
    data.update(name="mk_export", base_model=f"{prefix}base", methods=["ties", "task_arithmetic"])
    for m in data["models"]:
        m["path"] = m["path"].replace("zoo:", prefix)
    data["evaluation"]["zoo"] = size
    data["search"].update(n_trials=10, workers=1)
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    cli = [sys.executable, "-m", "mergeopt.cli"]
    subprocess.run([*cli, "optimize", "--space", str(space), "--run-dir", str(work / "run"), "--backend", "inline",
                    "--no-export", "--quiet"], check=True, capture_output=True)
    subprocess.run([*cli, "export", str(work / "run"), "--all-front", "--out", str(work / "front")], check=True,
                   capture_output=True)
    import optuna

    study = optuna.load_study(study_name="mk_export", storage=f"sqlite:///{work / 'run' / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for method in ("ties", "task_arithmetic"):  # each method at least once, on the front or not
        picked = max((t for t in done if t.params.get("method") == method),
                     key=lambda t: t.user_attrs["metrics"]["combined"], default=None)
        if picked is not None and not (work / "front" / f"trial-{picked.number}").exists():
            subprocess.run([*cli, "export", str(work / "run"), "--trial", str(picked.number), "--out",
                            str(work / "front" / f"trial-{picked.number}")], check=True, capture_output=True)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    rows = []
    for folder in sorted((work / "front").iterdir()):
        cfg = folder / "mergekit_config.yml"
        if not cfg.exists():
            continue
        out = elsewhere / folder.name
        subprocess.run([mergekit, str(cfg), str(out)], check=True, capture_output=True, cwd=elsewhere)
        a, b = load_file(out / "model.safetensors"), load_file(folder / "model.safetensors")
        assert set(a) == set(b), (folder.name, set(a) ^ set(b))
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        method = yaml.safe_load(cfg.read_text())["merge_method"]
        rows.append({"export": folder.name, "method": method, "max_abs_diff": diff, "pass": diff <= 1e-6})
        print(f"{folder.name:>16} ({method}): mergekit-yaml on the exported config, max |diff| = {diff:.2e}  "
              f"({'ok' if diff <= 1e-6 else 'ABOVE 1e-6'})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="runs/bench/mergekit_parity.json")
    ap.add_argument("--size", default="default", choices=["default", "test"], help="the zoo to merge")
    args = ap.parse_args()
    quiet_libraries()
    exe = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    if not exe:
        print("mergekit-yaml not found: install mergekit (LGPL, optional) in its own environment and set MERGEKIT_YAML")
        return
    from mergeopt.zoo import build_zoo

    zoo = build_zoo(args.size, seed=0)
    base = load_file(zoo / "models" / "base" / "model.safetensors")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for method, (pm, glob, with_base) in DETERMINISTIC.items():
            a, b = run_both(config(method, zoo, pm, glob, with_base), work, exe)
            assert set(a) == set(b), (method, set(a) ^ set(b))
            diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
            rows.append({"method": method, "max_abs_diff": diff, "pass": diff <= 1e-6})
            print(f"{method:>16}: max |mergekit - mergeopt| = {diff:.2e}  ({'ok' if diff <= 1e-6 else 'ABOVE 1e-6'})")
        for method, (pm, glob) in RANDOM.items():
            a, b = run_both(config(method, zoo, pm, glob), work, exe)
            stats = {}
            for label, sd in (("mergekit", a), ("mergeopt", b)):
                deltas = torch.cat([(sd[k].float() - base[k].float()).flatten() for k in sorted(base)])
                stats[label] = {"changed_share": float((deltas != 0).float().mean()), "mean": float(deltas.mean()),
                                "norm": float(deltas.norm())}
            rel = abs(stats["mergeopt"]["norm"] - stats["mergekit"]["norm"]) / stats["mergekit"]["norm"]
            rows.append({"method": method, **{f"{k}_{s}": v for k, st in stats.items() for s, v in st.items()},
                         "norm_rel_diff": rel})
            print(f"{method:>16}: entries changed {stats['mergekit']['changed_share']:.3f} vs {stats['mergeopt']['changed_share']:.3f}, "
                  f"mean {stats['mergekit']['mean']:+.2e} vs {stats['mergeopt']['mean']:+.2e}, "
                  f"norm {stats['mergekit']['norm']:.4f} vs {stats['mergeopt']['norm']:.4f} ({rel:.1%} apart)")
        (work / "export").mkdir()
        rows += exported(args.size, work / "export", exe)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
