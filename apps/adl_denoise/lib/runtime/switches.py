"""On / off words: one parser for the booleans of requests (``store_to_pacs``, ``calibrate_noise_level``), of the
server's ``--conf`` (``preload``) and of the environment switches of the runtime settings
(``ADL_KEEP_FREED_CPU_MEMORY``, ``ADL_NNPACK_CONVOLUTIONS``), with one word list: the classic ``strtobool`` one."""
from __future__ import annotations

import os

__all__ = ["TRUE_WORDS", "FALSE_WORDS", "BOOLEAN_WORDS", "parse_bool", "switched_off"]

#: the words read as true and as false (any case, surrounding spaces ignored)
TRUE_WORDS = ("y", "yes", "t", "true", "on", "1")
FALSE_WORDS = ("n", "no", "f", "false", "off", "0")
#: the accepted words, as messages list them
BOOLEAN_WORDS = f"{', '.join(TRUE_WORDS)} / {', '.join(FALSE_WORDS)}"


def parse_bool(value: object, name: str) -> bool:
    """``value`` as a boolean: a bool as it is, one of :data:`TRUE_WORDS` / :data:`FALSE_WORDS` (any case,
    surrounding spaces ignored), or the number 1 / 0 (a JSON request's 1 is the word ``1``).

    Raises:
        ValueError: anything else (an empty string, 2, a list, ``maybe``), naming ``name``, the value and the
            accepted words.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"{name} must be true or false ({BOOLEAN_WORDS}, any case), got {value!r}")


def switched_off(variable: str) -> bool:
    """True when environment ``variable`` is one of :data:`FALSE_WORDS`; unset, or any other value, is on."""
    return os.environ.get(variable, "1").strip().lower() in FALSE_WORDS
