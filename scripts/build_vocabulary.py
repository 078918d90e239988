"""Rebuild ``sae_vision_ext/data/vocabulary_en.txt``, the default word list for concept naming.

    python scripts/build_vocabulary.py [TARGET]

The rule (see ``sae_vision_ext/data/VOCABULARY.md`` for sources and licences): take the complete-word tokens
of CLIP's byte-pair-encoding vocabulary in merge order (a proxy for word frequency in CLIP's training
captions), keep lower-case ASCII alphabetic words of 3+ letters that occur at least twice in the WordNet
glosses of the ImageNet-21k synsets (this drops sub-word fragments such as "ing" or "ers"), and drop English
stop words.
"""

from __future__ import annotations

import collections
import gzip
import re
import sys
from pathlib import Path

import open_clip
import timm.data
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from sae_vision_ext.analysis.vocabulary import default_vocabulary_path


def build_default_vocabulary(min_gloss_count: int = 2, min_length: int = 3) -> list[str]:
    """Rebuild the default word list from open_clip's BPE file, timm's WordNet files and sklearn's stop
    words."""
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


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default_vocabulary_path()
    built = build_default_vocabulary()
    target.write_text("\n".join(built) + "\n", encoding="utf-8")
    print(f"wrote {len(built)} words to {target}")


if __name__ == "__main__":
    main()
