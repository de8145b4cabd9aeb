"""Typed payloads on the request plane: msgspec structs natively, pydantic models by dump.

Payloads travel as msgpack of builtins. A receiver that knows the type it expects gets a
converter for it once (per endpoint), not a type switch per message.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec


def to_wire(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if dump is not None else obj


def converter_for(tp: Any) -> Callable[[Any], Any] | None:
    """A function turning decoded builtins into ``tp``; None when no conversion is wanted."""
    if tp is None or tp is Any:
        return None
    validate = getattr(tp, "model_validate", None)
    if validate is not None:
        return validate
    return partial(msgspec.convert, type=tp)
