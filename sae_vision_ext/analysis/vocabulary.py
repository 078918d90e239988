"""The default English vocabulary for concept naming, and how it was built.

``default_vocabulary()`` reads ``sae_vision_ext/data/vocabulary_en.txt`` (one word a line, most frequent first).
That file was produced by :func:`build_default_vocabulary` (``python -m sae_vision_ext.analysis.vocabulary``) from
files that ship inside packages this project already depends on; see ``data/VOCABULARY.md`` for sources and
licences. The rule: take the complete-word tokens of CLIP's byte-pair-encoding vocabulary in merge order (a proxy
for word frequency in CLIP's training captions), keep lower-case ASCII alphabetic words of 3+ letters that occur
at least twice in the WordNet glosses of the ImageNet-21k synsets (this drops sub-word fragments such as "ing"
or "ers"), and drop English stop words.
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
    """``None`` -> the default list; a path -> that file; a sequence of words -> those words (deduplicated)."""
    if vocabulary is None:
        return default_vocabulary()
    if isinstance(vocabulary, (str, Path)):
        return read_vocabulary(vocabulary)
    return dedupe(str(word) for word in vocabulary)


def vocabulary_hash(words: Sequence[str]) -> str:
    """A short stable hash of the word list (order matters), used in cache keys."""
    digest = hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()
    return digest[:16]


def build_default_vocabulary(min_gloss_count: int = 2, min_length: int = 3) -> list[str]:
    """Rebuild the default word list from open_clip's BPE file, timm's WordNet files and sklearn's stop words."""
    import collections
    import gzip
    import re

    import open_clip
    import timm.data
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    info_dir = Path(timm.data.__file__).parent / "_info"
    glosses = (info_dir / "imagenet_synset_to_definition.txt").read_text(encoding="utf-8").lower()
    gloss_counts = collections.Counter(re.findall(r"[a-z]+", glosses))
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")[1:]
    words: list[str] = []
    seen: set[str] = set()
    for merge in merges:
        parts = merge.split()
        if len(parts) != 2 or not parts[1].endswith("</w>"):
            continue
        word = parts[0] + parts[1][: -len("</w>")]
        if word in seen:
            continue
        if not (word.isascii() and word.isalpha() and word.islower() and len(word) >= min_length):
            continue
        if word in ENGLISH_STOP_WORDS or gloss_counts[word] < min_gloss_count:
            continue
        seen.add(word)
        words.append(word)
    return words


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default_vocabulary_path()
    built = build_default_vocabulary()
    target.write_text("\n".join(built) + "\n", encoding="utf-8")
    print(f"wrote {len(built)} words to {target}")
