"""On / off environment switches of the runtime settings (``ADL_KEEP_FREED_CPU_MEMORY``,
``ADL_NNPACK_CONVOLUTIONS``): one rule for what counts as off."""
from __future__ import annotations

import os

__all__ = ["switched_off"]


def switched_off(variable: str) -> bool:
    """True when environment ``variable`` says off (``0``, ``false``, ``no`` or ``off``, any case); unset is on."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")
