"""Command-line entry points. Errors a user can fix end in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from .errors import StudyIncomplete, UserError

if TYPE_CHECKING:
    from .space import Space

EXIT_USAGE = 2
EXIT_INCOMPLETE = 3  # the study stopped before its trials were done; the message says how to resume
EXIT_INTERRUPTED = 130  # Ctrl-C


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


def _load_model(path: str, allow_pickle: bool, trust_remote_code: bool):
    """A saved model for evaluation, with the same safety checks as a merge input."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoints import Checkpoint
    from .refs import resolve_model_path

    path = str(resolve_model_path(path))
    Checkpoint(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                 use_safetensors=not allow_pickle or None).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluation.assets import resolve_assets
    from .evaluation.evaluator import Evaluator, MetricError
    from .objectives import combined_score
    from .space import load_space

    torch.set_num_threads(args.threads)
    space = load_space(args.space)
    assets = resolve_assets(space.evaluation, args.split)
    model, tok = _load_model(args.model, args.allow_pickle, args.trust_remote_code)
    try:
        metrics = Evaluator(model, tok, assets).evaluate()
    except MetricError as e:
        raise UserError(f"{args.model}: {e}") from None
    metrics["combined"] = combined_score(space, metrics)
    if args.json:
        print(json.dumps({"model": args.model, "split": args.split, "metrics": metrics}, indent=2))
        return 0
    t = Table(title=f"{args.model} ({args.split} split)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in sorted(metrics):
        t.add_row(k, f"{metrics[k]:.4f}")
    Console().print(t)
    return 0


def _print_memory_plan(console, space, args: argparse.Namespace) -> None:
    """The memory plan of `optimize --dry-run`, from the base model's headers: what each tier needs per
    worker and per node. Whether it fits is the preflight's check, with the line `optimize` would refuse
    with (exit status 2)."""
    from .loop.preflight import study_plan
    from .memory_plan import GIB, MARGIN
    from .refs import is_zoo_ref

    if is_zoo_ref(space.base_model):
        console.print("memory plan: the embedded zoo's models are a few MB; plans are printed for model folders")
        return
    if not Path(space.base_model).is_dir():  # a template naming folders of another machine
        console.print(f"memory plan: {space.base_model} is not here; the plan is printed where the models are")
        return
    load = {"allow_pickle": args.allow_pickle, "trust_remote_code": args.trust_remote_code}
    workers = 1 if args.backend == "inline" else space.search.workers
    p, size, node = study_plan(space, workers, ray=args.backend != "inline", **load)
    gpu = f"{node.gpus} GPU(s), {node.gpu_free / GIB:.1f} GiB free on the fullest" if node.gpus else "no GPU"
    t = Table(title=f"memory plan: {size.params / 1e9:.2f}B parameters x {len(space.models)} experts, {space.dtype}, "
                    f"placement {space.placement} -> {p.placement}, {workers} worker(s); this node: "
                    f"{node.host_free / GIB:.1f} GiB host memory free, {gpu}")
    for col in ("tier", "item", "GiB per worker", "GiB per node"):
        t.add_column(col, justify="right" if col.startswith("GiB") else "left")
    for row in p.table():
        t.add_row(*row)
    console.print(t)
    console.print(f"a plan fits when every tier is within {MARGIN:.0%} of its free memory (checked below)")


def cmd_optimize(args: argparse.Namespace) -> int:
    import time

    import torch

    from .space import load_space

    torch.set_num_threads(1)
    space = load_space(args.space)
    over: dict = {}
    for key in ("n_trials", "workers", "sampler", "seed"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    if over:
        space = space.model_copy(update={"search": space.search.model_copy(update=over)})
        from .space import Space

        space = Space.model_validate(space.model_dump(mode="json", by_alias=True))
    run_dir = Path(args.run_dir) if args.run_dir else space.run_dir
    console = Console(quiet=args.quiet)
    if args.backend == "inline" and space.search.workers > 1:
        console.print(f"--backend inline runs one worker in this process (search.workers {space.search.workers} ignored)")
        space = space.model_copy(update={"search": space.search.model_copy(update={"workers": 1})})
    dists = space.distributions()
    console.print(f"[bold]{space.name}[/]: {len(space.models)} models, methods {', '.join(space.methods)}, "
                  f"{len(dists)} searched parameters, sampler {space.search.sampler}, {space.search.n_trials} trials, "
                  f"{space.search.workers} worker(s) -> {run_dir}")
    if args.dry_run:
        t = Table(title="search space")
        t.add_column("parameter")
        t.add_column("distribution")
        for k, d in dists.items():
            t.add_row(k, repr(d))
        console.print(t)
        console.print(f"objectives: {', '.join(f'{o.metric} ({o.direction})' for o in space.objectives)}; "
                      f"combined: {space.combined}; storage: {space.storage or f'sqlite:///{run_dir}/study.db'}")
        console.print(f"baselines enqueued first: {len(space.baselines()) if space.search.baselines else 0}")
        _print_memory_plan(console, space, args)
        from .loop.preflight import preflight

        workers = 1 if args.backend == "inline" else space.search.workers
        preflight(space, run_dir, workers=workers, ray=args.backend != "inline", memory=args.address is None,
                  on_check=lambda what, found: console.print(f"checked {what}: {found}"), build_zoo=False,
                  allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
        console.print("every check passed; nothing was started or written")
        return 0
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .report import write_reports
    from .search import run_study
    from .signals import Stopped, stop_on_signals

    t0 = time.perf_counter()
    resume = _resume_command(args, run_dir)
    last: dict = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} trials"),
                  TextColumn("best {task.fields[best]}  front {task.fields[front]}  HV {task.fields[hv]}  {task.fields[note]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=args.quiet) as bar:
        task = bar.add_task("checking", total=space.search.n_trials, best="-", front=0, hv="-", note="")

        def on_phase(name: str) -> None:
            bar.update(task, description=name)

        def on_progress(p) -> None:
            last["p"] = p
            note = f"{p.restarts} worker(s) replaced" if p.restarts else ""
            bar.update(task, completed=p.done, best=f"{p.best_combined:+.3f}" if p.best_combined > -1e9 else "-",
                       front=p.front_size, hv=f"{p.hypervolume:.3f}", note=note)

        try:
            with stop_on_signals():
                study = run_study(space, run_dir, n_trials=space.search.n_trials, workers=space.search.workers,
                                  address=args.address, backend=args.backend, on_progress=on_progress,
                                  on_phase=on_phase, allow_pickle=args.allow_pickle,
                                  trust_remote_code=args.trust_remote_code, dashboard=args.ray_dashboard)
        except StudyIncomplete as e:
            raise StudyIncomplete(f"{space.name}: stopped with {e.done} of {e.total} trials finished: {e.cause}; "
                                  f"resume with: {resume}", e.done, e.total) from None
        except KeyboardInterrupt as e:
            p = last.get("p")
            done = f" with {p.done} of {p.total} trials finished" if p is not None else ""
            how = f"stopped by {e.args[0]}" if isinstance(e, Stopped) else "interrupted"
            raise StudyIncomplete(f"{space.name}: {how}{done}; finished trials are kept in {run_dir}; "
                                  f"resume with: {resume}", 0, 0, interrupted=True,
                                  status=e.exit_status if isinstance(e, Stopped) else None) from None
    p = last.get("p")
    if p is not None and p.phase == "timed out":  # on stderr: --quiet must not hide that trials are missing
        print(f"mergeopt: stopped at search.timeout ({space.search.timeout:g} s) with {p.done} of {p.total} trials "
              f"finished; resume with: {resume}", file=sys.stderr)
    summary = write_reports(space, study, run_dir, elapsed_s=time.perf_counter() - t0)
    _print_front(Console(width=max(Console().width, 130)), space, summary)
    if not args.no_export and summary.get("best"):
        from .export import export

        best = run_dir / "best"
        # The run folder's own best/ is re-exported when the study grows; any other folder needs --force.
        own = best.exists() and (best / "manifest.json").exists()
        folder = export(space, study, run_dir, out=best, force=own, summary=summary, allow_pickle=args.allow_pickle,
                        trust_remote_code=args.trust_remote_code)
        picked = json.loads((folder / "mergeopt_trial.json").read_text())["trial"]
        console.print(f"exported trial {picked}, the Pareto-best merge by pick rule {space.pick!r}, to {folder}")
        _warn_unusable(folder)
    return 0


UNUSABLE_WARNING = 0.5


def _warn_unusable(folder: Path) -> None:
    """A model whose responses are mostly neither refusals nor answers has a low harm that means
    little; a pick rule on harm alone can choose it, so say so."""
    sub = json.loads((folder / "mergeopt_trial.json").read_text())
    share = sub["validation"].get("unusable", 0.0)
    if share >= UNUSABLE_WARNING:
        print(f"mergeopt: warning: trial {sub['trial']}: {share:.0%} of its responses are unusable (neither a "
              "refusal nor an answer), so its harm and over-refusal say little; check its outputs", file=sys.stderr)


def _resume_command(args: argparse.Namespace, run_dir: Path) -> str:
    import shlex

    cmd = ["optimize", "--space", args.space, "--run-dir", str(run_dir)]
    for flag in ("n_trials", "workers", "sampler", "seed", "address"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.backend != "ray":
        cmd += ["--backend", args.backend]
    cmd += [flag for flag, on in (("--allow-pickle", args.allow_pickle), ("--trust-remote-code", args.trust_remote_code)) if on]
    return shlex.join(cmd)


def _print_front(console: Console, space, summary: dict) -> None:
    t = Table(title=f"{summary['name']}: Pareto front ({summary['trials']['complete']} complete trials, "
                    f"hypervolume {summary['hypervolume']:.3f})")
    langs = sorted({k.split("/")[1] for f in summary["front"] for k in f["metrics"] if k.startswith("helpfulness/")})
    for col in ("trial", "method", *[f"help/{lg}" for lg in langs], "help", "harm", "over-ref", "unusable", "combined", "note"):
        t.add_column(col, justify="left" if col in ("method", "note") else "right")

    def row(name: str, method: str, m: dict, note: str = "") -> None:
        t.add_row(name, method, *[f"{m.get(f'helpfulness/{lg}', float('nan')):.2f}" for lg in langs],
                  f"{m['helpfulness']:.2f}", f"{m['harm']:.2f}", f"{m.get('over_refusal', 0):.2f}",
                  f"{m.get('unusable', 0):.2f}", f"{m['combined']:+.3f}", note)

    for f in summary["front"]:
        row(str(f["trial"]), f["params"].get("method", space.methods[0]), f["metrics"], f.get("baseline") or "")
    for name, ref in summary.get("references", {}).items():
        row(name, "(reference)", ref["metrics"], "dominated by the front" if ref["dominated_by_front"] else "not dominated")
    console.print(t)
    best_single = summary.get("best_single_expert_combined")
    if summary.get("best"):
        b = summary["best"]
        msg = f"best combined: trial {b['trial']} at {b['metrics']['combined']:+.3f}"
        scored, total = summary.get("single_experts_scored", 0), summary.get("single_experts", 0)
        if best_single is not None and scored < total:
            verdict = "beats" if b["metrics"]["combined"] > best_single else "does NOT beat"
            msg += (f"; it {verdict} the {scored} of {total} single experts scored so far "
                    f"(best {best_single:+.3f}; the others' baselines have not run)")
        elif best_single is not None:
            verdict = "beats" if summary["merge_beats_every_single_expert"] else "does NOT beat"
            msg += f"; it {verdict} every single expert (best single expert {best_single:+.3f})"
        if b["trial"] not in {f["trial"] for f in summary["front"]}:
            extra = [k for k in space.combined_weights if k not in {o.metric for o in space.objectives}]
            msg += ("; it is off the front: another trial is at least as good on every objective, and this one "
                    f"scores higher through terms of the combined score that are not objectives ({', '.join(extra)})")
        console.print(msg)
    for name, ref in summary.get("references", {}).items():
        diff = ref["metrics"]["combined"] - summary["best"]["metrics"]["combined"] if summary.get("best") else 0
        console.print(f"{name}: combined {ref['metrics']['combined']:+.3f} ({diff:+.3f} against the best merge); "
                      + ("the front dominates it" if ref["dominated_by_front"] else "no merge on the front dominates it")
                      + (f"; it dominates front trials {ref['dominates_front_members']}" if ref["dominates_front_members"] else ""))


def _run_space(p: Path) -> Space:
    """The space a run folder was made by, or one line saying the folder is not a run's."""
    from .space import Space

    if not (p / "space.json").exists():
        raise UserError(f"{p}: not a run folder (no space.json); expected the folder optimize wrote")
    try:
        return Space.model_validate(json.loads((p / "space.json").read_text()))
    except ValueError as e:  # not JSON, or not a space this version reads (pydantic's error is a ValueError)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{p / 'space.json'}: not a space file this mergeopt reads ({first})") from None


def _load_run(run_dir: str, *, merging: bool = False):
    from .loop.store import open_study

    p = Path(run_dir)
    space = _run_space(p)
    return space, open_study(space, p, merging=merging)


def cmd_pareto(args: argparse.Namespace) -> int:
    from .report import write_reports

    space, study = _load_run(args.run_dir)
    summary = write_reports(space, study, Path(args.run_dir))
    if args.json:
        print(json.dumps(summary["front"], indent=2, default=float))
    else:
        _print_front(Console(width=max(Console().width, 130)), space, summary)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .loop.progress import Front
    from .loop.store import finished

    space, study = _load_run(args.run_dir)
    done = len(finished(study))
    best, front_n, hv = Front(space, study).stats()
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    print(f"{space.name}: {done}/{space.search.n_trials} trials finished ({', '.join(f'{v} {k}' for k, v in sorted(states.items()))}); "
          f"best combined {best:+.3f}, front {front_n}, hypervolume {hv:.3f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export
    from .objectives import front_trials

    space, study = _load_run(args.run_dir, merging=True)
    run_dir = Path(args.run_dir)
    if args.all_front:
        root = Path(args.out) if args.out else run_dir / "front"
        for t in sorted(front_trials(space, study), key=lambda t: t.number):
            folder = export(space, study, run_dir, trial_number=t.number, out=root / f"trial-{t.number}", force=args.force,
                            allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                            how="one of the Pareto front's members, all exported (`--all-front`)")
            print(f"exported trial {t.number} to {folder}")
        return 0
    folder = export(space, study, run_dir, trial_number=args.trial, rule=args.pick, out=Path(args.out) if args.out else None,
                    force=args.force, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    trial = json.loads((folder / "mergeopt_trial.json").read_text())["trial"]
    how = f"trial {args.trial}" if args.trial is not None else f"by pick rule {(args.pick or space.pick).strip()!r}"
    print(f"exported trial {trial} ({how}) to {folder}")
    _warn_unusable(folder)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard, an optional extra, on a run folder's own storage (SQLite, journal or server),
    served until Ctrl-C: a live view of a study that is still running, where report.html is written at
    its end."""
    from .loop.storage import open_storage, storage_spec
    from .loop.store import find_study

    run_dir = Path(args.run_dir)
    space = _run_space(run_dir)
    try:  # before the storage is opened: nothing is touched when the extra is missing
        from optuna_dashboard import run_server
    except ImportError:
        raise UserError("mergeopt dashboard needs optuna-dashboard, an optional extra: "
                        "pip install 'mergeopt[dashboard]'") from None
    if find_study(space, run_dir, merging=False) is None:
        raise UserError(f"{run_dir}: its storage ({storage_spec(space.storage, run_dir).url}) holds no study "
                        f"{space.name!r} yet")
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"optuna-dashboard for study {space.name!r} ({storage_spec(space.storage, run_dir).url}) at "
          f"http://{shown}:{args.port}/dashboard/ (Ctrl-C stops it)", flush=True)
    try:
        run_server(open_storage(space.storage, run_dir), host=args.host, port=args.port)
    except OSError as e:  # the port is taken, or the host is not this machine's
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e}); "
                        "pass another --port") from None
    except KeyboardInterrupt:  # the way to stop a server: not an error
        pass
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .space import Space

    print(json.dumps(Space.model_json_schema(by_alias=True), indent=2))
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
    _add_load_flags(m)
    m.set_defaults(func=cmd_merge)

    e = sub.add_parser("eval", help="score a saved model with a space file's evaluation")
    e.add_argument("model", help="model folder (safetensors, config, tokenizer), or zoo:NAME")
    e.add_argument("--space", required=True, help="search-space file (or a name in search_spaces/)")
    e.add_argument("--split", choices=["validation", "test"], default="validation")
    e.add_argument("--json", action="store_true")
    e.add_argument("--threads", type=int, default=1)
    _add_load_flags(e)
    e.set_defaults(func=cmd_eval)

    o = sub.add_parser("optimize", help="search merge recipes for a space file (resumes an existing run folder)")
    add_optimize_args(o)
    o.set_defaults(func=cmd_optimize)

    pa = sub.add_parser("pareto", help="print the Pareto front of a run folder (and rewrite its reports)")
    pa.add_argument("run_dir")
    pa.add_argument("--json", action="store_true")
    pa.set_defaults(func=cmd_pareto)

    st = sub.add_parser("status", help="progress of a run folder")
    st.add_argument("run_dir")
    st.set_defaults(func=cmd_status)

    ex = sub.add_parser("export", help="verify and export a trial of a run folder as a Hugging Face model folder")
    ex.add_argument("run_dir")
    which = ex.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, help="trial number to export")
    which.add_argument("--pick", help="combined | knee | a constraint such as 'harm <= 0.05' (default: the space's pick)")
    which.add_argument("--all-front", action="store_true", help="one folder per Pareto-front member")
    ex.add_argument("--out", help="output folder (default RUN_DIR/best, or RUN_DIR/front with --all-front)")
    ex.add_argument("--force", action="store_true", help="replace an existing folder")
    _add_load_flags(ex)
    ex.set_defaults(func=cmd_export)

    da = sub.add_parser("dashboard", help="serve optuna-dashboard on a run folder's study "
                                          "(pip install 'mergeopt[dashboard]')")
    da.add_argument("run_dir")
    da.add_argument("--port", type=_port, default=8080, help="port to listen on (default 8080)")
    da.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    da.set_defaults(func=cmd_dashboard)

    sc = sub.add_parser("schema", help="print the JSON Schema of search-space files")
    sc.set_defaults(func=cmd_schema)
    return p


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    """Safe by default: pickle checkpoints and remote code only when asked for."""
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (.bin/.pt): they can run code")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models whose config needs remote code")


def add_optimize_args(o: argparse.ArgumentParser) -> None:
    o.add_argument("--space", required=True, help="search-space YAML (a bare name is looked up in search_spaces/)")
    from .loop.samplers import SAMPLERS

    o.add_argument("--n-trials", type=_positive, help="trials in the study (resumed trials count)")
    o.add_argument("--workers", type=_positive, help="parallel workers (Ray actors)")
    o.add_argument("--sampler", choices=list(SAMPLERS), help="; ".join(f"{k}: {v.description}" for k, v in SAMPLERS.items()))
    o.add_argument("--seed", type=int)
    o.add_argument("--run-dir", help="run folder (default runs/<name>/)")
    o.add_argument("--address", help="Ray cluster address to join (default: start Ray locally)")
    o.add_argument("--backend", choices=["ray", "inline"], default="ray", help="inline: one worker in this process")
    o.add_argument("--ray-dashboard", action="store_true", help="start Ray's dashboard with a local Ray instance")
    o.add_argument("--dry-run", action="store_true", help="validate the space and print the plan; load nothing")
    o.add_argument("--quiet", action="store_true", help="no progress bar (CI logs)")
    o.add_argument("--no-export", action="store_true", help="do not export the Pareto-best model at the end")
    _add_load_flags(o)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port up to 65535, got {value}")
    return value


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
    except StudyIncomplete as e:
        if args.debug:
            raise
        print(f"mergeopt: {e}", file=sys.stderr)
        return e.status or (EXIT_INTERRUPTED if e.interrupted else EXIT_INCOMPLETE)
    except KeyboardInterrupt:
        print("mergeopt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def optimize_main(argv: list[str] | None = None) -> int:
    return main(["optimize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
