"""A setting's rule: what one setting of the schema (``gaf.config``) may hold, said in words for
error messages, and ``setting(...)``, the schema field that carries it.

Pure Python, no gaf module: ``gaf.config`` builds every field with ``setting`` and ``validate``
checks each value against its ``Rule``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    """What one setting may hold. ``kind``: int | float | bool | choice | path | text | pair
    | device; ``low``/``high`` bound numbers (``open_low``/``open_high`` exclude the bound);
    ``optional``: None (null) is allowed too; ``applies``: the condition (a key of ``gaf.config.APPLIES``)
    under which the setting has any effect: set where it has none, it is an error."""

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple = ()
    optional: bool = False
    applies: str | None = None  # a key of gaf.config.APPLIES: when the setting has an effect (None: always)

    def allowed(self) -> str:
        """The allowed values in words, for error messages."""
        if self.kind == "choice":
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.kind in ("int", "float", "pair"):
            text = {"int": "an integer", "float": "a number", "pair": "a pair of numbers, each"}[self.kind]
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"
            elif self.low is not None:
                text += f" {'>' if self.open_low else '>='} {self.low}"
        else:
            text = {"bool": "true or false", "path": "a file or folder path", "text": "a non-empty string",
                    "device": "auto, cpu, cuda or cuda:N"}[self.kind]
        return text + (" (or null)" if self.optional else "")

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind in ("path", "text"):
            return isinstance(value, (str, os.PathLike)) and str(value) != ""
        if self.kind == "device":
            return isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None
        if self.kind == "pair":
            return (isinstance(value, (tuple, list)) and len(value) == 2
                    and all(dataclasses.replace(self, kind="float").accepts(v) for v in value))
        return self._in_range(value)

    def _in_range(self, value) -> bool:
        types = (int,) if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, types) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def check(self, key: str, value) -> None:
        if not self.accepts(value):
            raise ValueError(f"{key} must be {self.allowed()}, got {value!r}")


def setting(default, kind: str, **rule):
    """A schema field whose metadata carries its ``Rule`` (``validate`` walks them all)."""
    return field(default=default, metadata={"rule": Rule(kind, **rule)})
