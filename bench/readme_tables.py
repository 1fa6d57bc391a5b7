"""Rewrite the benchmark tables of docs/benchmarks.md from the benchmarks' JSON under runs/bench/.

Each table sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` and is rendered from
`runs/bench/NAME.json`; the prose around the tables is left alone, and a table whose JSON is missing
is kept as it is. The `provenance` table says, per table, the command, the machine and the date it was
measured (the JSON's `date`, else its file's modification date); its rows without JSON are kept too.
`make bench` runs this last.

    python bench/readme_tables.py [--page docs/benchmarks.md] [--dir runs/bench]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _ms(s: float) -> str:
    return f"{s * 1000:.1f} ms"


def merge_speed(d: dict) -> str:
    lines = [f"copy bandwidth {d['machine']['copy_gbps']:.1f} GB/s, {d['machine']['cores']} cores, one thread",
             "", "| model | method | kernel | per candidate | bound | × bound (target) | first merge | "
             "`mergekit-yaml` (speed-up) |", "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        size = "zoo" if r["model"] == "zoo" else f"synthetic {r['params'] / 1e6:.0f}M"
        mk = f"{r['mergekit_seconds']:.2f} s ({r['speedup_vs_mergekit']:.0f}×)" if r.get("mergekit_seconds") else "-"
        first = f"{r['first_seconds']:.2f} s" if "first_seconds" in r else "-"
        lines.append(f"| {size} ({r['params'] / 1e6:.2f}M params) | {r['method']} | {r.get('kernel', '-')} | "
                     f"{_ms(r['seconds'])} | {_ms(r['bound_seconds'])} | {r['x_bound']:.2f}× (≤ {r['target_x_bound']:g}×) "
                     f"| {first} | {mk} |")
    return "\n".join(lines)


def mergekit_parity(d: list) -> str:
    lines = ["| method | max \\|diff\\| (target ≤ 1e-6) | share changed (mergekit / mergeopt) | norm (mergekit / mergeopt) |",
             "|---|---|---|---|"]
    for r in d:
        if "export" in r:
            lines.append(f"| {r['method']}, exported `{r['export']}`'s mergekit_config.yml as written | "
                         f"{r['max_abs_diff']:.1e} | - | - |")
        elif "max_abs_diff" in r:
            lines.append(f"| {r['method']} | {r['max_abs_diff']:.1e} | - | - |")
        else:
            lines.append(f"| {r['method']} | random: by statistics | {r['mergekit_changed_share']:.3f} / "
                         f"{r['mergeopt_changed_share']:.3f} | {r['mergekit_norm']:.3f} / {r['mergeopt_norm']:.3f} "
                         f"({r['norm_rel_diff']:.1%} apart) |")
    return "\n".join(lines)


def eval_overhead(d: dict) -> str:
    b = d["best"]
    return "\n".join([
        "| per candidate (target ≤ 1 s) | lm-eval helpfulness | harm + over-refusal | forward passes | outside forward passes (target ≤ 5%) | loglik agreement |",
        "|---|---|---|---|---|---|",
        f"| {b['wall_s']:.3f} s ({d['items']} prompts) | {b['help_s']:.3f} s | {b['safety_s']:.3f} s | {b['forward_s']:.3f} s | "
        f"{d['overhead_share']:.1%} | {d['loglik_agreement']:.1%} |"])


def search_overhead(d: dict) -> str:
    lines = ["| workers | trials/s | merge per trial | forward passes | evaluation | trial wall | merge + forward (target ≥ 95%) | "
             "merge + evaluation | workers busy in merge + forward | worker memory (USS / PSS) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        mem = f"{r['worker_uss_mib']:.0f} / {r['worker_pss_mib']:.0f} MiB" if "worker_uss_mib" in r else "-"
        lines.append(f"| {r['workers']} | {r['trials_per_s']:.2f} | {_ms(r['merge_s_mean'])} | {_ms(r['forward_s_mean'])} | "
                     f"{_ms(r['eval_s_mean'])} | {_ms(r['wall_s_mean'])} | {r['merge_forward_share']:.1%} | "
                     f"{r['merge_eval_share']:.1%} | {r.get('worker_busy_share', float('nan')):.1%} | {mem} |")
    lines.append("")
    lines.append(f"2 workers / 1 worker: **{d['speedup_2_workers']:.2f}×** trials per second (target ≥ 1.7×).")
    return "\n".join(lines)


def search_efficiency(d: dict) -> str:
    b = d["budget"]
    lines = [f"Reference: {d['grid_recipes']} grid recipes, hypervolume {d['reference_hv']:.4f} (best combined "
             f"{d['grid_best_combined']:+.3f}). {d['seeds']} seeds per sampler, {b} trials per run.", "",
             "| sampler | trials to 95% of the grid's hypervolume (mean) | per seed | hypervolume after "
             f"{b} trials | best combined (mean) | seconds per run |", "|---|---|---|---|---|---|"]
    for s in d["summary"]:
        per = ", ".join(f">{b}" if x is None else str(x) for x in s["per_seed"])
        mean = f"{'≥ ' if s['censored'] else ''}{s['mean_trials_to_95']:.1f}"
        name = f"**{s['sampler']}** (default)" if s["default"] else s["sampler"]
        lines.append(f"| {name} | {mean} | {per} | {s['mean_final_share']:.1%} | {s['mean_best_combined']:+.3f} | "
                     f"{s['mean_seconds']:.0f} |")
    return "\n".join(lines)


def paper_table(d: dict) -> str:
    langs = sorted({k.split("/")[1] for r in d["rows"] for k in r["metrics"] if k.startswith("helpfulness/")})
    head = "| | " + " | ".join(f"help {lg}" for lg in langs) + \
        " | help | harm | over-refusal | unusable | combined | evaluations | validation combined |"
    lines = [head, "|---" * (len(langs) + 8) + "|"]
    setting = None
    order = {k: i for i, k in enumerate(dict.fromkeys(r.get("setting") for r in d["rows"]))}
    for r in sorted(d["rows"], key=lambda r: order[r.get("setting")]):  # each setting's rows together
        m = r["metrics"]
        cells = [f"{m.get(f'helpfulness/{lg}', float('nan')):.2f}" for lg in langs]
        cells += [f"{m['helpfulness']:.3f}", f"{m['harm']:.3f}", f"{m.get('over_refusal', 0.0):.3f}",
                  f"{m.get('unusable', 0.0):.3f}", f"{m['combined']:+.3f}",
                  "-" if r["evaluations"] is None else str(r["evaluations"]),
                  "-" if r["validation_combined"] is None else f"{r['validation_combined']:+.3f}"]
        name = f"{r['row']}: {r['recipe']}" if r["evaluations"] else r["row"]
        if r.get("setting") not in (None, "models") and r.get("setting") != setting:
            setting = r["setting"]
            lines.append(f"| *{setting}* |" + " |" * (len(langs) + 7))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def search_picks(d: dict) -> str:
    g, mix = d["grid"]["test"]["combined"], d["data_mix"]["combined"]
    budgets = sorted({s["budget"] for s in d["summary"]})
    lines = [f"Test split. Best cell of the papers' 25-cell grid: {g:+.3f} (chosen on validation, "
             f"{d['grid']['validation_combined']:+.3f}); data mix: {mix:+.3f}. Each cell: the mean over "
             f"{d['seeds']} seeds of the pick's test combined score, its margin over the grid, and the share of the "
             "grid-to-data-mix gap it closes." + (
                 f" The best of the 25 cells on test itself (which no choice on validation could know) is "
                 f"{d['grid']['test_oracle']['test_combined']:+.3f}." if "test_oracle" in d["grid"] else ""), "",
             "| space | sampler | " + " | ".join(f"after {b} trials" for b in budgets) + " | seconds per run |",
             "|---|---|" + "---|" * len(budgets) + "---|"]
    for space in dict.fromkeys(s["space"] for s in d["summary"]):
        for sampler in dict.fromkeys(s["sampler"] for s in d["summary"] if s["space"] == space):
            by = {s["budget"]: s for s in d["summary"] if s["space"] == space and s["sampler"] == sampler}
            cells = [f"{by[b]['mean_test_combined']:+.3f} ({by[b]['margin_over_grid']:+.3f}; "
                     f"{by[b]['gap_closed']:.0%})" if b in by else "-" for b in budgets]
            secs = max(s["mean_seconds"] for s in by.values())
            label = "layer-wise" if space == "layer" else "per expert"
            lines.append(f"| {label} | {sampler} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


def resume_soak(d: dict) -> str:
    per = (d["soak_s"] - d["baseline_s"]) / max(d["kills"], 1)
    return "\n".join(["| kills | trials lost | trials changed | complete | interrupted run | uninterrupted | lost per kill |",
                      "|---|---|---|---|---|---|---|",
                      f"| {d['kills']} | {len(d['lost'])} | {len(d['changed'])} | {d['complete']}/{d['trials']} | "
                      f"{d['soak_s']:.0f} s | {d['baseline_s']:.0f} s | {per:.1f} s |"])


def scale(d: dict) -> str:
    gib = 2**30
    lines = ["| study | placement | trials | peak PSS, whole process tree | plan | measured / plan (target within 15%) | "
             "merge per candidate | wall |", "|---|---|---|---|---|---|---|---|"]
    for r in d["studies"]:
        lines.append(f"| {r['shape']}: {r['params'] / 1e9:.2f}B x 4 experts, bfloat16, TIES + DARE-TIES, {r['workers']} workers | "
                     f"{r['placement']} | {r['complete']}/{r['trials']} | {r['peak_pss_bytes'] / gib:.2f} GiB | "
                     f"{r['plan_host_bytes'] / gib:.2f} GiB | {r['ratio']:.2f} | {r['merge_s_median']:.2f} s | {r['wall_s']:.0f} s |")
    if d.get("merges"):
        lines += ["", f"Merge per candidate, qwen2-0.5b x 4 experts, one thread (copy bandwidth {d['copy_gbps']:.1f} GB/s; "
                  "bound: the stored base and task vectors read once and the model written once):", "",
                  "| placement | method | per candidate | bound | × bound | first merge | stored |", "|---|---|---|---|---|---|---|"]
        for r in d["merges"]:
            lines.append(f"| {r['placement']} | {r['method']} | {r['seconds']:.2f} s | {r['bound_seconds']:.2f} s | "
                         f"{r['x_bound']:.1f}× | {r['first_seconds']:.1f} s | {r['stored_gib']:.2f} GiB |")
    lines += ["", "Plans only, TIES searched, 4 experts in bfloat16, a node of 8 × 80 GB GPUs with 2 TiB of RAM "
              "(8 workers of 1 GPU, or 2 workers of 4 GPUs):", "",
              "| model | GPUs per worker | placement | per GPU | host, per node | fits |", "|---|---|---|---|---|---|"]
    for r in d["plans"]:
        place = r["placement"] if r["placement"] == r["resolved"] else f"{r['placement']} → {r['resolved']}"
        lines.append(f"| {r['model']} ({r['params'] / 1e9:.1f}B) | {r['gpus_per_worker']} | {place} | {r['gpu_gib']:.1f} GiB | "
                     f"{r['host_gib']:.0f} GiB | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines)


def int8_error(d: dict) -> str:
    v = d["vectors"]
    diffs = d["max_metric_diff"]
    top = sorted(diffs, key=diffs.get, reverse=True)[:3]
    return "\n".join(["| zoo | max \\|error\\| | relative norm of the error (worst tensor) | trials scored both ways | "
                      "largest metric differences | combined |", "|---|---|---|---|---|---|",
                      f"| {d['zoo']} | {v['max_abs']:.1e} | {v['rel_norm']:.2%} ({v['worst_tensor']['rel']:.2%}) | {d['trials']} | "
                      + ", ".join(f"{k} {diffs[k]:.3f}" for k in top) + f" | {diffs['combined']:.3f} |"])


def engine(d: dict) -> str:
    lines = ["| engine | start-up | merge | weight push + read-back check | evaluation | per candidate |",
             "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        push = f"{r['push_s'] * 1000:.0f} ms" if r["engine"] == "vllm" else "-"
        lines.append(f"| {r['engine']} | {r['startup_s']:.1f} s | {r['merge_s'] * 1000:.0f} ms | {push} | "
                     f"{r['eval_s'] * 1000:.0f} ms | {r['candidate_s'] * 1000:.0f} ms |")
    lines += ["", f"hf / vllm per candidate: {d['hf_over_vllm']:.2f}× ({d['rows'][0]['candidates']} candidates each)."]
    return "\n".join(lines)


RENDER: dict[str, Callable] = {"merge_speed": merge_speed, "mergekit_parity": mergekit_parity,
                               "eval_overhead": eval_overhead, "search_overhead": search_overhead,
                               "search_efficiency": search_efficiency, "paper_table": paper_table,
                               "resume_soak": resume_soak, "scale": scale, "int8_error": int8_error,
                               "engine": engine, "search_picks": search_picks}


def _machine(d: object) -> str:
    """The machine a benchmark's JSON records, in one line ("-" when it records none)."""
    m = d.get("machine") if isinstance(d, dict) else None
    if not isinstance(m, dict):
        return "-"
    if "cpu" in m:
        return (f"{m['cpu']}, {m.get('cores', '?')} cores, {m.get('ram_gib', '?')} GiB RAM, "
                f"{'CUDA' if m.get('cuda') else 'no GPU'}, torch {m.get('torch', '?')}")
    return ", ".join(f"{v} {k}" for k, v in m.items() if k in ("cores",)) or "-"


def provenance(text: str, bench_dir: Path) -> str:
    """The provenance table: one row per table on the page, rewritten where its JSON exists."""
    pat = re.compile(r"(<!-- bench:provenance -->)\n(.*?)\n?(<!-- /bench:provenance -->)", re.S)
    found = pat.search(text)
    if not found:
        return text
    kept = {line.split("|")[1].strip(): line for line in found.group(2).splitlines()
            if line.startswith("| ") and not line.startswith("| table ")}
    rows = []
    for name in dict.fromkeys(re.findall(r"<!-- bench:(\w+) -->", text)):
        if name == "provenance":
            continue
        src = bench_dir / f"{name}.json"
        if not src.exists():
            rows.append(kept.get(name, f"| {name} | - | - | - |"))
            continue
        try:
            data = json.loads(src.read_text())
        except ValueError:
            rows.append(kept.get(name, f"| {name} | - | - | - |"))
            continue
        date = data.get("date") if isinstance(data, dict) else None
        date = date or time.strftime("%Y-%m-%d", time.gmtime(src.stat().st_mtime))
        script = Path(__file__).resolve().parent / f"{name}.py"
        command = (f"`{data['command']}`" if isinstance(data, dict) and data.get("command") else
                   f"`bench/{name}.py`" if script.exists() else f"`runs/bench/{name}.json`")
        rows.append(f"| {name} | {command} | {_machine(data)} | {date} |")
    table = "\n".join(["| table | command | machine | measured |", "|---|---|---|---|", *rows])
    return pat.sub(lambda m: f"{m.group(1)}\n{table}\n{m.group(3)}", text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--page", "--readme", dest="page", default="docs/benchmarks.md",
                    help="the page whose bench: markers are rewritten (default docs/benchmarks.md)")
    ap.add_argument("--dir", default="runs/bench")
    args = ap.parse_args()
    path = Path(args.page)
    text = path.read_text()
    for name, render in RENDER.items():
        src = Path(args.dir) / f"{name}.json"
        pat = re.compile(rf"(<!-- bench:{name} -->).*?(<!-- /bench:{name} -->)", re.S)
        if not pat.search(text):
            print(f"{path} has no table for {name}")
            continue
        if not src.exists():
            print(f"{src} missing: the {name} table is kept")
            continue
        table = render(json.loads(src.read_text()))
        text = pat.sub(lambda m, t=table: f"{m.group(1)}\n{t}\n{m.group(2)}", text)
        print(f"{name}: table rewritten from {src}")
    text = provenance(text, Path(args.dir))
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
