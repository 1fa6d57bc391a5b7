"""The trial worker: holds the base, the task vectors, a resident model, the lm-eval wrapper and the
loaded tasks; merges each candidate into the model's own buffers and evaluates it.

A plain class, so it runs in-process (tests, one worker) and as a Ray actor (`ray.remote(TrialWorker)`)
alike. Task vectors can arrive through Ray's object store as numpy arrays, which the actors of a node
map from shared memory instead of each holding a copy."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from . import faults, tensor_store
from ._env import quiet_libraries
from .result import TrialResult


def load_resident(space, *, device: str = "cpu", placement: str = "device", allow_pickle: bool = False,
                  trust_remote_code: bool = False):
    """Open and check the space's models; return (base checkpoint, ResidentMerger holding them in the
    placement's tier)."""
    from .merge import TORCH_DTYPES, ResidentMerger, open_models

    recipe = space.recipe(space.baselines()[0] if space.distributions() else {}, 0)
    base, experts = open_models(recipe, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return base, ResidentMerger(base, experts, dtype=TORCH_DTYPES[space.dtype], device=device, placement=placement)


def shared_entries(space, *, allow_pickle: bool = False, trust_remote_code: bool = False):
    """(base checkpoint, payloads): each tensor's base and stored task vectors, packed for the object
    store one tensor at a time, so whoever puts them there never holds a second full copy."""
    from .merge import TORCH_DTYPES, open_models

    recipe = space.recipe(space.baselines()[0] if space.distributions() else {}, 0)
    base, experts = open_models(recipe, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    entries = tensor_store.task_vectors(base, experts, TORCH_DTYPES[space.dtype], int8=space.placement == "int8")
    return base, (tensor_store.pack(*e) for e in entries)


def worker_placement(space, base_ck, device: str, gpus: int) -> str:
    """`auto` resolved on the worker's own node (device or host: the same bits either way)."""
    from .memory_plan import ModelSize, Node, Setup, resolve

    if space.placement != "auto" or torch.device(device).type != "cuda":
        return "device" if space.placement == "auto" else space.placement
    setup = Setup.of_space(space, 1, gpus=gpus)
    return resolve(ModelSize.of_checkpoint(base_ck), setup, Node.measure())


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
        from .merge import TORCH_DTYPES, ResidentMerger, open_models
        from .space import Space

        t0 = time.perf_counter()
        self.worker_id = worker_id
        self.space = Space.model_validate(space_data)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.shared_bytes = {"mapped": 0, "copied": 0}  # the node's shared tensors: mapped, or copied here
        self.shared_backing: str | None = None  # the shared-memory file and offset they are mapped from
        dtype = TORCH_DTYPES[self.space.dtype]
        gpus = torch.cuda.device_count() if torch.device(self.device).type == "cuda" else 0
        recipe = self.space.recipe(self.space.baselines()[0] if self.space.distributions() else {}, 0)
        if shared is not None:
            import ray

            payloads = ray.get(shared[0])  # [[ObjectRef, ...]]: nested, so Ray hands the references over unresolved
            arrays = [a for p in payloads for a in tensor_store.arrays(p)]
            self.shared_bytes["mapped"] = sum(a.nbytes for a in arrays if not a.flags.writeable)
            self.shared_bytes["copied"] = sum(a.nbytes for a in arrays if a.flags.writeable)
            self.shared_backing = _backing(arrays[0]) if arrays else None
            base_ck, _ = open_models(recipe, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            self.placement = worker_placement(self.space, base_ck, self.device, gpus)
            entries = [tensor_store.unpack(p) for p in payloads]
            if self.placement == "device" and torch.device(self.device).type != "cpu":
                self.shared_bytes = {"mapped": 0, "copied": sum(self.shared_bytes.values())}  # one device copy each
                entries = [(n, b.to(self.device), [t.to(self.device) for t in ts]) for n, b, ts in entries]
            elif torch.device(self.device).type == "cuda":
                for _, b, ts in entries:
                    for t in (b, *ts):
                        for part in ((t.q, t.scale) if isinstance(t, tensor_store.Int8Rows) else (t,)):
                            tensor_store.pin(part)
            self.merger = ResidentMerger.from_entries(entries, base_ck.num_layers, dtype, self.device,
                                                      experts=len(self.space.models))
        else:
            base_ck, _ = open_models(recipe, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            self.placement = worker_placement(self.space, base_ck, self.device, gpus)
            base_ck, self.merger = load_resident(self.space, device=self.device, placement=self.placement,
                                                 allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        self.engine = None
        if self.space.evaluation.engine == "vllm":  # the engine holds the evaluated weights; no HF model
            from .evaluation.vllm_engine import VllmEngine

            self.model = None
            self.engine = VllmEngine(base_ck.path, dtype=self.space.dtype, tensor_parallel_size=max(1, gpus))
        else:
            # The resident model in the study's dtype; several GPUs per worker: sharded by accelerate's device
            # map, and each tensor merged on its layer's GPU (the merger fetches to the buffer's device).
            sharded = gpus > 1
            self.model = AutoModelForCausalLM.from_pretrained(base_ck.path, dtype=dtype,
                                                              use_safetensors=None if allow_pickle else True,
                                                              trust_remote_code=trust_remote_code,
                                                              **({"device_map": "auto"} if sharded else {}))
            if not sharded:
                self.model.to(self.device)
            self.model.eval()
        self.tok = AutoTokenizer.from_pretrained(base_ck.path, trust_remote_code=trust_remote_code)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.evaluator = Evaluator(self.model, self.tok, resolve_assets(self.space.evaluation, split), device=self.device,
                                   engine=self.engine)
        self.forward_s = 0.0
        if self.model is not None:
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
                "startup_s": self.startup_s, "shared_bytes": dict(self.shared_bytes), "shared_backing": self.shared_backing,
                "placement": self.placement, "dtype": self.space.dtype}

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
        if self.engine is not None:  # streamed into the running engine, then read back and compared
            self.engine.verify(self.engine.push(self.merger.merged(recipe)))
        else:
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
