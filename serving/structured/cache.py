"""`GrammarCache`: compiled grammars kept per backend (one tokenizer), least recently used out.

Compiling a JSON schema costs milliseconds to hundreds of milliseconds (measured in
benchmarks/results/2026-12-05/grammar/); clients of a JSON-producing app resend the same
schema with every request, so a hit turns that into a dict lookup.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from serving.structured.backend import GrammarBackend, GrammarMatcher
from serving.structured.spec import StructuredSpec


class GrammarCache:
    """Thread-safe: the API's admission path and the engine thread may both call `get`.
    Compilation runs outside the lock (it can take a while and releases the GIL), so two
    threads missing on one spec at once may both compile it; the first result is kept."""

    def __init__(self, backend: GrammarBackend, max_entries: int = 256) -> None:
        assert max_entries > 0
        self.backend = backend
        self.max_entries = max_entries
        self.num_hits = 0
        self.num_compiles = 0
        self._entries: OrderedDict[StructuredSpec, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: StructuredSpec) -> object:
        """The compiled grammar of `spec`; raises `InvalidStructuredOutput` (a ValueError)
        when the engine refuses it, so admission can answer 400."""
        with self._lock:
            compiled = self._entries.get(spec)
            if compiled is not None:
                self._entries.move_to_end(spec)
                self.num_hits += 1
                return compiled
        compiled = self.backend.compile(spec)
        with self._lock:
            self.num_compiles += 1
            kept = self._entries.setdefault(spec, compiled)
            self._entries.move_to_end(spec)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return kept

    def new_matcher(self, spec: StructuredSpec) -> GrammarMatcher:
        """A fresh matcher for one sequence (compiling `spec` on a miss)."""
        return self.backend.new_matcher(self.get(spec))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, spec: StructuredSpec) -> bool:
        return spec in self._entries
