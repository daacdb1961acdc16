"""The fast language guess (gateway.ingest.language) returns exactly what py3langid's own
classify() returns: the same language and the same probability to the bit, on every text of
the corpus and on generated texts of many scripts; and the fact it rests on, that the model's
automaton is an Aho-Corasick automaton of depth 6, holds."""

from __future__ import annotations

import os
from array import array
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ingest import language
from gateway.ingest.parse import parse
from gateway.ingest.readable import _classify, _identifier, readable
from tests.conftest import need_peer
from tests.unit.test_corpus import FILES

EXAMPLES = int(os.environ.get("DESKGATE_FUZZ_EXAMPLES", "300"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None,
                    derandomize=os.environ.get("CI") == "true",
                    suppress_health_check=[HealthCheck.too_slow])


def _same_as_library(text: str) -> None:
    assert _classify()(text) == _identifier().classify(text), text[:80]


def aho_corasick_depth(identifier: Any) -> int | None:
    """The automaton's depth when each transition goes to the longest suffix, in the trie of
    the states' shortest paths, of the state's string and the byte (Aho-Corasick); else None.

    The trie and the failure states come from a breadth-first walk; a transition that is not
    a trie edge must then equal the failure state's transition on the same byte (the root's:
    the root), which by induction on depth makes every transition the longest-suffix one."""
    nextmove = np.frombuffer(identifier.tk_nextmove, dtype=np.uint32)
    rowbase = np.asarray(identifier._rowbase, dtype=np.intp)
    states = len(rowbase)
    depth = np.full(states, -1)
    parent = np.full(states, -1)
    label = np.full(states, -1)
    fail = np.zeros(states, dtype=np.intp)  # the state reached over the string less its first byte
    depth[0] = 0
    level, byte = np.array([0]), np.arange(256)
    while len(level):
        source, letter = np.repeat(level, 256), np.tile(byte, len(level))
        target = nextmove[rowbase[source] + letter].astype(np.intp)
        new = depth[target] < 0
        target, first = np.unique(target[new], return_index=True)
        source, letter = source[new][first], letter[new][first]
        depth[target] = depth[source] + 1
        parent[target], label[target] = source, letter
        deeper = depth[source] > 0
        fail[target[deeper]] = nextmove[rowbase[fail[source[deeper]]] + letter[deeper]]
        level = target
    if (depth < 0).any():
        return None
    for start in range(0, states, 4096):
        source = np.repeat(np.arange(start, min(states, start + 4096)), 256)
        letter = np.tile(byte, len(source) // 256)
        target = nextmove[rowbase[source] + letter]
        edge = (parent[target] == source) & (label[target] == letter)
        expected = nextmove[rowbase[fail[source]] + letter]
        expected[depth[source] == 0] = 0
        if not (edge | (target == expected)).all():
            return None
    return int(depth.max())


def _automaton(moves: dict[tuple[int, str], int], states: int) -> SimpleNamespace:
    """A hand-made automaton over bytes: moves not listed go to the root."""
    table = array("I", [0] * (256 * states))
    for (state, char), target in moves.items():
        table[256 * state + ord(char)] = target
    return SimpleNamespace(tk_nextmove=table, _rowbase=[256 * s for s in range(states)])


def test_the_fast_path_is_on_for_the_checked_library_and_model() -> None:
    assert language.checked(_identifier())
    assert isinstance(_classify(), language._Fast)


def test_the_model_automaton_is_aho_corasick_of_the_depth_the_fast_path_walks() -> None:
    identifier = _identifier()
    assert aho_corasick_depth(identifier) == language.DEPTH
    # The padding byte leads the start state to itself.
    assert identifier.tk_nextmove[identifier._rowbase[0] + 0] == 0


def test_the_automaton_check_tells_a_wrong_transition() -> None:
    # The trie {a, ab, b}: from "ab", "b" leads to "b", "a" back to "a".
    moves = {(0, "a"): 1, (1, "b"): 2, (0, "b"): 3, (1, "a"): 1, (2, "a"): 1, (2, "b"): 3,
             (3, "a"): 1, (3, "b"): 3}
    assert aho_corasick_depth(_automaton(moves, 4)) == 2
    assert aho_corasick_depth(_automaton({**moves, (2, "b"): 0}, 4)) is None
    assert aho_corasick_depth(_automaton({**moves, (3, "a"): 0}, 4)) is None


def test_another_library_version_or_model_takes_the_library_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    identifier = _identifier()
    monkeypatch.setattr(language, "version", lambda _: "0.4.1")
    assert language.classifier(identifier) == identifier.classify
    monkeypatch.undo()
    monkeypatch.setattr(language, "CHECKED", (language.CHECKED[0], "0" * 64))
    assert language.classifier(identifier) == identifier.classify


def _corpus_texts() -> list[tuple[str, str]]:
    from tests.unit.test_corpus import CORPUS
    return [(path, readable(parse((CORPUS / path).read_bytes())).visible_text)
            for path in FILES]


def test_corpus_guesses_are_the_same() -> None:
    texts = _corpus_texts()
    if not texts:
        need_peer("the shared corpus", "../shared/corpus is missing (or set DESKGATE_CORPUS)")
    fast, library = _classify(), _identifier().classify
    sizes = set()
    for path, text in texts:
        # The sample detect_language classifies, and heads of other sizes (both walks).
        for sample in {text[:2000], text[:200], text[:language.SHORT_BYTES], text[:6000]}:
            assert fast(sample) == library(sample), path
            sizes.add(len(sample.encode()) >= language.SHORT_BYTES)
    assert sizes == {False, True}


@pytest.mark.parametrize("text", [
    "", " ", "x", "\x00" * 400, "ABC DEF GHI " * 40, "Ünïcödé ÄÖÜ" * 40, "\U0001f600" * 300,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40,
    "Guten Tag, meine Bestellung 4711 ist nicht angekommen. " * 40,
    "Здравствуйте, мой заказ не пришёл. " * 40, "您好，我的订单还没有到。" * 100,
    "a" * (language.SHORT_BYTES - 1), "a" * language.SHORT_BYTES,
])
def test_edge_texts_are_the_same(text: str) -> None:
    _same_as_library(text)
    _same_as_library(text[:2000])


SCRIPTS = {
    "ascii": st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    "latin": st.characters(min_codepoint=0x20, max_codepoint=0x24F),
    "cyrillic": st.characters(min_codepoint=0x400, max_codepoint=0x4FF),
    "cjk": st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    "any": st.characters(),
}
WORDS = st.sampled_from([
    "the ", "and ", "order ", "Bestellung ", "nicht ", "bestelling ", "niet ", "commande ",
    "pedido ", "заказ ", "не ", "订单", "没有", "注文", "주문 ", "\n", ". ", ", ", "4711 ",
])


@st.composite
def texts(draw: st.DrawFn) -> str:
    """Mixed runs of scripts and words, from empty to beyond the 2000-character sample."""
    runs = draw(st.lists(st.one_of(
        st.text(alphabet=st.one_of(*SCRIPTS.values()), max_size=60),
        *(st.text(alphabet=alphabet, max_size=400) for alphabet in SCRIPTS.values()),
        st.lists(WORDS, max_size=120).map("".join)), max_size=12))
    text = "".join(runs)
    return text.upper() if draw(st.booleans()) and draw(st.booleans()) else text


@PROPERTY
@given(texts())
def test_generated_texts_are_the_same(text: str) -> None:
    _same_as_library(text)
    _same_as_library(text[:2000])


@PROPERTY
@given(st.sampled_from(list(SCRIPTS)), st.data())
def test_generated_single_script_texts_are_the_same(script: str, data: st.DataObject) -> None:
    text = data.draw(st.text(alphabet=SCRIPTS[script], max_size=2000))
    _same_as_library(text)
