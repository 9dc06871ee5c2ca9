"""Our side of ``anyaccel bench model``, as a worker process (see ``_protocol.py``).

load: ``{"model_dir", "dtype", "threads", "backend"}``; measure builds an :class:`Engine` sized for the
request (so its KV cache is inside the measured memory) and times it with the shared method.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _protocol import measure, serve, set_threads  # noqa: E402

_state: dict = {}


def load(req: dict) -> dict:
    import torch

    torch.set_num_threads(int(req["threads"]))
    import anyaccel
    from anyaccel.models import build_model, parse_dtype
    from anyaccel.plugins.manager import get_registry

    reg = get_registry()
    name = req.get("backend")
    backend = reg.get(name) if name else next(b for b in reg.available())
    dtype = parse_dtype(req["dtype"])
    _state.update(model=build_model(req["model_dir"], backend, dtype), backend=backend)
    return {"version": getattr(anyaccel, "__version__", "?"), "backend": backend.name,
            "threads": torch.get_num_threads()}


def run(req: dict) -> dict:
    import torch

    from anyaccel.models.runner import Engine
    from anyaccel.models.sampling import SamplingParams

    model = _state["model"]
    prompts, n = req["prompts"], int(req["new_tokens"])
    batch, longest = len(prompts), max(len(p) for p in prompts)
    P = model.block_size
    blocks = batch * (-(-(longest + n + 2) // P)) + batch
    engine = Engine(model, num_blocks=blocks, max_num_seqs=max(batch, 1),
                    max_num_batched_tokens=max(batch * longest, 256),
                    prefix_caching=False)  # raw prefill: the warm-up must not turn it into cache hits
    dev = _state["backend"].device
    mod = getattr(torch, dev.type, None) if dev.type != "cpu" else None

    def generate(ps, k):
        return engine.generate(ps, SamplingParams(max_new_tokens=k, ignore_eos=True))

    out = measure(generate, prompts, n, warmup=req.get("warmup", True),
                  sync=(mod.synchronize if mod is not None and hasattr(mod, "synchronize") else None))
    out["kv_cache_bytes"] = int(engine.kv_cache_bytes)
    st = engine.stats  # the last generate (n + 1 tokens): the engine's own split of the steps
    out["engine_prefill_s"], out["engine_decode_s"] = float(st.prefill_seconds), float(st.decode_seconds)
    return out


if __name__ == "__main__":
    set_threads(int(os.environ.get("ANYACCEL_BENCH_THREADS", "0")) or os.cpu_count() or 1)
    serve(load, run)
