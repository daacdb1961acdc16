"""py3langid's classify() to the bit, at less than half its CPU on a 2000-character sample.

LanguageIdentifier.classify() counts the model's byte n-gram features with a pure-Python walk
of its automaton (about 0.3 µs a byte), then numpy's matmul casts the features' float16 rows
to float32 slowly. Here:
- the automaton of the model shipped in py3langid 0.4.0 is an Aho-Corasick automaton of depth
  6 (tests/unit/test_language_fast.py proves it), so the state after a byte is the one reached
  from the start over the 6 bytes ending there: numpy walks all positions at once, 6 steps
  deep, and counts the features in order of first occurrence, as visit_counts()'s Counter
  does (short texts keep the library's walk: numpy's fixed cost is larger there);
- rows are cast through a 65536-entry table, exactly numpy's cast, then scored with the same
  expressions on the same float32 operands in the same order, so the result is bit-identical.
Another py3langid version or model takes the library's own classify().
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from py3langid.langid import LanguageIdentifier, visit_counts

# The py3langid version and model (automaton, table shapes, labels) the fast path was checked on.
CHECKED = ("0.4.0", "87b498788dccc8596c4a41ed8ea0ffa5cc2e40791962c851a8083b7388a593f8")
DEPTH = 6  # of the automaton: its longest feature, in bytes
SHORT_BYTES = 320  # below this the library's walk costs less than numpy's fixed ~80 µs
# One int64 sort key holds a feature id (this model has 100053), a position and a count;
# longer inputs (never a 2000-character sample) take the library's path.
_FEATURE_BITS = 17
_POSITION_BITS = 21

Classify = Callable[[str], tuple[str, float]]


def model_digest(identifier: LanguageIdentifier) -> str:
    """What the fast path relies on: the automaton itself, the table shapes and the labels."""
    digest = hashlib.sha256()
    for part in (identifier.tk_nextmove, identifier.tk_row):
        digest.update(part.typecode.encode())
        digest.update(memoryview(part).cast("B"))
    digest.update(np.asarray(identifier.tk_output, dtype=np.int64).tobytes())
    digest.update(repr((identifier.nb_ptc.shape, str(identifier.nb_ptc.dtype),
                        identifier.nb_pc.shape, str(identifier.nb_pc.dtype),
                        identifier.nb_classes)).encode())
    return digest.hexdigest()


def checked(identifier: LanguageIdentifier) -> bool:
    """The version and model verified here, loaded as readable.py loads it."""
    try:
        installed = version("py3langid")
    except PackageNotFoundError:
        return False
    return (installed == CHECKED[0] and identifier._norm_probs
            and identifier.min_confidence is None
            and identifier.nb_ptc is identifier._full_model[0]  # no set_languages()
            and model_digest(identifier) == CHECKED[1])


def classifier(identifier: LanguageIdentifier) -> Classify:
    """identifier.classify, computed faster when the library and model are the checked ones."""
    return _Fast(identifier) if checked(identifier) else identifier.classify


class _Fast:
    __slots__ = ("_identifier", "_nextmove", "_rowbase", "_start", "_output", "_float32",
                 "_ptc_bits", "_pc", "_classes", "_alias_pairs", "_empty")

    def __init__(self, identifier: LanguageIdentifier) -> None:
        self._identifier = identifier
        self._nextmove = np.frombuffer(identifier.tk_nextmove, dtype=np.uint32)
        self._rowbase = rowbase = np.asarray(identifier._rowbase, dtype=np.intp)
        self._output = np.asarray(identifier.tk_output, dtype=np.intp)
        # The row of the state the start state reaches over each two bytes: two steps in one.
        pairs = np.arange(1 << 16, dtype=np.intp)
        first = self._nextmove[rowbase[0] + (pairs >> 8)]
        self._start = rowbase[self._nextmove[rowbase[first] + (pairs & 255)]]
        self._float32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
        self._ptc_bits = identifier.nb_ptc.view(np.uint16)
        self._pc = identifier.nb_pc
        self._classes = identifier.nb_classes
        self._alias_pairs = identifier._alias_pairs
        self._empty = np.full(len(identifier.nb_classes), 0.0, dtype=np.float32)

    def _visits(self, data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
        """visit_counts() as (feature ids, counts), in order of first occurrence."""
        if len(data) < SHORT_BYTES:
            visits = visit_counts(self._identifier.tk_nextmove, self._identifier._rowbase,
                                  self._identifier.tk_output, data)
            if not visits:
                return None
            return (np.fromiter(visits.keys(), dtype=np.intp, count=len(visits)),
                    np.fromiter(visits.values(), dtype=np.intp, count=len(visits)))
        n = len(data)
        # Byte 0 leads the start state to itself: 0-padding gives every position 6 bytes.
        padded = np.frombuffer(bytes(DEPTH - 1) + data, dtype=np.uint8).astype(np.intp)
        nextmove, rowbase = self._nextmove, self._rowbase
        state = nextmove[self._start[(padded[:n] << 8) | padded[1:n + 1]] + padded[2:n + 2]]
        for k in range(3, DEPTH):
            state = nextmove[rowbase[state] + padded[k:k + n]]
        features = self._output[state]
        # Sorted by (feature, position): runs of one feature, each led by its first position.
        keys = np.sort(((features << _POSITION_BITS) | np.arange(n))[features >= 0])
        found = len(keys)
        if not found:
            return None
        ids = keys >> _POSITION_BITS
        edges = np.empty(found + 1, dtype=bool)
        edges[0] = edges[found] = True
        np.not_equal(ids[1:], ids[:-1], out=edges[1:found])
        bounds = np.flatnonzero(edges)
        starts = bounds[:-1]
        firsts = keys[starts] & ((1 << _POSITION_BITS) - 1)
        ordered = np.sort((firsts << (_FEATURE_BITS + _POSITION_BITS))
                          | (ids[starts] << _POSITION_BITS) | (bounds[1:] - starts))
        return ((ordered >> _POSITION_BITS) & ((1 << _FEATURE_BITS) - 1),
                ordered & ((1 << _POSITION_BITS) - 1))

    def __call__(self, text: str) -> tuple[str, float]:
        data = LanguageIdentifier._encode(text)
        if not isinstance(data, bytes) or len(data) >= 1 << _POSITION_BITS:
            return self._identifier.classify(text)  # type: ignore[no-any-return]
        visits = self._visits(data)
        if visits is None:
            scores = self._empty.copy()
        else:
            ids, counts = visits
            rows = self._float32.take(self._ptc_bits.take(ids, axis=0))
            # _sparse_score(): the same float32 operands, in the same order.
            scores = np.log1p(counts.astype(np.float32)) @ rows + self._pc
        # LanguageIdentifier._decide() with norm_probs, then classify(), step for step.
        scores *= 1.0 / math.sqrt(len(data) or 1)
        np.exp(scores - scores.max(), out=scores)
        scores /= scores.sum()
        for i, j in self._alias_pairs:
            scores[i] += scores[j]
            scores[j] = 0.0
        best = int(scores.argmax())
        return self._classes[best], float(scores[best])
