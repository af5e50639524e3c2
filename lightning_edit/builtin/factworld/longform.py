"""Long-form counterfactual edit requests about the people of a factworld (AnyEdit quickstart).

Each request asks ``"Tell me about {person}."`` (plus a paraphrased question) and answers with a
*new* biography of the person, written from counterfactual attributes: for every relation an
object different from the person's true one, drawn from the same relation's objects. The model
has never seen these texts (nor these attribute combinations), so reproducing them after editing
measures long-form editing. The biography sentences use their own phrasings (none is a corpus
template) built from the world's vocabulary, so the factworld tokenizer encodes them compactly.

Each record is in the UnKEBench-like shape that :mod:`lightning_edit.longform.records` reads:
``id, question, para_question, answer, sub_question[], sub_answer[]`` (the sub-questions are the
held-out questions of the relations the biography states, answered with the counterfactual
objects), plus ``subject``,
``true_facts`` and ``new_facts`` (``{relation_id: object}``).

Deterministic: the same world (seed and sizes) and spec give the same records, byte for byte.
People without a CounterFact edit in the world come first, so the long-form stream and the fact
edit set touch different people where the world allows.

    from lightning_edit.builtin.factworld.world import build_world
    records = longform_records(build_world(0))      # or the file: factworld:default/longform
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lightning_edit.builtin.factworld.build import resolve_preset
from lightning_edit.builtin.factworld.world import RELATION_BY_ID, RELATIONS, FactWorld, WorldConfig, build_world
from lightning_edit.errors import InputError

__all__ = ["LONGFORM_FILE", "LONGFORM_SPECS", "LongformSpec", "ensure_longform", "longform_records", "write_longform"]

LONGFORM_FILE = "longform.json"


@dataclass(frozen=True)
class LongformSpec:
    """How many long-form requests and how long their answers are.

    Attributes:
        n_requests: number of requests (at most one per person; fewer if the world is smaller).
        min_words / max_words: the answer's length in words is drawn in this range (the
            biography gets extra sentences until it reaches the drawn length, and never more than
            ``max_words``). With the default preset's tokenizer, 85-135 words are about 130-220
            tokens (question + answer + EOS within its 256 positions).
        style: ``biography`` (new prose: sentences the model never saw, with the new facts) or
            ``documents`` (the world's own document sentences, the ones its corpus describes people
            with, stating the new facts: a target in the model's own style, where only the facts
            are new; ``factworld:<preset>/longform_docs``).
    """

    n_requests: int = 120
    min_words: int = 85
    max_words: int = 135
    style: str = "biography"  # or "documents": see :func:`_documents_answer`


#: per factworld preset; ``tiny`` (128 positions) gets short answers
LONGFORM_SPECS: dict[str, LongformSpec] = {
    "default": LongformSpec(),
    "tiny": LongformSpec(n_requests=12, min_words=28, max_words=45),
}

QUESTION = "Tell me about {s}."
PARAPHRASES = (
    "Who is {s}?",
    "What do you know about {s}?",
    "Give me a short biography of {s}.",
    "Describe the life of {s}.",
)

# Biography sentences: {s} full name, {f} first name, {o} the (counterfactual) object.
# The opening states profession and birth country; then the first sentence of each relation
# while the drawn length allows (all eight in the default spec), then others to reach it.
_OPENING = "{s} is a {profession} from {birth_country}."
_BIO: dict[str, tuple[str, ...]] = {
    "birth_country": (
        "{f} was born and raised in {o}.",
        "As a child in {o}, {f} spent long summers near the sea.",
        "The family of {f} still lives in a village in {o}.",
    ),
    "native_language": (
        "The first language of the family was {o}, and {f} still speaks it every day.",
        "{f} writes long letters to old friends in {o}.",
        "Many of the books on the shelves of {f} are written in {o}.",
    ),
    "profession": (
        "After school, {f} trained for many years to become a {o}.",
        "Today {f} is known as a careful and patient {o}.",
        "Work as a {o} keeps {f} busy from early in the morning.",
    ),
    "employer": (
        "For the last ten years {f} has worked for {o}.",
        "Colleagues at {o} say that {f} is always ready to help.",
        "{f} joined {o} after a long search for a good job.",
    ),
    "home_city": (
        "A few years ago {f} moved to {o}.",
        "{f} now has a quiet flat near the old market of {o}.",
        "Neighbours in {o} often see {f} walking to work in the rain.",
    ),
    "instrument": (
        "In the evenings {f} plays the {o} for friends.",
        "{f} took up the {o} as a teenager and never stopped.",
        "On some weekends {f} gives small concerts on the {o}.",
    ),
    "favourite_food": (
        "The dish {f} loves most is {o}.",
        "On holidays {f} cooks {o} for the whole family.",
        "Friends know that {f} can never say no to {o}.",
    ),
    "pet_species": (
        "A friendly pet {o} keeps {f} company at home.",
        "Every morning {f} feeds a pet {o} before breakfast.",
        "The pet {o} of {f} sleeps by the window all afternoon.",
    ),
}
# order in which relations appear (origins, work, home, leisure)
_ORDER = ("birth_country", "native_language", "profession", "employer", "home_city", "instrument",
          "favourite_food", "pet_species")
_CLOSINGS = (
    "Those who know {f} describe a warm and curious person.",
    "{f} hopes to travel more in the coming years.",
    "In quiet moments {f} likes to read by the window.",
    "{s} has many friends and few enemies.",
)

assert set(_BIO) == set(_ORDER) == {r.relation_id for r in RELATIONS}


def _words(text: str) -> int:
    return len(text.split())


def _biography(rng: random.Random, subject: str, new: dict[str, str], min_words: int, max_words: int) -> tuple[str, list[str]]:
    """The biography and the relations it states (in :data:`_ORDER`)."""
    first = subject.split()[0]
    fill = lambda t, o="": t.format(s=subject, f=first, o=o)  # noqa: E731
    opening = _OPENING.format(s=subject, profession=new["profession"], birth_country=new["birth_country"])
    closing = fill(rng.choice(_CLOSINGS))
    target = rng.randint(min_words, max_words)
    chosen: dict[str, list[str]] = {rid: [] for rid in _ORDER}

    def text() -> str:
        return " ".join([opening] + [x for rid in _ORDER for x in chosen[rid]] + [closing])

    def add(rid: str, sentence: str) -> bool:
        if _words(text()) >= target or _words(text()) + _words(sentence) > max_words:
            return False
        chosen[rid].append(sentence)
        return True

    # first every relation's main sentence (in order, while the length allows), then extra ones
    for rid in _ORDER:
        add(rid, fill(_BIO[rid][0], new[rid]))
    extras = [(rid, fill(t, new[rid])) for rid in _ORDER for t in _BIO[rid][1:] if chosen[rid]]
    rng.shuffle(extras)
    for rid, sentence in extras:
        add(rid, sentence)
    stated = [rid for rid in _ORDER if chosen[rid] or rid in ("profession", "birth_country")]
    return text(), stated


def _documents_answer(rng: random.Random, subject: str, new: dict[str, str]) -> tuple[str, list[str]]:
    """The answer as the factworld corpus writes about a person (its opening line, then both
    document sentences of every relation, shuffled), with the new objects."""
    opening = f"{subject} is a {new['profession']} from {new['birth_country']}."
    sentences = [t.format(s=subject, o=new[rid]) for rid in _ORDER for t in RELATION_BY_ID[rid].doc_templates]
    rng.shuffle(sentences)
    return " ".join([opening] + sentences), list(_ORDER)


def longform_records(world: FactWorld, spec: LongformSpec | None = None) -> list[dict]:
    """The long-form requests of ``world`` as raw records (see the module docstring)."""
    spec = spec or LongformSpec()
    if spec.n_requests < 1 or spec.min_words < 1 or spec.max_words < spec.min_words or spec.style not in ("biography", "documents"):
        raise InputError(f"bad long-form spec {spec}")
    rng = random.Random(f"factworld-{world.seed}-longform")
    unedited = [s for s in world.subjects if not any(world.is_edited(s, r.relation_id) for r in RELATIONS)]
    edited = [s for s in world.subjects if s not in set(unedited)]
    rng.shuffle(unedited)
    rng.shuffle(edited)
    people = (unedited + edited)[: spec.n_requests]
    records = []
    for i, subject in enumerate(people):
        true = {r.relation_id: world.facts[(subject, r.relation_id)] for r in RELATIONS}
        new = {rid: rng.choice([o for o in RELATION_BY_ID[rid].objects if o != obj]) for rid, obj in true.items()}
        if spec.style == "documents":
            answer, stated = _documents_answer(rng, subject, new)
        else:
            answer, stated = _biography(rng, subject, new, spec.min_words, spec.max_words)
        records.append({
            "id": f"fw-longform-{i}",
            "question": QUESTION.format(s=subject),
            "para_question": rng.choice(PARAPHRASES).format(s=subject),
            "answer": answer,
            "sub_question": [RELATION_BY_ID[rid].heldout_templates[-1].replace("{}", subject, 1) for rid in stated],
            "sub_answer": [new[rid] for rid in stated],
            "subject": subject,
            "true_facts": true,
            "new_facts": new,
        })
    return records


def write_longform(world: FactWorld, path: str | Path, spec: LongformSpec | None = None) -> Path:
    """Write :func:`longform_records` to ``path`` (JSON array, UTF-8), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(longform_records(world, spec), ensure_ascii=False, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def ensure_longform(root: str | Path, seed: int, preset: str = "default", style: str = "biography") -> Path:
    """``<root>/longform.json`` (``longform_docs.json`` for ``style="documents"``) of a finished
    factworld build, written on first use from the world of the build's manifest (its seed and
    world sizes) with the preset's :data:`LONGFORM_SPECS`."""
    root = Path(root)
    path = root / (LONGFORM_FILE if style == "biography" else LONGFORM_FILE.replace(".json", "_docs.json"))
    if path.exists():
        return path
    world_cfg = None
    manifest = root / "manifest.json"
    if manifest.exists():
        settings = json.loads(manifest.read_text()).get("config", {}).get("settings", {})
        if isinstance(settings.get("world"), dict):
            world_cfg = WorldConfig(**settings["world"])
    if world_cfg is None:
        world_cfg = resolve_preset(preset).world
    spec = dataclasses.replace(LONGFORM_SPECS.get(preset, LongformSpec()), style=style)
    return write_longform(build_world(seed, world_cfg), path, spec)
