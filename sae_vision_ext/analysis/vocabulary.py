"""The default English vocabulary for concept naming, and how it was built.

``default_vocabulary()`` reads ``sae_vision_ext/data/vocabulary_en.txt`` (one word a line, most frequent
first). That file was produced by ``scripts/build_vocabulary.py`` from files that ship inside packages this
project already depends on; see ``data/VOCABULARY.md`` for sources and licences. The rule: take the
complete-word tokens of CLIP's byte-pair-encoding vocabulary in merge order (a proxy for word frequency in
CLIP's training captions), keep lower-case ASCII alphabetic words of 3+ letters that occur at least twice in
the WordNet glosses of the ImageNet-21k synsets (this drops sub-word fragments such as "ing" or "ers"), and
drop English stop words.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

VOCABULARY_FILE = "vocabulary_en.txt"


def default_vocabulary_path() -> Path:
    """Path of the shipped vocabulary file."""
    return Path(str(resources.files("sae_vision_ext").joinpath("data", VOCABULARY_FILE)))


def default_vocabulary() -> list[str]:
    """The shipped English word list (about 9,300 words, most frequent first)."""
    return read_vocabulary(default_vocabulary_path())


def read_vocabulary(path: str | Path) -> list[str]:
    """Words from a text file, one per line; blank lines and lines starting with ``#`` are skipped."""
    words = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = line.strip()
        if word and not word.startswith("#"):
            words.append(word)
    return dedupe(words)


def dedupe(words: Iterable[str]) -> list[str]:
    """Words in first-seen order without repeats."""
    seen: set[str] = set()
    out = []
    for word in words:
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def load_vocabulary(vocabulary: str | Path | Sequence[str] | None = None) -> list[str]:
    """``None`` -> the default list; a path -> that file; a sequence of words -> those words
    (deduplicated)."""
    if vocabulary is None:
        return default_vocabulary()
    if isinstance(vocabulary, (str, Path)):
        return read_vocabulary(vocabulary)
    return dedupe(str(word) for word in vocabulary)


def vocabulary_hash(words: Sequence[str]) -> str:
    """A short stable hash of the word list (order matters), used in cache keys."""
    digest = hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()
    return digest[:16]
