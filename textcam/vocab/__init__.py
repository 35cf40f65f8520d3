"""Phrase vocabularies: built-in lists shipped as text files, files of your own, literal phrases."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

_HERE = Path(__file__).parent


def builtin_vocabularies() -> list[str]:
    """Names of the vocabularies shipped with TextCAM (``general``, ``clevr``, ...)."""
    return sorted(p.stem for p in _HERE.glob("*.txt"))


def read_phrases(path: str | Path) -> list[str]:
    """One phrase per line; blank lines and ``#`` comments are skipped."""
    text = Path(path).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def load_vocabulary(sources: Sequence[str]) -> list[str]:
    """Merge phrases from ``sources`` in order, dropping duplicates (case-insensitive).

    Each source is a built-in name (``general``, ``clevr``), a path to a text file, or a literal
    phrase prefixed with ``phrase:`` (e.g. ``phrase:a watermark``).
    """
    if isinstance(sources, str):
        sources = [sources]
    phrases: list[str] = []
    for src in sources:
        if src.startswith("phrase:"):
            phrases.append(src[len("phrase:") :].strip())
        elif (_HERE / f"{src}.txt").is_file():
            phrases += read_phrases(_HERE / f"{src}.txt")
        elif Path(src).is_file():
            phrases += read_phrases(src)
        else:
            raise FileNotFoundError(
                f"vocabulary {src!r} is neither a built-in ({', '.join(builtin_vocabularies())}), "
                "a file, nor 'phrase:<text>'"
            )
    seen: set[str] = set()
    unique = [p for p in phrases if p and not (p.lower() in seen or seen.add(p.lower()))]
    if not unique:
        raise ValueError("the vocabulary is empty")
    return unique
