"""The memory plan: what a study needs in each tier (GPU, host memory and the object store within it),
per worker and per node, for a placement of the task vectors; which placement `auto` takes; and the
smallest change that makes a plan fit. Pure arithmetic over tensor shapes, so it also answers for
models that are not on this machine (bench/scale.py's 8B and 70B rows).

The per-process constants were measured with bench/scale.py on CPU (torch 2.13, transformers 5,
lm-eval 0.4, Ray 2); the GPU ones (CUDA context, activations) are estimates, marked as such in the
printed plan."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

GIB = 2**30
MIB = 2**20
MARGIN = 0.9  # a plan fits when each tier's need is at most this share of what is free
WORKER_RUNTIME = 700 * MIB  # a worker process: torch, transformers, lm-eval, the tokenizer, the evaluator
DRIVER_RUNTIME = 600 * MIB  # the driver: torch, Optuna, Ray's client
RAY_RUNTIME = 450 * MIB  # Ray's own processes on a node (GCS, raylet, its agents)
CUDA_CONTEXT = 600 * MIB  # per GPU a worker uses (estimate)
ACTIVATIONS = 0.25  # evaluation's activations and caches, as a share of the model's bytes
ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}
DEVICE_BLOCK = 1 << 24
LOADING = "host, loading"  # host memory used only while the driver loads, before any worker starts  # entries per eager merge block on a GPU (methods.fused.DEVICE_CHUNK)


@dataclass(frozen=True)
class ModelSize:
    """What the plan needs to know of a model: its floating-point entries, its largest tensor and its
    number of rows (one int8 scale each)."""

    params: int
    largest: int
    rows: int

    @classmethod
    def from_shapes(cls, shapes: Iterable[tuple[int, ...]]) -> ModelSize:
        shapes = [tuple(s) for s in shapes]
        sizes = [math.prod(s) for s in shapes]
        return cls(params=sum(sizes), largest=max(sizes, default=0), rows=sum(s[0] if s else 1 for s in shapes))

    @classmethod
    def of_checkpoint(cls, ck) -> ModelSize:
        """From a checkpoint's headers: nothing is loaded."""
        return cls.from_shapes(ck.shape(n) for n in ck.names if ck.is_floating(n))


@dataclass(frozen=True)
class Node:
    """What a node offers: free host memory, and its GPUs' free memory (the least free of them)."""

    host_free: int
    gpus: int = 0
    gpu_free: int = 0

    @classmethod
    def measure(cls) -> Node:
        import psutil
        import torch

        host = int(psutil.virtual_memory().available)
        if not torch.cuda.is_available():
            return cls(host)
        free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
        return cls(host, len(free), int(min(free)))


@dataclass(frozen=True)
class Setup:
    """What the plan needs to know of a study."""

    experts: int
    dtype: str = "bfloat16"
    placement: str = "auto"
    workers: int = 1
    gpus_per_worker: int = 0  # 0: CPU workers
    workers_per_gpu: int = 1  # gpus_per_worker below 1 (0.5: two workers share each GPU)
    ties: bool = False  # a method selects magnitude thresholds (TIES working memory)
    ray: bool = True  # Ray's processes and its object store (else one worker in the driver)
    kv_cache: int = 0  # evaluation.engine: vllm: the KV cache each engine reserves

    @classmethod
    def of_space(cls, space, workers: int, *, ray: bool = True, gpus: int | None = None) -> Setup:
        from .methods.task_arithmetic import RANKED_METHODS

        g = space.search.gpus_per_worker
        per = int(math.ceil(g)) if g is not None else (1 if gpus else 0)
        share = int(round(1 / g)) if g is not None and 0 < g < 1 else 1
        from .evaluation.vllm_engine import KV_CACHE_BYTES

        return cls(experts=len(space.models), dtype=space.dtype, placement=space.placement, workers=workers,
                   gpus_per_worker=per, workers_per_gpu=share, ties=bool(RANKED_METHODS.intersection(space.methods)),
                   ray=ray, kv_cache=KV_CACHE_BYTES if space.evaluation.engine == "vllm" else 0)


@dataclass
class Plan:
    setup: Setup
    placement: str  # resolved: device, host or int8
    node: Node
    # (tier, item, bytes per worker, bytes per node); tier: gpu (per GPU of a worker) | host | object store |
    # host, loading
    rows: list[tuple[str, str, float, float]] = field(default_factory=list)

    def need(self, tier: str) -> float:
        """Bytes needed: per GPU for `gpu`; for the node's host memory (the object store included) for
        `host`; in Ray's object store for `object store`."""
        if tier == "gpu":
            return sum(w for t, _, w, _ in self.rows if t == "gpu")
        if tier != "host":
            return sum(n for t, _, _, n in self.rows if t == tier)
        # The driver's tensor in flight is gone before the workers start: the larger of the two phases counts.
        common = sum(n for t, _, w, n in self.rows if t in ("host", "object store") and not w)
        workers = sum(n for t, _, w, n in self.rows if t == "host" and w)
        loading = sum(n for t, _, _, n in self.rows if t == LOADING)
        return common + max(workers, loading)

    def free(self, tier: str) -> float:
        return self.node.gpu_free if tier == "gpu" else self.node.host_free

    def tiers(self) -> list[str]:
        return ["gpu", "host"] if self.setup.gpus_per_worker else ["host"]

    def over(self) -> str | None:
        """The first tier that does not fit, or None."""
        for tier in self.tiers():
            if self.need(tier) > MARGIN * self.free(tier):
                return tier
        return None

    def fits(self) -> bool:
        return self.over() is None

    def table(self) -> list[tuple[str, str, str, str]]:
        out = [(t, item, f"{w / GIB:.2f}" if w else "", f"{n / GIB:.2f}") for t, item, w, n in self.rows]
        for tier in self.tiers():
            label = "per GPU" if tier == "gpu" else "node"
            out.append((tier, f"total ({label}) / free", "", f"{self.need(tier) / GIB:.2f} / {self.free(tier) / GIB:.2f}"))
        return out


def plan(size: ModelSize, setup: Setup, node: Node) -> Plan:
    """The plan of one placement (auto resolved first)."""
    placement = resolve(size, setup, node) if setup.placement == "auto" else setup.placement
    return _plan(size, replace(setup, placement=placement), node)


def resolve(size: ModelSize, setup: Setup, node: Node) -> str:
    """`auto`: the task vectors on each worker's GPU when they fit there, else in host memory. Never
    int8, which changes the weights searched. On a CPU-only node device and host are one tier."""
    if setup.placement != "auto":
        return setup.placement
    if not setup.gpus_per_worker:
        return "device"
    dev = _plan(size, replace(setup, placement="device"), node)
    return "device" if dev.need("gpu") <= MARGIN * node.gpu_free else "host"


def _plan(size: ModelSize, s: Setup, node: Node) -> Plan:
    e, p, big, k = ELEM[s.dtype], size.params, size.largest, s.experts
    out = Plan(setup=s, placement=s.placement, node=node)
    rows = out.rows
    w = s.workers
    taus = k * (size.params + 4 * size.rows) if s.placement == "int8" else k * p * e
    store = "object store" if s.ray else "host"
    # Host memory, once per node: the base and task vectors (mapped by every worker), the driver, Ray.
    rows.append((store, "base (shared by the node's workers)", 0, p * e))
    rows.append((store, f"task vectors, {k} x {'int8 + row scales' if s.placement == 'int8' else s.dtype}", 0, taus))
    rows.append(("host", "driver runtime", 0, DRIVER_RUNTIME))
    rows.append((LOADING, "driver: one tensor in flight (before workers start)", 0, big * (3 * 4 + k * e)))
    if s.ray:
        rows.append(("host", "Ray's processes", 0, RAY_RUNTIME))
    ties = 4 * big if s.ties else 0  # |tau| of the tensor being merged, in float32 (selection runs on a sliver)
    dequant = k * big * e if s.placement == "int8" else 0
    if not s.gpus_per_worker:  # CPU workers: the model and the merge's working memory are host memory
        host_worker = [("worker runtime", WORKER_RUNTIME), (f"model ({s.dtype})", p * e),
                       ("activations (evaluation)", ACTIVATIONS * p * e)]
        if ties:
            host_worker.append(("TIES working memory (float32 |tau| of one tensor)", ties))
        if dequant:
            host_worker.append(("int8 dequantized tensor", dequant))
        if s.kv_cache:
            host_worker.append(("vLLM KV cache", s.kv_cache))
        rows += [("host", f"{item}, per worker", b, w * b) for item, b in host_worker]
        return out
    g = s.gpus_per_worker
    rows.append(("host", "worker runtime, per worker", WORKER_RUNTIME, w * WORKER_RUNTIME))
    gpu = [("CUDA context (estimate)", CUDA_CONTEXT), (f"model ({s.dtype}, 1/{g} per GPU)" if g > 1 else f"model ({s.dtype})", p * e / g),
           ("activations (estimate)", ACTIVATIONS * p * e / g)]
    if s.placement == "device":
        gpu.append((f"base and {k} task vectors (1/{g} per GPU)" if g > 1 else f"base and {k} task vectors", (k + 1) * p * e / g))
    else:  # streamed: the tensor being merged and the next one, each with the base and every task vector
        gpu.append(("streaming: two tensors' base and task vectors", 2 * (k + 1) * big * e))
    gpu.append(("merge temporaries", 4 * min(big, DEVICE_BLOCK) * (k + 4)))
    if s.kv_cache:
        gpu.append(("vLLM KV cache", s.kv_cache))
    if ties:
        gpu.append(("TIES working memory (float32 |tau| of one tensor)", ties))
    share = s.workers_per_gpu  # workers sharing one GPU: the per-GPU need is theirs together
    rows += [("gpu", item + (f" x {share} workers" if share > 1 else ""), share * b, w * g * b) for item, b in gpu]
    return out


def suggestion(size: ModelSize, setup: Setup, node: Node) -> str | None:
    """The smallest change that makes the plan fit: fewer workers, host placement, int8, more GPUs per
    worker, bfloat16; None when one of them alone does not."""
    tries: list[tuple[str, Setup]] = []
    for n in range(setup.workers - 1, 0, -1):
        tries.append((f"--workers {n}", replace(setup, workers=n)))
    if setup.gpus_per_worker and setup.placement in ("auto", "device"):
        tries.append(("placement: host", replace(setup, placement="host")))
    if setup.placement != "int8":
        tries.append(("placement: int8", replace(setup, placement="int8")))
    if setup.gpus_per_worker:
        for g in (2 * setup.gpus_per_worker, 4 * setup.gpus_per_worker):
            if not node.gpus or g <= node.gpus:
                tries.append((f"search.gpus_per_worker: {g}", replace(setup, gpus_per_worker=g)))
    if setup.dtype == "float32":
        tries.append(("dtype: bfloat16", replace(setup, dtype="bfloat16")))
    for label, s in tries:
        if plan(size, s, node).fits():
            return label
    return None


def refusal(name: str, size: ModelSize, setup: Setup, node: Node) -> str | None:
    """One line naming the tier that does not fit, the GiB needed and free, and the change that fits."""
    p = plan(size, setup, node)
    tier = p.over()
    if tier is None:
        return None
    need, free = p.need(tier) / GIB, p.free(tier) / GIB
    fix = suggestion(size, setup, node)
    where = "each worker's GPU" if tier == "gpu" else "this node's host memory"
    big = max((r for r in p.rows if (r[0] == "gpu") == (tier == "gpu")), key=lambda r: r[2] if tier == "gpu" else r[3])
    return (f"{name}: placement {p.placement}, {setup.workers} worker(s): {where} needs {need:.1f} GiB (largest part: {big[1]}), more than "
            f"{MARGIN:.0%} of the {free:.1f} GiB free; "
            + (f"use {fix}" if fix else "no single change fits: use a larger machine")
            + " (optimize --dry-run prints the plan)")
