"""Grammars for constrained decoding, compiled in the engine process (xgrammar), and one matcher per request.

Why xgrammar: on this project's CPU benchmark (SmolLM2's 49k vocabulary, random walks through three JSON
schemas) it filled a next-token bitmask in 0.004-0.11 ms on average against llguidance's 0.03-1.7 ms, and
outlines-core took 56-300 ms to compile where xgrammar took 0.7-20 ms. Its bitmask API is per row of one
batch tensor, and `apply_token_bitmask_inplace(indices=...)` masks only the constrained rows of a batch.

`GrammarCache` compiles each constraint once (keyed by its digest, least recently used dropped past
`max_entries`) and records the seconds each compile took, which the engine's stats carry to the metrics.
Its tokenizer info (about 0.5 s for a 49k vocabulary, longer for larger ones) is built on the first
constrained request, so an engine that never sees one pays nothing, or at start in a thread (`prepare()`),
so that the first one does not stall every running stream for that long. A `Matcher` is
one request's position in its grammar: it takes every token the request keeps, in order, and knows which
tokens may come next. JSON is compiled without free whitespace (xgrammar's
`any_whitespace=False`): a model can then never fill its budget with blanks, and output is compact.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from typing import Any

import xgrammar

from fleetlm_runtime.structured import formats, spec

DEFAULT_MAX_ENTRIES = 256


class Matcher:
    """One request's state in its grammar. `tokens` are the tokens it accepted (its kept output)."""

    __slots__ = ("_matcher", "tokens")

    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self.tokens: list[int] = []

    def fill(self, bitmask: Any, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by `token`; False (and no change) when the grammar does not allow it."""
        if self._matcher.is_terminated():
            return False
        if not self._matcher.accept_token(token):
            return False
        self.tokens.append(token)
        return True

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing may follow."""
        return bool(self._matcher.is_terminated())

    def replay(self, tokens: Sequence[int]) -> None:
        """Start again from the grammar's start and accept `tokens` (a sequence that recomputes with a
        different output than this matcher saw): afterwards `self.tokens == list(tokens)`."""
        self._matcher.reset()
        self.tokens = []
        for token in tokens:
            if not self.accept(token):
                raise ValueError(f"token {token} is not allowed by the grammar at position {len(self.tokens)}")


class GrammarCache:
    """Compiled grammars by constraint, for one tokenizer and vocabulary."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_threads: int = 2,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(set(stop_token_ids))
        self._max_entries = max_entries
        self._max_threads = max_threads
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()  # one build, whether by prepare()'s thread or the first compile
        self._compiled: collections.OrderedDict[str, xgrammar.CompiledGrammar] = collections.OrderedDict()
        self._compile_seconds: list[float] = []
        self.num_compiles = 0
        self.num_hits = 0

    def _get_compiler(self) -> xgrammar.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
                )
                # xgrammar keeps its own cache too; ours decides what is counted as a compile and bounds memory.
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=self._max_threads, cache_enabled=False)
            return self._compiler

    @property
    def compiler_ready(self) -> bool:
        return self._compiler is not None

    def prepare(self) -> threading.Thread:
        """Build the tokenizer tables in a daemon thread started now (join it to wait); a compile that
        comes first waits for it."""
        thread = threading.Thread(target=self._get_compiler, name="grammar-prepare", daemon=True)
        thread.start()
        return thread

    def compile(self, constraint: spec.Constraint) -> xgrammar.CompiledGrammar:
        key = constraint.key
        compiled = self._compiled.get(key)
        if compiled is not None:
            self._compiled.move_to_end(key)
            self.num_hits += 1
            return compiled
        started = time.perf_counter()
        compiler = self._get_compiler()
        if constraint.kind == "json_object":
            compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        else:
            schema = formats.for_grammar(constraint.schema)
            compiled = compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        self._compile_seconds.append(time.perf_counter() - started)
        self.num_compiles += 1
        self._compiled[key] = compiled
        if len(self._compiled) > self._max_entries:
            self._compiled.popitem(last=False)
        return compiled

    def matcher(self, constraint: spec.Constraint) -> Matcher:
        return Matcher(self.compile(constraint))

    def take_compile_seconds(self) -> tuple[float, ...]:
        """The durations of the compiles since the last call (for the engine's per-step stats)."""
        taken, self._compile_seconds = tuple(self._compile_seconds), []
        return taken
