"""Command-line entry points. Errors a user can fix end in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import UserError

EXIT_USAGE = 2


def _zoo_table(zoo: dict, split: str) -> Table:
    langs = zoo["languages"]
    t = Table(title=f"zoo {zoo['key']} report card ({split} split)")
    for col in ("model", "tags", *[f"help/{lg}" for lg in langs], "help", "harm", "unusable", "over-ref", "combined", "‖τ‖/‖θ‖"):
        t.add_column(col, justify="right" if col not in ("model", "tags") else "left")
    rows = [(name, m) for name, m in zoo["models"].items()]
    rows += [(f"merge: {name}", {"report": m, "language": None, "objective": "merge", "tau_ratio": None})
             for name, m in zoo.get("merges", {}).items()]
    for name, m in rows:
        r = m["report"][split]
        tags = "/".join(x for x in (m.get("language"), m.get("objective")) if x) or "-"
        tau = "-" if m.get("tau_ratio") is None else f"{m['tau_ratio']:.3f}"
        t.add_row(name, tags, *[f"{r[f'helpfulness/{lg}']:.2f}" for lg in langs], f"{r['helpfulness']:.2f}",
                  f"{r['harm']:.2f}", f"{r['unusable']:.2f}", f"{r['over_refusal']:.2f}", f"{r['combined']:+.2f}", tau)
    return t


def cmd_zoo(args: argparse.Namespace) -> int:
    from .zoo import build_zoo, load_zoo

    path = build_zoo(args.size, args.seed, Path(args.out) if args.out else None, progress=not args.quiet, force=args.force)
    zoo = load_zoo(path)
    if args.json:
        print(json.dumps(zoo, indent=2))
        return 0
    console = Console(width=max(Console().width, 150))
    console.print(_zoo_table(zoo, args.split))
    dare = zoo.get("dare", {})
    if dare:
        console.print("DARE on single experts, own-language helpfulness kept: " + ", ".join(
            f"{k} p=.5 {v['retention_p0.5']:.2f} p=.9 {v['retention_p0.9']:.2f}" for k, v in dare.items()))
    console.print(f"zoo folder: {path}  (built in {zoo['build_seconds']:.0f} s)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from .merge import merge_to_folder
    from .recipe import load_recipe

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    out = merge_to_folder(recipe, args.out, force=args.force, max_shard_bytes=int(args.shard_size * 1024**3),
                          allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, device=args.device,
                          recipe_text=Path(args.recipe).read_text())
    print(f"merged {recipe.merge_method} of {len(recipe.experts())} model(s) into {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergeopt", description="Search-based optimizer for merging language models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    z = sub.add_parser("zoo", help="the embedded model zoo")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="build (or find cached) the zoo and print its report card")
    zb.add_argument("--out", help="parent folder of zoo builds (default ~/.cache/mergeopt/zoo or $MERGEOPT_ZOO_DIR)")
    zb.add_argument("--size", choices=["test", "default"], default="default")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--split", choices=["validation", "test"], default="validation", help="split of the printed card")
    zb.add_argument("--force", action="store_true", help="rebuild even when cached")
    zb.add_argument("--json", action="store_true", help="print zoo.json instead of the table")
    zb.add_argument("--quiet", action="store_true", help="no progress bar")
    zb.set_defaults(func=cmd_zoo)

    m = sub.add_parser("merge", help="apply one merge recipe (mergekit YAML) and write a Hugging Face folder")
    m.add_argument("recipe", help="recipe YAML: merge_method, base_model, models, parameters, dtype, seed, ...")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--force", action="store_true", help="replace an existing output folder")
    m.add_argument("--shard-size", type=float, default=2.0, help="maximum shard size in GiB (default 2)")
    m.add_argument("--device", default="cpu", help="device the tensors are merged on (cpu, cuda)")
    m.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    m.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (.bin/.pt): they can run code")
    m.add_argument("--trust-remote-code", action="store_true", help="allow models whose config needs remote code")
    m.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    from ._env import quiet_libraries

    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"mergeopt: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def optimize_main(argv: list[str] | None = None) -> int:
    return main(["optimize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
