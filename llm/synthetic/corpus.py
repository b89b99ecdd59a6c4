r"""Offline text for the synthetic sentiment task: Debian's ``fortunes`` files, or generated sentences.

Two sources, both offline:

* ``fortunes``: the cookie files of Debian's ``fortunes``/``fortunes-min`` packages (installed by
  ``make setup`` and ``.ci/run`` with apt; default folder ``/usr/share/games/fortunes``). Entries are
  separated by lines holding ``%``; attribution lines (``-- Author``) are dropped, whitespace is
  collapsed, and only plain-ASCII prose of ``min_words .. max_words`` words is kept (ASCII art and
  code are filtered by the share of letters and spaces).
* ``generated``: ``n_generated`` sentences from a small seeded grammar with positive, negative and
  neutral words, so a sentiment scorer has something to score. Deterministic for a seed.
* ``file:PATH``: a local ``.txt`` (one text per line) or ``.jsonl``/``.json`` (a ``text`` field per record);
* ``hub:NAME[:SPLIT[:COLUMN]]``: a ``datasets`` hub data set (GPU presets; needs the network or the HF cache).

``source="auto"`` takes the fortunes when the folder yields at least ``min_texts`` texts and the
generated sentences otherwise; ``Corpus.source`` says which one a run used. A prompt is the first
``prompt_words`` words of a text (``prompt_prefix``).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from robust_rlhf.theory.errors import InputError

__all__ = [
    "FORTUNE_DIR",
    "CORPUS_SOURCES",
    "CorpusConfig",
    "Corpus",
    "read_fortune_file",
    "fortune_texts",
    "generated_texts",
    "load_corpus",
    "prompt_prefix",
]

FORTUNE_DIR = "/usr/share/games/fortunes"
CORPUS_SOURCES = ("auto", "fortunes", "generated")

_WS = re.compile(r"\s+")
_ATTRIBUTION = re.compile(r"^\s*(--|- )")
#: an attribution at the end of a line: `` -- Steve Shorter``
_TRAILING_ATTRIBUTION = re.compile(r"\s--\s*[A-Z][\w.' ]{0,40}$")


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text comes from and which texts are kept (see the module docstring)."""

    source: str = "auto"
    fortune_dir: str = FORTUNE_DIR
    min_words: int = 5
    max_words: int = 40
    min_texts: int = 500
    n_generated: int = 6000
    max_texts: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in CORPUS_SOURCES and not self.source.startswith(("file:", "hub:")):
            raise InputError(
                f"corpus.source: unknown {self.source!r}; allowed: {', '.join(CORPUS_SOURCES)}, file:PATH, hub:NAME"
            )
        if not 1 <= self.min_words <= self.max_words:
            raise InputError(f"corpus: need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if self.n_generated < 1 or self.min_texts < 1:
            raise InputError("corpus: n_generated and min_texts must be >= 1")
        if self.max_texts is not None and self.max_texts < 1:
            raise InputError(f"corpus.max_texts must be >= 1 or None, got {self.max_texts}")


@dataclass(frozen=True)
class Corpus:
    """The kept texts (deterministically shuffled), which source gave them, and a content hash."""

    texts: tuple[str, ...]
    source: str
    location: str

    @property
    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the texts, in order: the cache key of everything built on them."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode())
            h.update(b"\x00")
        return h.hexdigest()[:16]

    def split(self, n_heldout: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(train, heldout)``: the last ``n_heldout`` texts are held out (never seen in pre-training)."""
        if not 0 < n_heldout < len(self.texts):
            raise InputError(f"cannot hold out {n_heldout} of {len(self.texts)} texts")
        return self.texts[:-n_heldout], self.texts[-n_heldout:]


def _clean(entry: str, min_words: int, max_words: int) -> str | None:
    lines = []
    for line in entry.splitlines():
        if _ATTRIBUTION.match(line):
            break
        lines.append(line)
    text = _TRAILING_ATTRIBUTION.sub("", _WS.sub(" ", " ".join(lines)).strip())
    if not text or not text.isascii():
        return None
    n_words = len(text.split(" "))
    if not min_words <= n_words <= max_words:
        return None
    prose = sum(c.isalpha() or c == " " for c in text) / len(text)
    if prose < 0.85 or not text[0].isalpha():
        return None
    return text


def read_fortune_file(path: str | Path, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Cleaned entries of one fortune cookie file (entries separated by ``%`` lines)."""
    raw = Path(path).read_text(encoding="latin-1")
    out = []
    for entry in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
        text = _clean(entry, min_words, max_words)
        if text is not None:
            out.append(text)
    return out


def fortune_texts(folder: str | Path = FORTUNE_DIR, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Every kept entry of every cookie file in ``folder`` (files without an extension, sorted), deduplicated."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    seen: dict[str, None] = {}
    for f in sorted(p for p in folder.iterdir() if p.is_file() and "." not in p.name):
        for t in read_fortune_file(f, min_words, max_words):
            seen.setdefault(t, None)
    return list(seen)


_SUBJECTS = (
    "the movie", "my friend", "this book", "the weather", "our team", "the city", "the teacher", "the food",
    "my day", "the music", "the old house", "her letter", "the trip", "his idea", "the game", "the garden",
    "the show", "my neighbour", "the story", "the party", "the ending", "the service", "the road", "the news",
)
_VERBS = ("is", "was", "seems", "looked", "felt", "sounds", "became", "will be")
_ADVERBS = ("", "", "very", "really", "quite", "so", "truly", "a bit", "rather", "never")
_POSITIVE = (
    "good", "great", "wonderful", "happy", "lovely", "beautiful", "nice", "amazing", "fun", "brilliant",
    "kind", "excellent", "charming", "delightful", "perfect", "sweet", "funny", "bright", "pleasant", "fantastic",
)
_NEGATIVE = (
    "bad", "terrible", "awful", "sad", "boring", "ugly", "horrible", "dull", "painful", "poor",
    "cruel", "nasty", "miserable", "dreadful", "gloomy", "angry", "stupid", "annoying", "lousy", "worse",
)
_NEUTRAL = ("long", "green", "old", "new", "quiet", "small", "round", "late", "early", "busy", "loud", "tall")
_LINKS = ("and", "but", "so", "because", "while", "although")
_ENDINGS = (
    "today", "in the morning", "this year", "at night", "again", "for a while", "after all", "as usual",
    "to everyone", "in the end", "", "", "",
)


def _adjective(rng: random.Random) -> str:
    pool = rng.choice((_POSITIVE, _NEGATIVE, _NEUTRAL))
    return rng.choice(pool)


def _clause(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_ADVERBS), _adjective(rng)]
    return " ".join(w for w in words if w)


def generated_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences ``Clause, link clause ending.`` from a seeded grammar (see ``_clause``)."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    tries = 0
    while len(seen) < n:
        tries += 1
        if tries > 50 * n:
            raise InputError(f"the grammar cannot make {n} distinct sentences")
        first, second = _clause(rng), _clause(rng)
        ending = rng.choice(_ENDINGS)
        text = f"{first[0].upper()}{first[1:]}, {rng.choice(_LINKS)} {second}{' ' + ending if ending else ''}."
        seen.setdefault(text, None)
    return list(seen)


def _external_texts(config: CorpusConfig) -> tuple[list[str], str]:
    """Texts of a ``file:`` or ``hub:`` source, cleaned like the fortunes (whitespace, word counts)."""
    kind, _, spec = config.source.partition(":")
    if kind == "file":
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"corpus.source: no file {spec!r}")
        if path.suffix in (".jsonl", ".json"):
            import json

            raw = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        raw.append(str(json.loads(line)["text"]))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise InputError(f"{spec}: line {i} is not a JSON object with a 'text' field") from None
        else:
            raw = path.read_text(encoding="utf-8").splitlines()
        location = str(path.resolve())
    else:
        name, _, rest = spec.partition(":")
        split, _, column = rest.partition(":")
        try:
            import datasets

            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
            raise InputError(f"corpus.source: cannot load {name!r} ({type(exc).__name__}: {exc})".splitlines()[0]) from None
        column = column or "text"
        if column not in ds.column_names:
            raise InputError(f"corpus.source: {name} has no column {column!r} ({', '.join(ds.column_names)})")
        raw = [str(t) for t in ds[column]]
        location = f"hub:{name}:{split or 'train'}:{column}"
    texts: dict[str, None] = {}
    for t in raw:
        t = _WS.sub(" ", t.replace("<br />", " ")).strip()
        if t and config.min_words <= len(t.split(" ")) <= config.max_words:
            texts.setdefault(t, None)
    if not texts:
        raise InputError(f"corpus.source {config.source}: no text of {config.min_words}..{config.max_words} words")
    return list(texts), location


def load_corpus(config: CorpusConfig = CorpusConfig()) -> Corpus:
    """The corpus of ``config``: fortunes, generated sentences, or (``auto``) fortunes when enough are found.

    Texts are shuffled with ``config.seed`` (so any held-out tail mixes every file) and capped at
    ``max_texts``.
    """
    texts: list[str] = []
    source, location = "generated", f"grammar(seed={config.seed}, n={config.n_generated})"
    if config.source.startswith(("file:", "hub:")):
        texts, location = _external_texts(config)
        source = config.source.partition(":")[0]
    elif config.source in ("auto", "fortunes"):
        texts = fortune_texts(config.fortune_dir, config.min_words, config.max_words)
        if len(texts) >= config.min_texts:
            source, location = "fortunes", str(Path(config.fortune_dir).resolve())
        elif config.source == "fortunes":
            raise InputError(
                f"corpus.source=fortunes: {config.fortune_dir} gives {len(texts)} texts (need {config.min_texts}); "
                "install Debian's fortunes (apt-get install fortunes) or use source=generated"
            )
        else:
            texts = []
    if not texts:
        texts = generated_texts(config.n_generated, config.seed)
    texts = sorted(texts)
    random.Random(config.seed).shuffle(texts)
    if config.max_texts is not None:
        texts = texts[: config.max_texts]
    return Corpus(tuple(texts), source, location)


def prompt_prefix(text: str, n_words: int) -> str:
    """The first ``n_words`` words of ``text`` (the whole text if it is shorter), as a prompt."""
    if n_words < 1:
        raise InputError(f"prompt_words must be >= 1, got {n_words}")
    return " ".join(text.split(" ")[:n_words])
