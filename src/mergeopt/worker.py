"""The trial worker: holds the base, the task vectors, a resident model, the lm-eval wrapper and the
loaded tasks; merges each candidate into the model's own buffers and evaluates it.

A plain class, so it runs in-process (tests, one worker) and as a Ray actor (`ray.remote(TrialWorker)`)
alike. Task vectors can arrive through Ray's object store as numpy arrays, which the actors of a node
map from shared memory instead of each holding a copy."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import numpy as np
import torch

from . import faults
from ._env import quiet_libraries
from .result import TrialResult


def pack_tensors(base: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Base and task vectors as numpy arrays, for one `ray.put` shared by every actor of a node."""
    def np_of(t: torch.Tensor) -> np.ndarray:
        return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()

    return {"base": {k: np_of(v) for k, v in base.items()}, "taus": [{k: np_of(v) for k, v in t.items()} for t in taus],
            "dtypes": {k: str(v.dtype) for k, v in base.items()}}


def unpack_tensors(payload: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    def t_of(a: np.ndarray, dtype: str) -> torch.Tensor:
        with warnings.catch_warnings():  # shared-memory arrays are read-only; merges never write to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
        return t.view(torch.bfloat16) if dtype == "torch.bfloat16" else t

    dt = payload["dtypes"]
    base = {k: t_of(v, dt[k]) for k, v in payload["base"].items()}
    taus = [{k: t_of(v, dt[k]) for k, v in t.items()} for t in payload["taus"]]
    return base, taus


def load_resident(space, *, device: str = "cpu", allow_pickle: bool = False, trust_remote_code: bool = False):
    """Open and check the space's models; return (base checkpoint, ResidentMerger on `device`)."""
    from .merge import ResidentMerger, open_models

    recipe = space.recipe(space.baselines()[0] if space.distributions() else {}, 0)
    base, experts = open_models(recipe, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    dtype = torch.bfloat16 if space.dtype == "bfloat16" else torch.float32
    return base, ResidentMerger(base, experts, dtype=dtype, device=device)


def time_forward(model: torch.nn.Module, sink: Any, attr: str = "forward_s") -> None:
    """Accumulate the wall time of the model's forward passes into `sink.<attr>`: what the evaluation
    spends in the model itself, against everything around it. On a GPU each pass is waited for, so its
    time is the kernels' and not only their launch."""
    inner = model.forward
    sync = torch.cuda.synchronize if next(model.parameters()).device.type == "cuda" else None

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            out = inner(*args, **kwargs)
            if sync is not None:
                sync()
            return out
        finally:
            setattr(sink, attr, getattr(sink, attr) + time.perf_counter() - t)

    model.forward = timed


class TrialWorker:
    def __init__(self, space_data: dict, shared: Any = None, *, split: str = "validation", threads: int = 1,
                 device: str | None = None, worker_id: int = 0, allow_pickle: bool = False,
                 trust_remote_code: bool = False):
        quiet_libraries()
        faults.point("startup")
        torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .evaluation.assets import resolve_assets
        from .evaluation.evaluator import Evaluator
        from .merge import ResidentMerger, open_models
        from .space import Space

        t0 = time.perf_counter()
        self.worker_id = worker_id
        self.space = Space.model_validate(space_data)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.shared_bytes = {"mapped": 0, "copied": 0}  # the node's shared tensors: mapped, or copied here
        self.shared_backing: str | None = None  # the shared-memory file and offset they are mapped from
        if shared is not None:
            if isinstance(shared, list):  # [ObjectRef]: nested, so Ray hands the reference over unresolved
                import ray

                shared = ray.get(shared[0])
            base_t, taus = unpack_tensors(shared)
            arrays = [*shared["base"].values(), *(a for t in shared["taus"] for a in t.values())]
            self.shared_bytes["mapped"] = sum(a.nbytes for a in arrays if not a.flags.writeable)
            self.shared_bytes["copied"] = sum(a.nbytes for a in arrays if a.flags.writeable)
            self.shared_backing = _backing(arrays[0]) if arrays else None
            recipe = self.space.recipe(self.space.baselines()[0], 0)
            base_ck, _ = open_models(recipe, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            if self.device != "cpu":
                self.shared_bytes = {"mapped": 0, "copied": sum(self.shared_bytes.values())}  # one device copy each
                base_t = {k: v.to(self.device) for k, v in base_t.items()}
                taus = [{k: v.to(self.device) for k, v in t.items()} for t in taus]
            self.merger = ResidentMerger.from_tensors(base_t, taus, base_ck.num_layers)
        else:
            base_ck, self.merger = load_resident(self.space, device=self.device, allow_pickle=allow_pickle,
                                                 trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(base_ck.path, dtype=torch.float32,
                                                          use_safetensors=None if allow_pickle else True,
                                                          trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self.tok = AutoTokenizer.from_pretrained(base_ck.path, trust_remote_code=trust_remote_code)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.evaluator = Evaluator(self.model, self.tok, resolve_assets(self.space.evaluation, split), device=self.device)
        self.forward_s = 0.0
        time_forward(self.model, self)
        self.node = _node_id()
        self.startup_s = time.perf_counter() - t0

    def prepare(self) -> dict[str, Any]:
        """Build what every candidate's evaluation reuses (lm-eval's requests, the encoded prompts),
        so no trial carries one-off costs; then report as `info`."""
        t0 = time.perf_counter()
        self.evaluator.prepare(self.stages())
        self.startup_s += time.perf_counter() - t0
        return self.info()

    def info(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "pid": os.getpid(), "node": self.node, "device": self.device,
                "startup_s": self.startup_s, "shared_bytes": dict(self.shared_bytes), "shared_backing": self.shared_backing}

    def stages(self) -> list[str]:
        """The evaluation stages of a trial: the subset then the rest when a pruner may stop a candidate
        after the subset; else everything in one pass."""
        if self.evaluator.multi_fidelity and self.space.search.pruner != "none":
            return ["subset", "rest"]
        return ["full"]

    def run(self, params: dict[str, Any], seed: int, prune_below: float | None = None, *,
            trial: int | None = None) -> TrialResult:
        """Merge the candidate and evaluate it. With multi-fidelity and a pruner, the subset is scored
        first and the candidate stops there when its combined score is below `prune_below`. Without a
        pruner nothing would read the subset's score, so everything is scored in one pass (the same
        metrics, exactly: the stages partition the sets)."""
        from .evaluation.evaluator import MetricError
        from .objectives import combined_score

        t0 = time.perf_counter()
        self.forward_s = 0.0
        faults.set_trial(trial)
        out = TrialResult(state="fail", worker=self.worker_id, pid=os.getpid(), node=self.node)
        recipe = self.space.recipe(params, seed)
        faults.point("merge")
        self.merger.merge_into(self.model, recipe)
        if torch.device(self.device).type == "cuda":  # the merge's kernels, not only their launch
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        out.merge_s = t1 - t0
        try:
            ev = self.evaluator
            if self.stages() != ["full"]:
                first = ev.run("subset")
                sub = ev.summarize(first)
                sub["combined"] = combined_score(self.space, sub)
                out.subset = sub
                if prune_below is not None and sub["combined"] < prune_below:
                    out.state, out.eval_s, out.forward_s = "pruned", time.perf_counter() - t1, self.forward_s
                    return out
                part = first + ev.run("rest")
            else:
                part = ev.run("full")
            metrics = ev.summarize(part)
        except MetricError as e:
            out.reason, out.eval_s, out.forward_s = str(e), time.perf_counter() - t1, self.forward_s
            return out
        metrics["combined"] = combined_score(self.space, metrics)
        out.state, out.metrics = "complete", metrics
        out.eval_s, out.forward_s = time.perf_counter() - t1, self.forward_s
        return out


def _node_id() -> str:
    """The Ray node this process runs on; "" outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside an actor there is no node to name
        return ""


def _backing(array: np.ndarray) -> str | None:
    """Where an array's memory comes from: the mapped file (device:inode) and the offset in it, from
    /proc/self/maps. Two processes that report the same value share one physical copy."""
    addr = array.__array_interface__["data"][0]
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= addr < end:
            dev, inode = fields[3], fields[4]
            return None if inode == "0" else f"{dev}:{inode}+{int(fields[2], 16) + addr - start}"
    return None
