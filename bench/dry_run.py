"""How long `optimize --dry-run` takes to find each class of bad input on the test zoo, against the
interpreter's start-up with the libraries every check needs imported (torch, transformers, optuna: the
floor any such command pays). Each case is a fresh process, as a user runs it.

    python bench/dry_run.py        # writes runs/bench/dry_run.json
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import machine, machine_line, write_json

from mergeopt.space import SPACES_DIR
from mergeopt.zoo import build_zoo


def _space(zoo: Path) -> dict:
    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    data.update(name="dry", base_model=str(zoo / "models" / "base"))
    for m in data["models"]:
        m["path"] = str(zoo / "models" / m["path"].split(":")[1])
    data["evaluation"]["zoo"] = "test"
    return data


def cases(zoo: Path, tmp: Path) -> dict[str, tuple[dict, Path]]:
    run = tmp / "run"
    out: dict[str, tuple[dict, Path]] = {"valid (every check passes)": (_space(zoo), run)}
    d = _space(zoo)
    d["models"][0]["path"] = str(tmp / "nowhere")
    out["missing expert folder"] = (d, run)
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    d = _space(zoo)
    d["models"][1]["path"] = str(adapter)
    out["LoRA adapter folder"] = (d, run)
    vocab = tmp / "vocab"
    shutil.copytree(zoo / "models" / "help_fr", vocab)
    cfg = json.loads((vocab / "config.json").read_text())
    cfg["vocab_size"] += 8
    (vocab / "config.json").write_text(json.dumps(cfg))
    d = _space(zoo)
    d["models"][1]["path"] = str(vocab)
    out["resized vocabulary"] = (d, run)
    d = _space(zoo)
    d["evaluation"] = {"include_path": str(zoo / "eval" / "lm_eval"), "chat_template": "{prompt}",
                       "validation": {"tasks": {"en": "zoo_help_en_valid"}}}
    out["unknown lm-eval task"] = (d, run)
    prompts = tmp / "h.jsonl"
    prompts.write_text('{"prompt": "how to x", "answer": "x"}\n')
    d = _space(zoo)
    d["evaluation"] = {"validation": {"harmful": {"de": str(prompts)}}, "chat_template": "{prompt}"}
    out["prompts without judge phrases"] = (d, run)
    out["run folder that cannot be made"] = (_space(zoo), Path("/proc/mergeopt-run"))
    return out


def main() -> None:
    zoo = build_zoo("test", seed=0, progress=False)
    floor = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, transformers, optuna"], check=True)
        floor.append(time.perf_counter() - t)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for name, (data, run) in cases(zoo, tmp).items():
            space = tmp / "space.yaml"
            space.write_text(yaml.safe_dump(data))
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(space), "--run-dir",
                                str(run), "--dry-run", "--quiet"], capture_output=True, text=True)
            s = time.perf_counter() - t
            line = (r.stderr.strip().splitlines() or ["(passed)"])[-1]
            rows.append({"case": name, "seconds": round(s, 2), "status": r.returncode, "line": line[:160],
                         "wrote_run_folder": run.exists() and run != Path("/proc/mergeopt-run")})
    base = min(floor)
    m = machine()
    print(machine_line(m))
    print(f"floor: python -c 'import torch, transformers, optuna' {base:.2f} s")
    for row in rows:
        print(f"{row['case']:34s} {row['seconds']:6.2f} s ({row['seconds'] / base:4.1f}x the floor), exit {row['status']}: "
              f"{row['line'][:100]}")
    write_json("runs/bench/dry_run.json", {"machine": m, "floor_s": round(base, 2), "cases": rows})


if __name__ == "__main__":
    main()
