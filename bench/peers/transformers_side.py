"""Hugging Face transformers' eager ``generate`` as a side of ``anyaccel bench model`` (see ``_protocol.py``)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _protocol import measure, serve, set_threads  # noqa: E402

_state: dict = {}


def load(req: dict) -> dict:
    import torch

    torch.set_num_threads(int(req["threads"]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[req["dtype"]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=dtype, attn_implementation="sdpa")
    _state["hf"] = hf.eval()
    return {"version": transformers.__version__, "threads": torch.get_num_threads()}


def run(req: dict) -> dict:
    import torch

    hf = _state["hf"]

    def generate(ps, k):
        ids = torch.tensor(ps, dtype=torch.long)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                              do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    return measure(generate, req["prompts"], int(req["new_tokens"]), warmup=req.get("warmup", True))


if __name__ == "__main__":
    set_threads(int(os.environ.get("ANYACCEL_BENCH_THREADS", "0")) or os.cpu_count() or 1)
    serve(load, run)
