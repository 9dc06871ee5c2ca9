"""What a backend is, as the core sees it: a name, a device, a KV-cache layout, a collective transport and a
list of kernels. Plugins describe backends with :class:`BackendDef`; the plugin manager turns each into a
:class:`Backend` with its provenance, availability and the kernels every plugin contributed to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .dispatch import KernelImpl

__all__ = ["KV_LAYOUTS", "BackendDef", "Backend"]

#: ``NHD``: caches are [num_blocks, block_size, num_kv_heads, head_size];
#: ``HND``: caches are [num_blocks, num_kv_heads, block_size, head_size].
KV_LAYOUTS = ("NHD", "HND")


def _always_available() -> Optional[str]:
    return None


@dataclass(frozen=True)
class BackendDef:
    """A backend as a plugin declares it (returned from the ``anyaccel_backends`` hook).

    :param name: unique short name used on the command line (``--backend NAME``).
    :param vendor: who makes the hardware or maintains the backend.
    :param device_type: the torch device type its tensors live on (``"cpu"``, ``"cuda"``, ...).
    :param detect: ``detect() -> None`` when usable here, else a sentence saying why not. Called once, guarded.
    :param kv_cache_layout: one of :data:`KV_LAYOUTS`.
    :param distributed_backend: the torch.distributed backend name its Communicator uses (``"gloo"``...).
    :param block_sizes: KV-cache block sizes this backend's attention accepts, preferred first.
    :param describe: ``describe() -> dict`` of facts for reports (tuning chosen, device name, ...), called once
        when the backend is available.
    :param max_model_parameters: the largest model (in parameters) this backend is meant to run, or ``None`` for
        no declared limit. A slow tier (an interpreter, a simulator) declares one; the conformance suite then
        reports larger models as unsupported with that reason instead of running them for hours.

    .. versionadded:: 1.1 ``max_model_parameters``
    """

    name: str
    vendor: str
    device_type: str
    detect: Callable[[], Optional[str]] = _always_available
    kv_cache_layout: str = "NHD"
    distributed_backend: Optional[str] = None
    block_sizes: Tuple[int, ...] = (16,)
    description: str = ""
    describe: Optional[Callable[[], Dict[str, object]]] = None
    max_model_parameters: Optional[int] = None


@dataclass(frozen=True)
class Backend:
    """A discovered backend: its definition, where it came from, whether it runs here, and its kernels."""

    definition: BackendDef
    package: str = ""
    version: str = ""
    api_version: int = 0
    available: bool = True
    reason: str = ""
    kernels: Tuple[KernelImpl, ...] = ()
    properties: Dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def vendor(self) -> str:
        return self.definition.vendor

    @property
    def device(self) -> torch.device:
        return torch.device(self.definition.device_type)

    @property
    def kv_cache_layout(self) -> str:
        return self.definition.kv_cache_layout

    @property
    def block_sizes(self) -> Tuple[int, ...]:
        return self.definition.block_sizes

    def kernels_for(self, op: str) -> List[KernelImpl]:
        return [k for k in self.kernels if k.op == op]

    @property
    def ops(self) -> List[str]:
        """The ops this backend has at least one kernel for (the rest fall back to the core)."""
        return sorted({k.op for k in self.kernels})

    @classmethod
    def local(cls, definition: BackendDef, kernels: List[KernelImpl], package: str = "local") -> "Backend":
        """A backend built directly, without plugin discovery (tests, notebooks)."""
        from .version import API_VERSION

        reason = definition.detect() or ""
        return cls(definition, package=package, version="", api_version=API_VERSION, available=not reason,
                   reason=reason, kernels=tuple(kernels))
