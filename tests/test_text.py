"""The official text rules (SPEC 2): tokenizer, vocabulary, encoding; and the SPEC 2 figures
on the real ReferIt expressions of the official implementation."""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path

import pytest

from referseg.text import EOS, GO, PAD, SPECIAL_TOKENS, UNK, Vocabulary, encode, tokenize


@pytest.mark.parametrize("expression, tokens", [
    ("man on the left", ["man", "on", "the", "left"]),
    ("Man on the LEFT.", ["man", "on", "the", "left"]),  # lowercased, final "." dropped
    ("guy, in the middle", ["guy", ", ", "in", "the", "middle"]),  # ", " stays a token, with its space
    ("car - red", ["car", " - ", "red"]),
    ("  sky  ", ["sky"]),  # the sentence is stripped
    ("a.b.", ["a", ".", "b"]),  # only the FINAL "." goes
    ("what?!", ["what", "?!"]),
    ("top   right", ["top", "right"]),  # whitespace-only separators are dropped
    ("café Über", ["café", "über"]),  # \W+ is unicode aware: accented letters are word characters
])
def test_tokenize_hand_cases(expression, tokens):
    assert tokenize(expression) == tokens


def test_tokenize_lowercases_without_stripping():
    assert tokenize("A ,B")[1] == " ,"  # the separator keeps its leading space


@pytest.mark.parametrize("expression", ["", "   ", ".", " . "])
def test_tokenize_empty_raises(expression):
    with pytest.raises(ValueError, match="empty referring expression"):
        tokenize(expression)


def test_tokenize_rejects_non_strings():
    with pytest.raises(TypeError):
        tokenize(None)  # type: ignore[arg-type]


def test_vocabulary_build_min_count_and_order():
    expressions = ["red car", "red car, left", "blue car", "sky"]
    vocab = Vocabulary.build(expressions)
    assert vocab.tokens[:4] == list(SPECIAL_TOKENS) == [PAD, GO, EOS, UNK]
    assert vocab.tokens[4:6] == ["car", "red"]  # most frequent first, ties alphabetical
    assert ", " in vocab and "sky" in vocab and len(vocab) == 4 + 6
    frequent = Vocabulary.build(expressions, min_count=2)
    assert frequent.tokens[4:] == ["car", "red"]
    assert frequent.unknown_rate(["blue car"]) == pytest.approx(0.5)


def test_vocabulary_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(["guy, in the middle", "car - red", "café"])
    path = tmp_path / "sub" / "vocab.txt"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.tokens == vocab.tokens
    assert ", " in loaded and " - " in loaded  # tokens with spaces survive the file


def test_vocabulary_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Vocabulary.load(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary([*SPECIAL_TOKENS, "a", "a"])


def test_encode_left_pads_and_truncates():
    vocab = Vocabulary.build(["one two three four five six"])
    ids = vocab.encode("one two three", length=6)
    assert ids[:3] == [0, 0, 0] and ids[3:] == vocab.ids(["one", "two", "three"])
    long = " ".join(["one", "two", "three", "four", "five", "six"] * 5)  # 30 tokens
    ids = vocab.encode(long)  # T = 20 by default (SPEC 2)
    assert len(ids) == 20 and PAD not in [vocab.tokens[i] for i in ids]
    assert ids == vocab.ids(tokenize(long)[:20])  # the FIRST 20 tokens are kept
    assert vocab.index[EOS] not in ids


def test_encode_unknown_words():
    vocab = Vocabulary.build(["red car"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one known word: no warning
        assert vocab.encode("red zzz", 4) == [0, 0, vocab.index["red"], vocab.index[UNK]]
    with pytest.warns(UserWarning, match="every word of 'zzz qqq' is unknown"):
        assert vocab.encode("zzz qqq", 4) == [0, 0, 3, 3]
    with pytest.raises(ValueError):
        encode([], vocab)


# ---------------------------------------------------------------------------- real ReferIt text


def _expressions(folder: Path, split: str) -> list[str]:
    queries = json.loads((folder / f"referit_query_{split}.json").read_text(encoding="utf-8"))
    return [e for expressions in queries.values() for e in expressions]


def test_official_vocabulary(official_referit: Path):
    vocab = Vocabulary.load(official_referit / "vocabulary_referit.txt")
    assert len(vocab) == 8_803  # SPEC 2
    assert vocab.tokens[:4] == list(SPECIAL_TOKENS)


@pytest.mark.filterwarnings("ignore:every word of")  # real expressions made only of unknown words
@pytest.mark.parametrize("split, unknown_pct, max_len, over_20", [
    ("trainval", 4.95, 34, 39),  # SPEC 2
    ("test", 4.99, 41, 41),  # SPEC 2
])
def test_official_text_statistics(official_referit: Path, split, unknown_pct, max_len, over_20):
    vocab = Vocabulary.load(official_referit / "vocabulary_referit.txt")
    expressions = _expressions(official_referit, split)
    lengths = [len(tokenize(e)) for e in expressions]
    assert round(100 * vocab.unknown_rate(expressions), 2) == unknown_pct
    assert round(statistics.fmean(lengths), 2) == 3.54  # SPEC 2: mean length 3.54 tokens
    assert max(lengths) == max_len
    assert sum(n > 20 for n in lengths) == over_20
    ids = [vocab.encode(e) for e in expressions[:2000]]
    assert all(len(i) == 20 and i[-1] != vocab.index[PAD] for i in ids)  # last step is always a word
