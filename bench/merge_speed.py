"""Per-candidate latency of the in-memory merge, against the memory-bandwidth bound measured in the
same run, and against a `mergekit-yaml` call on the same recipe when mergekit is installed.

TIES and DARE run the fused kernel (`methods/fused.py`): compiled for tensors of 2**18 entries or more
(`MERGEOPT_COMPILE=auto`), eager below; the zoo is also timed with every tensor compiled.

The bound: bytes a merge must move (read the base and every task vector, write the output) divided by
the copy bandwidth torch reaches on this machine (a large tensor copy, read + write).

    python bench/merge_speed.py [--quick] [--params 300e6] [--experts 4] [--device cuda --no-zoo]
                                [--json runs/bench/merge_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from mergeopt._env import quiet_libraries
from mergeopt.merge import ResidentMerger, merge_to_folder
from mergeopt.methods import fused
from mergeopt.recipe import Recipe

METHODS = {
    "linear": ({"weight": 0.25}, {}),
    "task_arithmetic": ({"weight": 0.5}, {}),
    "ties": ({"weight": 0.5, "density": 0.5}, {}),
    "dare_ties": ({"weight": 0.5, "density": 0.5}, {}),
    "dare_linear": ({"weight": 0.5, "density": 0.5}, {}),
}
TARGETS = {"linear": 2.0, "task_arithmetic": 2.0, "ties": 4.0, "dare_ties": 4.0, "dare_linear": 4.0}


def wait(device: str) -> None:
    """Let a GPU finish its queued kernels, so a timing counts them and not only their launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 512 * 1024**2, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes moved per second (read + write) by a large float32 copy."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    wait(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        wait(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def recipe_for(method: str, base: str, experts: list[str]) -> Recipe:
    per_model, glob = METHODS[method]
    models = [{"model": e, "parameters": dict(per_model)} for e in experts]
    return Recipe.model_validate({"merge_method": method, "base_model": base, "models": models, "parameters": glob,
                                  "seed": 1})


def synthetic_model(params: float, experts: int, layers: int = 8, device: str = "cpu") -> tuple[dict, list[dict], int]:
    """A Llama-shaped set of tensors of about `params` parameters and `experts` small task vectors."""
    vocab = 32000
    # params = 2 * vocab * h + layers * (4 h^2 + 3 * 4 h^2) -> solve for h, rounded to a multiple of 64
    a, b = 16 * layers, 2 * vocab
    hidden = int(((b * b + 4 * a * params) ** 0.5 - b) / (2 * a)) // 64 * 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.up_proj.weight": (4 * hidden, hidden), p + "mlp.gate_proj.weight": (4 * hidden, hidden),
                       p + "mlp.down_proj.weight": (hidden, 4 * hidden), p + "input_layernorm.weight": (hidden,)})
    g = torch.Generator(device=device).manual_seed(0)
    base = {k: torch.randn(s, generator=g, device=device) * 0.02 for k, s in shapes.items()}
    taus = [{k: torch.randn(s, generator=g, device=device) * 0.001 for k, s in shapes.items()} for _ in range(experts)]
    return base, taus, layers


def time_resident(merger: ResidentMerger, recipe: Recipe, repeats: int) -> tuple[float, float, str]:
    """Best wall time of one full merge into resident buffers, the first merge's time (rank memo and
    kernel compilation, as a worker's first trial pays them) and the kernel path the large tensors took."""
    device = str(next(iter(merger.base.values())).device)
    targets = {k: torch.empty_like(v) for k, v in merger.base.items()}
    fused.calls.clear()
    t = time.perf_counter()
    for _ in merger.merged(recipe, targets):
        pass
    wait(device)
    first = time.perf_counter() - t
    path = "compiled" if fused.calls["compiled"] else "eager" if fused.calls["eager"] else "-"
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for n, tensor in merger.merged(recipe, targets):
            if tensor.data_ptr() != targets[n].data_ptr():
                targets[n].copy_(tensor)
        wait(device)
        best = min(best, time.perf_counter() - t)
    return best, first, path


def run_case(label: str, merger: ResidentMerger, n_experts: int, bw: float, repeats: int,
             mergekit: tuple[str, list[str]] | None) -> list[dict]:
    numel = sum(v.numel() for v in merger.base.values())
    moved = (n_experts + 2) * numel * 4  # read base + each task vector, write the output
    bound = moved / bw
    rows = []
    for method in METHODS:
        recipe = recipe_for(method, "base", [f"e{i}" for i in range(n_experts)])
        sec, first, path = time_resident(merger, recipe, repeats)
        row = {"model": label, "params": numel, "experts": n_experts, "method": method, "seconds": sec,
               "bound_seconds": bound, "x_bound": sec / bound, "target_x_bound": TARGETS[method],
               "gbps": moved / sec / 1e9, "first_seconds": first, "kernel": path}
        if mergekit:
            row["mergekit_seconds"] = time_mergekit(method, *mergekit)
            row["speedup_vs_mergekit"] = row["mergekit_seconds"] / sec
        rows.append(row)
        extra = f"  mergekit {row['mergekit_seconds']:.2f} s ({row['speedup_vs_mergekit']:.0f}x)" if mergekit else ""
        print(f"{label:>10} {method:>16}: {sec * 1000:9.1f} ms  bound {bound * 1000:8.1f} ms  "
              f"{row['x_bound']:5.2f}x bound (target <= {TARGETS[method]:.0f}x)  {row['gbps']:5.1f} GB/s  {path:>8} "
              f"(first merge {first:.2f} s){extra}", flush=True)
    return rows


def time_mergekit(method: str, base: str, experts: list[str]) -> float:
    """Wall time of one `mergekit-yaml` call (what mergekit-evolve style searches pay per candidate)."""
    exe = shutil.which("mergekit-yaml") or os.environ.get("MERGEKIT_YAML")
    recipe = recipe_for(method, base, experts)
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "cfg.yml"
        data = yaml.safe_load(recipe.to_yaml())
        for k in ("seed", "language_coefficients", "objective_coefficients"):
            data.pop(k, None)
        if method == "linear":  # mergekit would merge an unlisted base in as one more input
            data.pop("base_model", None)
        cfg.write_text(yaml.safe_dump(data))
        t = time.perf_counter()
        subprocess.run([exe, str(cfg), str(Path(d) / "out"), "--random-seed", "1"],
                       check=True, capture_output=True)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="zoo only, no synthetic large model")
    ap.add_argument("--params", type=float, default=300e6)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the resident tensors live and merge (cuda: a GPU)")
    ap.add_argument("--no-zoo", action="store_true", help="the synthetic model only (no zoo build, no mergekit)")
    ap.add_argument("--json", default="runs/bench/merge_speed.json")
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    bw = copy_bandwidth(device=args.device)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s); merging on {where}; copy bandwidth {bw / 1e9:.1f} GB/s (read + write)")
    rows: list[dict] = []
    if not args.no_zoo:
        rows += zoo_rows(args, bw)
    if not args.quick:
        b, taus, layers = synthetic_model(args.params, args.experts, device=args.device)
        big = ResidentMerger.from_tensors(b, taus, layers)
        rows += run_case(f"{sum(v.numel() for v in b.values()) / 1e6:.0f}M", big, args.experts, bw, args.repeats, None)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                           "threads": args.threads, "copy_gbps": bw / 1e9, "cuda": torch.cuda.is_available(),
                                           "device": where},
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


def zoo_rows(args: argparse.Namespace, bw: float) -> list[dict]:
    """The zoo's merges: eager (the default there), against mergekit-yaml when it is installed, then
    with every tensor compiled; and the streamed merge to disk for reference."""
    exe = shutil.which("mergekit-yaml") or os.environ.get("MERGEKIT_YAML")
    if not exe:
        print("mergekit-yaml not found: install mergekit (LGPL, optional) or set MERGEKIT_YAML to compare against it")

    from mergeopt.zoo import build_zoo, load_zoo

    zoo = build_zoo("default", seed=0)
    names = [n for n, m in load_zoo(zoo)["models"].items() if m["role"] == "expert"]
    paths = [str(zoo / "models" / n) for n in names]
    base_path = str(zoo / "models" / "base")
    recipe = recipe_for("task_arithmetic", base_path, paths)
    from mergeopt.merge import open_models

    base, experts = open_models(recipe)
    merger = ResidentMerger(base, experts, device=args.device)
    rows = run_case("zoo", merger, len(experts), bw, max(args.repeats, 10), (base_path, paths) if exe else None)
    # The zoo's tensors are below the compile threshold; the same merges with compiled kernels:
    mode = os.environ.get("MERGEOPT_COMPILE")
    os.environ["MERGEOPT_COMPILE"] = "1"
    rows += run_case("zoo", merger, len(experts), bw, max(args.repeats, 10), None)
    if mode is None:
        os.environ.pop("MERGEOPT_COMPILE")
    else:
        os.environ["MERGEOPT_COMPILE"] = mode
    with tempfile.TemporaryDirectory() as d:  # the streamed merge to disk, for reference
        t = time.perf_counter()
        merge_to_folder(recipe, Path(d) / "out")
        print(f"       zoo  streamed merge to disk (task_arithmetic): {(time.perf_counter() - t) * 1000:.0f} ms")
    return rows


if __name__ == "__main__":
    sys.exit(main())
