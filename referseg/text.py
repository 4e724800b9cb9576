"""Text processing exactly as the official code does it (SPEC 2, ``util/text_processing.py``).

``tokenize`` splits on the regex ``(\\W+)`` and keeps the separators as tokens (", "
stays ", " and usually becomes ``<unk>``); ``encode`` keeps the first T=20 tokens and
LEFT-pads with ``<pad>``, so the LSTM's final step always reads a real word.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from referseg.io import atomic_write_text

SPLIT_REGEX = re.compile(r"(\W+)")  # SPEC 2
PAD, GO, EOS, UNK = "<pad>", "<go>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, GO, EOS, UNK)  # SPEC 2: ids 0, 1, 2, 3
SEQ_LEN = 20  # SPEC 2: T


def tokenize(expression: str) -> list[str]:
    """Split a referring expression into tokens with the official rules (SPEC 2).

    Strip, split with ``(\\W+)`` keeping separators, drop tokens that are blank after
    stripping, lowercase the rest without stripping them, drop a final ``"."``.
    """
    if not isinstance(expression, str):
        raise TypeError(f"expression must be a string, got {type(expression).__name__}")
    tokens = [w.lower() for w in SPLIT_REGEX.split(expression.strip()) if w.strip()]
    if tokens and tokens[-1] == ".":
        tokens = tokens[:-1]
    if not tokens:
        raise ValueError(
            f"empty referring expression {expression!r}: give at least one word, e.g. 'man on the left'"
        )
    return tokens


class Vocabulary:
    """Token <-> id map with the four special tokens first (SPEC 2)."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise ValueError(
                f"a vocabulary must start with {' '.join(SPECIAL_TOKENS)}, got {tokens[:4]}"
            )
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        if len(self.index) != len(tokens):
            dupes = [t for t, c in Counter(tokens).items() if c > 1]
            raise ValueError(f"duplicate tokens in vocabulary: {dupes[:10]}")

    @classmethod
    def build(cls, expressions: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Vocabulary of the tokens seen at least ``min_count`` times, most frequent first."""
        counts = Counter(t for e in expressions for t in tokenize(e))
        words = sorted((t for t, c in counts.items() if c >= min_count and t not in SPECIAL_TOKENS),
                       key=lambda t: (-counts[t], t))
        return cls(list(SPECIAL_TOKENS) + words)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a one-token-per-line file, such as the official ``vocabulary_referit.txt``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} does not exist")
        # Tokens may carry spaces (", "), so only the line ending is removed.
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines = lines[:-1]
        return cls([line.rstrip("\r") for line in lines])

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, "\n".join(self.tokens) + "\n")

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"

    def ids(self, tokens: Sequence[str]) -> list[int]:
        unk = self.index[UNK]
        return [self.index.get(t, unk) for t in tokens]

    def encode(self, expression: str, length: int = SEQ_LEN) -> list[int]:
        """Tokenize and encode an expression (see :func:`encode`)."""
        return encode(tokenize(expression), self, length)

    def unknown_rate(self, expressions: Iterable[str]) -> float:
        """Fraction of tokens that map to ``<unk>``."""
        total = unknown = 0
        for e in expressions:
            tokens = tokenize(e)
            total += len(tokens)
            unknown += sum(t not in self.index for t in tokens)
        return unknown / max(total, 1)


def encode(tokens: Sequence[str], vocab: Vocabulary, length: int = SEQ_LEN) -> list[int]:
    """Ids of the first ``length`` tokens, LEFT-padded with ``<pad>`` (SPEC 2); no ``<eos>``."""
    if not tokens:
        raise ValueError("cannot encode an empty token list")
    ids = vocab.ids(tokens[:length])
    unk = vocab.index[UNK]
    if all(i == unk for i in ids):
        warnings.warn(
            f"every word of {' '.join(tokens)!r} is unknown to the vocabulary; it encodes to <unk> only",
            stacklevel=2,
        )
    return [vocab.index[PAD]] * (length - len(ids)) + ids
