"""The fused small ops' former home: re-exports ``core.norm``, ``core.rotary`` and ``core.activation``.

The three op families live in one file each (see docs/op-contracts.md); this module keeps
``from anyaccel.core.fused import ...`` working and defines nothing itself.
"""
from .activation import *  # noqa: F401,F403
from .activation import __all__ as _activation_all
from .norm import *  # noqa: F401,F403
from .norm import __all__ as _norm_all
from .rotary import *  # noqa: F401,F403
from .rotary import __all__ as _rotary_all

__all__ = [*_norm_all, *_rotary_all, *_activation_all]
