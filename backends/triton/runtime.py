"""One kernel source, two ways to run it: compiled for a GPU, or executed by Triton's interpreter on CPU tensors.

Kernels in this package are written as *plain* Python functions in Triton's language (no decorator).
:func:`compile_kernel` turns one into

- a ``triton.runtime.jit.JITFunction`` (what ``@triton.jit`` makes when ``TRITON_INTERPRET`` is unset): the
  cuda and rocm backends launch these on the GPU;
- a ``triton.runtime.interpreter.InterpretedFunction`` (what ``@triton.jit`` makes under ``TRITON_INTERPRET=1``):
  the ``triton-interpreter`` backend launches these on CPU tensors.

Both are built explicitly, so the choice never depends on the environment variable, and both tiers can live in
one process: the GPU path stays compiled while the interpreter runs the very same source.

Triton's standard library (``tl.max``, ``tl.sum``, ``tl.zeros``, ``tl.sigmoid``...) is itself made of
``@triton.jit`` functions, decorated when triton was imported. Without ``TRITON_INTERPRET=1`` those are compiled
functions, which the interpreter cannot call; :func:`_interpreted_stdlib` swaps them for interpreted twins for
the duration of one interpreted launch (the interpreter patches ``triton.language`` the same way while a
launch runs) and puts the originals back. The reduction helpers the interpreter recognises by identity
(``_elementwise_max``, ``_sum_combine``...) are private and left alone, so reductions keep its fast path.

Kernel-writing rules that keep both tiers correct:

- no calls from one of our kernels to another of our functions (inline helpers): the interpreter resolves a
  callee through the module's globals, where only the plain function lives;
- upcast every loaded floating tile with ``.to(tl.float32)`` before arithmetic (the interpreter computes
  bfloat16 arithmetic wrongly; the GPU loses nothing); a ``DOT_UPCAST`` constexpr decides whether ``tl.dot``
  operands are upcast too (interpreter: yes; GPU: no, tensor cores take 16-bit operands);
- call standard-library functions through the module (``tl.max(x, axis=1)``), not as tensor methods.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Dict, Iterator, List, Tuple

import triton
import triton.language as tl
import numpy as np
import torch
from triton.runtime import interpreter as _interp
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

__all__ = ["Launchable", "compile_kernel", "next_power_of_2", "cdiv"]

# Launch options the interpreter does not take; a GPU launch passes them through.
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "waves_per_eu", "matrix_instr_nonkdim", "kpack", "num_ctas")

_CACHE: Dict[Tuple[Callable, bool], "Launchable"] = {}
_STDLIB_TWINS: Dict[Callable, InterpretedFunction] = {}
_LOCK = threading.RLock()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


_SLOW_DOT = _interp.InterpreterBuilder.create_dot


def _blas_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """``tl.dot`` of float32 tiles through torch's BLAS: the interpreter's own ``np.matmul(..., dtype=...)`` takes
    numpy's non-BLAS loop (about 100 MFLOP/s), and numpy's OpenBLAS fights torch's threads once torch has run,
    which made a 4096-wide GEMM cost seconds. Same float32 accumulation."""
    if a.data.dtype == np.float32 and b.data.dtype == np.float32 and d.data.dtype == np.float32:
        acc = torch.from_numpy(np.array(d.data, dtype=np.float32, copy=True))
        acc.addmm_(torch.from_numpy(np.ascontiguousarray(a.data)), torch.from_numpy(np.ascontiguousarray(b.data)))
        return _interp.TensorHandle(acc.numpy(), d.dtype.scalar)
    return _SLOW_DOT(self, a, b, d, input_precision, max_num_imprecise_acc)


_TRUNC_CAST = _interp.InterpreterBuilder.cast_impl


def _rne_cast(self, src, dst_type):
    """float32 -> bfloat16 rounded to nearest even, as a GPU's conversion does: the interpreter's own cast drops
    the low 16 bits (truncation, up to one bfloat16 ulp of error where the contract allows half an ulp), which the
    conformance bounds catch. Every other cast is the interpreter's."""
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        bits = f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return _interp.TensorHandle(bits, dst_type.scalar)
    return _TRUNC_CAST(self, src, dst_type)


def _patched_objects() -> List[object]:
    """Everything Triton's interpreter patches while it runs a kernel (``_patch_lang``), for a full restore."""
    # Not triton.language.standard: the interpreter adds its helpers to the globals of the stdlib functions it
    # rewrites (and caches the rewritten functions), so those additions must stay.
    objs: List[object] = [tl, tl.core, tl.math, tl.tensor, tl.dtype, tl.condition]
    for owner, name in ((tl.core, "tensor_descriptor_base"), (tl.core, "math")):
        extra = getattr(owner, name, None)
        if extra is not None and extra not in objs:
            objs.append(extra)
    return objs


@contextlib.contextmanager
def _interpreted_stdlib() -> Iterator[None]:
    """For one interpreted launch: interpreted twins of the compiled standard-library functions, float32
    ``tl.dot`` through torch's BLAS, float32 -> bfloat16 casts rounded to nearest even, one torch thread; and afterwards every attribute of ``triton.language`` put
    back as it was.

    The full restore matters: an interpreted function called from a kernel (a stdlib twin) patches
    ``triton.language.core`` through its own module's globals and never undoes it, which would break the next
    GPU compile in this process.
    """
    snapshot = [(obj, dict(vars(obj))) for obj in _patched_objects()]
    create_dot = _interp.InterpreterBuilder.create_dot
    cast_impl = _interp.InterpreterBuilder.cast_impl
    threads = torch.get_num_threads()
    try:
        for owner in (tl, tl.tensor):
            for name, member in list(vars(owner).items()):
                if isinstance(member, JITFunction):
                    twin = _STDLIB_TWINS.get(member.fn)
                    if twin is None:
                        twin = _STDLIB_TWINS[member.fn] = InterpretedFunction(member.fn)
                    setattr(owner, name, twin)
        _interp.InterpreterBuilder.create_dot = _blas_dot
        _interp.InterpreterBuilder.cast_impl = _rne_cast
        # tiles are small: one BLAS thread beats a pool that must wake (and, on a busy machine, wait) per tile
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(threads)
        _interp.InterpreterBuilder.create_dot = create_dot
        _interp.InterpreterBuilder.cast_impl = cast_impl
        for obj, before in snapshot:
            now = vars(obj)
            for name in [n for n in now if n not in before]:
                delattr(obj, name)
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    setattr(obj, name, value)


_MISSING = object()


class Launchable:
    """A kernel ready to launch: ``k[grid](*args, CONST=..., num_warps=...)`` on either tier.

    :param fn: the plain kernel function.
    :param interpret: run it through Triton's interpreter (CPU tensors) instead of compiling it.
    """

    __slots__ = ("fn", "interpret", "_impl")

    def __init__(self, fn: Callable, interpret: bool) -> None:
        self.fn = fn
        self.interpret = interpret
        self._impl = InterpretedFunction(fn) if interpret else JITFunction(fn)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        impl = self._impl[grid]
        if not self.interpret:
            return impl

        def launch(*args: Any, **kwargs: Any) -> Any:
            for name in _LAUNCH_OPTIONS:
                kwargs.pop(name, None)
            with _LOCK, _interpreted_stdlib():
                return impl(*args, **kwargs)

        return launch

    def __repr__(self) -> str:
        return f"Launchable({self.fn.__name__}, {'interpreted' if self.interpret else 'jit'})"


def compile_kernel(fn: Callable, interpret: bool) -> Launchable:
    """The launchable form of ``fn`` for one tier, built once per (function, tier)."""
    key = (fn, bool(interpret))
    k = _CACHE.get(key)
    if k is None:
        k = _CACHE[key] = Launchable(fn, bool(interpret))
    return k


# ``triton`` is imported above so that a missing install fails here, with the import error, not mid-launch.
_ = triton
