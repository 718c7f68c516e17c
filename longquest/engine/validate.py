"""Type checks for config fields, with messages that name the field and what it accepts.

Each raises ValueError: configs come from users (Python, JSONL lines, flags), and a
wrong type there is bad input like a wrong value.
"""

from __future__ import annotations

import dataclasses
import math
import numbers


def plain_numbers(config: object) -> None:
    """Store a frozen dataclass's numeric scalars of other types (numpy's, say) as Python
    ``int`` / ``float``, which the checks, the kernels and JSON expect; bools stay bools."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None or isinstance(value, (bool, int, float)):
            continue
        if isinstance(value, numbers.Integral):
            object.__setattr__(config, field.name, int(value))
        elif isinstance(value, numbers.Real):
            object.__setattr__(config, field.name, float(value))


def check_int(
    value: object,
    *,
    name: str,
    minimum: int | None = None,
    maximum: int | None = None,
    accepts: str,
) -> None:
    """``value`` is an int (not a bool, not a float or string) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be {accepts}, got {value!r} ({type(value).__name__})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {accepts}, got {value}")


def check_float(
    value: object,
    *,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    accepts: str,
) -> None:
    """``value`` is a finite real number (int or float, not a bool or string) within
    ``minimum <= value <= maximum`` and ``value > above``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {accepts}, got {value!r} ({type(value).__name__})")
    if (
        not math.isfinite(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
        or (above is not None and value <= above)
    ):
        raise ValueError(f"{name} must be {accepts}, got {value}")


def check_bool(value: object, *, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def stop_strings(value: object, *, name: str) -> tuple[str, ...] | None:
    """None, a string or a list of non-empty strings, as a tuple (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    elif isinstance(value, (list, tuple)):
        value = tuple(value)
    else:
        raise ValueError(
            f"{name} must be a string or a list of strings, got {value!r} ({type(value).__name__})"
        )
    for stop in value:
        if not isinstance(stop, str) or not stop:
            raise ValueError(
                f"{name} must hold non-empty strings (an empty one would stop at once), "
                f"got {stop!r}"
            )
    return value
