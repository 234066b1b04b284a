"""What a constrained request carries to the engine: a small, picklable description of its grammar.

The grammar itself is compiled in the engine process (`structured/grammar.py`), against the engine's
tokenizer; the request only carries the schema text, so it crosses the process pipe as a few strings and
joins the response-cache key through `SamplingParams` like any other field. Pure: no xgrammar, no torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

Kind = Literal["json_object", "json_schema"]


@dataclass(frozen=True, slots=True)
class Constraint:
    """The output must be JSON: any object (`json_object`) or an instance of `schema` (`json_schema`, the
    schema as canonical JSON text, keys sorted, so equal schemas have one text and one compiled grammar)."""

    kind: Kind
    schema: str = ""

    @property
    def key(self) -> str:
        """The compiled-grammar cache key: a digest of what decides the grammar."""
        return hashlib.sha256(f"{self.kind}\0{self.schema}".encode()).hexdigest()
