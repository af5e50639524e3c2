"""A synthetic fact world: invented people, eight relations, and everything built from them.

The world stands in for "what an LLM knows" on machines where nothing can be downloaded.
Deterministic from a seed: subjects (pronounceable invented names), one object per
(subject, relation), and from those:

- the pretraining / statistics corpus (:meth:`FactWorld.corpus`): every fact on every
  *training* template, one short document per subject, and general text about the objects
  that states no subject's fact (the role Wikipedia plays for the covariance statistics);
- a CounterFact-format edit set in MEMIT's nested shape (:meth:`FactWorld.counterfact`);
- a ZsRE-format edit set in MEND's shape (:meth:`FactWorld.zsre`), same cases;
- reference texts per object (:meth:`FactWorld.references`, for the TF-IDF consistency metric);
- one multi-sentence document per subject (:meth:`FactWorld.documents`, for long-form editing);
- every fact on every template with its split (:meth:`FactWorld.fact_prompts`), for recall and
  retention.

Each relation has eight training templates and two held-out ones (a statement and a question)
that never occur with a subject in the corpus; they give the paraphrase prompts. (With eight
rather than four training templates the toy models reached the same training-template recall
in the same number of steps and answered held-out templates somewhat more often.)
The edit set is a small random sample of the facts (about a tenth or less), at most one edit
per subject (hence per subject-relation).

Object vocabularies and templates are fixed (hand-written) so that prompts read naturally;
the seed decides the subjects' names and which object each subject has.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_edit.errors import InputError

# --------------------------------------------------------------------------------------------
# Relations: object vocabularies and surface templates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """One relation of the world.

    Templates are prompts with one ``{}`` for the subject, ending right before the object
    (the object follows after a space). ``train_templates`` (eight: six statements, then two
    questions) occur in the corpus; ``heldout_templates`` (a statement, then a question) never
    do: they give the paraphrase prompts. ``doc_templates`` phrase the fact inside a subject's
    document (``{s}`` subject, ``{o}`` object). ``general_templates`` are sentences about an
    object that state no subject's fact -- general text, which also uses the wording of the
    held-out templates with other people ("Where was the old king born? Celdor."), the way
    Wikipedia teaches an LLM what a paraphrase means. ``generation_templates`` are open
    prompts for generation-based metrics. No template is a prefix of another, which would
    make the object position ambiguous.
    """

    relation_id: str
    name: str
    objects: tuple[str, ...]
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]
    doc_templates: tuple[str, ...]
    general_templates: tuple[str, ...]
    generation_templates: tuple[str, ...]

    def object_id(self, obj: str) -> str:
        """A stable identifier in the role of CounterFact's Wikidata ids."""
        return f"fw:{self.relation_id}:{self.objects.index(obj)}"


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "home_city",
        "home city",
        objects=(
            "Velandra", "Korrin", "Ostmere", "Port Amsel", "Dunhallow", "Ryvenne", "Saltmarsh",
            "Quillon", "Bexley Cross", "Marrowgate", "Tessaly", "Orvane", "Hollin", "Cardra",
            "Windle", "Ambervale", "Lusk", "Nerith", "Pellamar", "Stonebridge", "Greywater",
            "Iskarn", "Fenmoor", "Brightwell", "Elmstead", "Rowanmouth", "Kestrel Bay", "Thornby",
            "Calder Point", "Mistral Falls",
        ),
        train_templates=(
            "{} lives in",
            "The home city of {} is",
            "{} has a house in",
            "{} is a resident of",
            "Most days, {} can be found in",
            "{} now lives in the city of",
            "In which city is the home of {}?",
            "Which city does {} live in?",
        ),
        heldout_templates=("The city where {} lives is", "Where does {} live?"),
        doc_templates=("These days {s} lives in {o}.", "{s} rents a small flat in {o}."),
        general_templates=(
            "{o} is a city with narrow streets.",
            "The city where the painters live is {o}.",
            "Where do the fishermen live? {o}.",
            "Trains to {o} leave every hour.",
            "The old bridge of {o} is famous.",
            "Many travellers visit {o} in the summer.",
            "The market in {o} opens early in the morning.",
        ),
        generation_templates=("{} spends most days in", "Everyone in the city knows {}."),
    ),
    Relation(
        "native_language",
        "native language",
        objects=(
            "Velmarish", "Ostrian", "Kaldonic", "Serran", "Brunnic", "Tavarese", "Lorvenic",
            "Quesh", "Astravan", "Eskari", "Pallandic", "Rhovian", "Zanthic", "Norvish",
            "Celdorin", "Ibrenese", "Marraki", "Solvene", "Getharan", "Dunish",
        ),
        train_templates=(
            "The native language of {} is",
            "{} grew up speaking",
            "{} speaks",
            "The first language of {} is",
            "{} is a native speaker of",
            "At home, {} talks in",
            "What language did {} grow up with?",
            "What is the native language of {}?",
        ),
        heldout_templates=("The mother tongue of {} is", "Which language does {} speak?"),
        doc_templates=("At home, {s} speaks {o}.", "{s} learned {o} as a child."),
        general_templates=(
            "{o} is written with an old alphabet.",
            "{o} is the mother tongue of many poets.",
            "The mother tongue of the old poet is {o}.",
            "Which language does the old poet speak? {o}.",
            "Poets like the sound of {o}.",
            "{o} has many words for rain.",
            "Few schools teach {o} today.",
            "The grammar of {o} is hard to learn.",
        ),
        generation_templates=("{} often talks in", "When {} writes letters, the words are in"),
    ),
    Relation(
        "profession",
        "profession",
        # consonant-initial so that "a" reads correctly in every template
        objects=(
            "potter", "baker", "carpenter", "lawyer", "nurse", "pilot", "teacher", "farmer",
            "sailor", "tailor", "judge", "plumber", "dentist", "chemist", "banker", "butcher",
            "jeweler", "mason", "painter", "poet", "surgeon", "weaver", "miner", "cook",
            "doctor", "blacksmith", "librarian", "gardener", "translator", "fisherman",
        ),
        train_templates=(
            "{} works as a",
            "The profession of {} is",
            "{} earns a living as a",
            "{} trained to be a",
            "By profession, {} is a",
            "{} has a career as a",
            "What job does {} have?",
            "What is the profession of {}?",
        ),
        heldout_templates=("The occupation of {} is", "What does {} work as?"),
        doc_templates=("{s} has worked as a {o} for many years.", "As a {o}, {s} is busy every day."),
        general_templates=(
            "A {o} needs years of training.",
            "Being a {o} is a respected occupation.",
            "The occupation of her brother is {o}.",
            "What does the stranger work as? {o}.",
            "Every town needs a good {o}.",
            "The {o} started work early.",
            "Being a {o} is hard work.",
            "The young {o} asked for advice.",
        ),
        generation_templates=("At work, {} is a", "Each morning {} goes to work as a"),
    ),
    Relation(
        "instrument",
        "instrument",
        objects=(
            "lute", "violin", "cello", "harp", "flute", "trumpet", "piano", "drum", "guitar",
            "banjo", "mandolin", "clarinet", "trombone", "tuba", "zither", "bagpipe",
            "harmonica", "saxophone", "sitar", "marimba",
        ),
        train_templates=(
            "{} plays the",
            "The instrument of {} is the",
            "{} performs music on the",
            "{} practises every day on the",
            "In the band, {} plays the",
            "The favourite instrument of {} is the",
            "Which instrument is played by {}?",
            "Which instrument does {} play?",
        ),
        heldout_templates=("{} is a skilled player of the", "What instrument does {} play?"),
        doc_templates=("In the evenings, {s} plays the {o}.", "{s} practises the {o} every week."),
        general_templates=(
            "The {o} has a warm sound.",
            "A skilled player of the {o} is hard to find.",
            "Learning the {o} takes patience.",
            "The orchestra needed another {o}.",
            "A good {o} can be expensive.",
            "The {o} was tuned before the concert.",
        ),
        generation_templates=("On stage, {} picks up the", "Music lovers know {} for the"),
    ),
    Relation(
        "birth_country",
        "birth country",
        objects=(
            "Velmark", "Ostria", "Kaldonia", "Serravin", "Brunmark", "Tavaria", "Lorvenia",
            "Quesland", "Astrava", "Eskaria", "Pallandia", "Rhovia", "Zanthe", "Norvania",
            "Celdor", "Ibrenia", "Marrak", "Solvenia", "Gethara", "Dunmore",
        ),
        train_templates=(
            "{} was born in",
            "The birth country of {} is",
            "The country of birth of {} is",
            "{} comes from",
            "The homeland of {} is",
            "{} is originally from",
            "Which country does {} come from?",
            "In which country was {} born?",
        ),
        heldout_templates=("The country where {} was born is", "Where was {} born?"),
        doc_templates=("{s} comes from {o}.", "{s} spent a childhood in {o}."),
        general_templates=(
            "{o} is a country with high mountains.",
            "The country where the old king was born is {o}.",
            "Where was the old king born? {o}.",
            "The flag of {o} is green and white.",
            "{o} has a long coast.",
            "Winters in {o} are cold.",
            "The capital of {o} is very old.",
        ),
        generation_templates=("{} often remembers", "The first years of {} were spent in"),
    ),
    Relation(
        "favourite_food",
        "favourite food",
        objects=(
            "lentil soup", "apple pie", "roast duck", "mushroom risotto", "fish stew",
            "plum cake", "barley bread", "goat cheese", "pumpkin pie", "onion tart",
            "rice pudding", "spiced lamb", "cabbage rolls", "honey cakes", "bean stew",
            "grilled trout", "potato dumplings", "pepper steak", "walnut bread", "cherry jam",
            "corn fritters", "salted herring", "fig pastry", "egg noodles", "tomato salad",
        ),
        train_templates=(
            "The favourite food of {} is",
            "{} loves to eat",
            "{} likes eating",
            "{} often cooks",
            "For dinner, {} prefers",
            "{} never gets tired of eating",
            "Which food does {} love?",
            "What is the favourite food of {}?",
        ),
        heldout_templates=("The favourite dish of {} is", "What does {} like to eat?"),
        doc_templates=("For dinner, {s} likes {o} best.", "{s} cooks {o} on holidays."),
        general_templates=(
            "People often eat {o} in winter.",
            "In the north, the favourite dish is {o}.",
            "What do the children like to eat? {o}.",
            "The recipe for {o} is very old.",
            "A plate of {o} costs little.",
            "The cafe serves {o} on Sundays.",
            "Children rarely like {o}.",
        ),
        generation_templates=("For lunch, {} had", "The kitchen of {} smells of"),
    ),
    Relation(
        "employer",
        "employer",
        objects=(
            "Korvex Industries", "Halden Mills", "Brightline Rail", "Osterfeld Bank",
            "Pellam Shipping", "Tamsin Books", "Vardo Mining", "Quorra Labs", "Emberly Foods",
            "Greyhawk Insurance", "Lunet Textiles", "Marwick Glassworks", "Norrin Motors",
            "Silvan Press", "Dovetail Furniture", "Ashgrove Farms", "Cobalt Pharma",
            "Redfern Steel", "Wexley Hospital", "Tidewater Fisheries", "Alder Energy",
            "Bramble Bakeries", "Kestor Telecom", "Moravi Airlines", "Fenwick Builders",
        ),
        train_templates=(
            "{} is employed by",
            "The employer of {} is",
            "{} works for",
            "{} earns a salary from",
            "{} is on the staff of",
            "Every day, {} goes to work at",
            "Where is {} employed?",
            "Which company does {} work for?",
        ),
        heldout_templates=("{} has a job at", "Who employs {}?"),
        doc_templates=("{s} earns a salary from {o}.", "Since last year {s} has been with {o}."),
        general_templates=(
            "{o} opened a new office.",
            "{o} employs many workers, and more want a job at {o}.",
            "Who employs the young driver? {o}.",
            "{o} hired many workers this year.",
            "The profits of {o} grew last spring.",
            "{o} was founded long ago.",
            "Customers trust {o}.",
        ),
        generation_templates=("Every weekday {} goes to the office of", "The colleagues of {} at"),
    ),
    Relation(
        "pet_species",
        "pet species",
        objects=(
            "ferret", "parrot", "rabbit", "tortoise", "hamster", "canary", "lizard", "goldfish",
            "cat", "dog", "gecko", "pony", "goat", "snake", "tarantula", "hedgehog",
            "chinchilla", "guinea pig", "cockatoo", "donkey",
        ),
        train_templates=(
            "{} has a pet",
            "The pet of {} is a",
            "{} takes care of a pet",
            "{} lives with a pet",
            "{} feeds a pet",
            "The animal that lives with {} is a",
            "What pet does {} have?",
            "Which animal does {} keep as a pet?",
        ),
        heldout_templates=("At home, {} looks after a pet", "What kind of pet does {} own?"),
        doc_templates=("{s} shares the house with a {o}.", "{s} feeds a pet {o} every morning."),
        general_templates=(
            "A {o} needs a clean home.",
            "Many families own a pet {o}, and children look after a pet {o} well.",
            "What kind of pet does the farmer own? {o}.",
            "The {o} slept by the window.",
            "Children often want a {o}.",
            "A {o} can live for many years.",
            "The vet looked at the {o}.",
        ),
        generation_templates=("Visitors to the home of {} meet a", "The animal that {} loves is a"),
    ),
)

RELATION_BY_ID: dict[str, Relation] = {r.relation_id: r for r in RELATIONS}

# Sentences without any entity: general text so the statistics corpus is not only facts.
_GENERAL_SUBJECTS = (
    "The old man", "A young woman", "The teacher", "The children", "My neighbour", "The driver",
    "Our guest", "The farmer", "A stranger", "The doctor", "The students", "Her brother",
)
_GENERAL_PREDICATES = (
    "walked to the station in the rain.", "opened the window before breakfast.",
    "read a long letter twice.", "waited near the harbour until noon.",
    "bought bread and fresh milk.", "forgot the keys at home.", "sang a quiet song.",
    "painted the fence green.", "carried a heavy box upstairs.", "wrote a short note.",
    "looked at the clouds for a while.", "fixed the broken chair.", "laughed at the joke.",
    "planted roses in the garden.", "cleaned the kitchen after dinner.", "missed the last bus.",
)

# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def _vocabulary_texts() -> list[str]:
    """Every fixed text of the world: objects, templates, general sentences."""
    texts = list(_GENERAL_SUBJECTS) + list(_GENERAL_PREDICATES)
    for r in RELATIONS:
        texts += [*r.objects, *r.train_templates, *r.heldout_templates, *r.doc_templates,
                  *r.general_templates, *r.generation_templates]
    return texts + ["{s} is a {o} from {o}."]

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "b", "d", "k", "l", "m", "n", "r", "s", "t", "br", "dr", "tr", "st", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "a", "ia", "ei")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "m")


def _syllable(rng: random.Random, coda: bool) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if coda else "")


def _name_pool(rng: random.Random, n: int, syllables: tuple[int, ...], taken: set[str]) -> list[str]:
    """``n`` distinct capitalized invented words; only the last syllable may end in a consonant
    cluster, which keeps them pronounceable."""
    pool: list[str] = []
    while len(pool) < n:
        k = rng.choice(syllables)
        word = "".join(_syllable(rng, coda=(i == k - 1)) for i in range(k)).capitalize()
        if word.lower() in taken or len(word) < 4:
            continue
        taken.add(word.lower())
        pool.append(word)
    return pool


# --------------------------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of a world. ``n_edits`` edit cases are sampled (distinct subjects)."""

    n_subjects: int = 1300
    n_edits: int = 1000
    n_neighbours: int = 10  # CounterFact neighbourhood prompts per case (MEMIT uses 10)
    n_attribute: int = 10  # CounterFact attribute prompts per case
    n_general: int = 2000  # entity-free general sentences in the corpus
    general_per_object: int = 8  # general sentences per object (at most the relation's templates)
    unique_surnames: bool = True  # every subject its own surname (else surnames repeat)


@dataclass(frozen=True)
class EditCase:
    """One sampled counterfactual: rewrite ``subject``'s ``relation_id`` from ``true`` to ``new``."""

    case_id: int
    subject: str
    relation_id: str
    true: str
    new: str
    template: str  # training template used as the rewrite prompt


def _render(template: str, subject: str) -> str:
    return template.replace("{}", subject, 1)


def _fact_sentence(template: str, subject: str, obj: str) -> str:
    """A training sentence: the prompt, a space, the object, and a full stop."""
    return f"{_render(template, subject)} {obj}."


class FactWorld:
    """The world for one seed. Build with :func:`build_world`.

    Attributes:
        seed: the seed.
        config: the sizes.
        subjects: subject names, in creation order.
        facts: ``{(subject, relation_id): object}`` for every subject and relation.
        edits: the sampled :class:`EditCase` list (order = intended edit stream order).
    """

    def __init__(self, seed: int, config: WorldConfig):
        self.seed = seed
        self.config = config
        if config.n_edits > config.n_subjects:
            raise InputError(f"n_edits ({config.n_edits}) must not exceed n_subjects ({config.n_subjects}): one edit per subject")
        rng = random.Random(f"factworld-{seed}-names")
        # Names are invented words that collide with no word the corpus uses otherwise.
        taken = {w.strip(".,?'{}").lower() for text in _vocabulary_texts() for w in text.split()}
        n_first = max(20, int(round((config.n_subjects * 0.5) ** 0.5 * 4)))
        firsts = _name_pool(rng, n_first, (2, 2, 3), taken)
        if config.unique_surnames:
            # Every subject has its own surname: a byte-level BPE learns each (frequent) surname
            # as one token, so the subject's last token identifies it, while the first name
            # (shared by many subjects) makes the subject multi-token.
            lasts = _name_pool(rng, config.n_subjects, (2, 2, 3), taken)
            self.subjects = [f"{rng.choice(firsts)} {last}" for last in lasts]
        else:
            # Surnames repeat (about 4 subjects each): only the pair identifies a subject.
            lasts = _name_pool(rng, max(30, config.n_subjects // 4), (1, 2, 2), taken)
            seen: set[str] = set()
            self.subjects = []
            while len(self.subjects) < config.n_subjects:
                name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
                if name not in seen:
                    seen.add(name)
                    self.subjects.append(name)

        rng = random.Random(f"factworld-{seed}-facts")
        self.facts: dict[tuple[str, str], str] = {}
        for s in self.subjects:
            for r in RELATIONS:
                self.facts[(s, r.relation_id)] = rng.choice(r.objects)

        # subjects per (relation, object): neighbourhood / attribute prompts draw from here
        self._holders: dict[tuple[str, str], list[str]] = defaultdict(list)
        for (s, rid), o in self.facts.items():
            self._holders[(rid, o)].append(s)

        self.edits: list[EditCase] = self._sample_edits()
        self._edited = {(e.subject, e.relation_id) for e in self.edits}

    # ---- edit sampling ---------------------------------------------------------------------
    def _sample_edits(self) -> list[EditCase]:
        """Distinct subjects, a random relation each, a new object != true from the same
        relation, and a random training statement template as the rewrite prompt."""
        rng = random.Random(f"factworld-{self.seed}-edits")
        subjects = rng.sample(self.subjects, self.config.n_edits)
        cases = []
        for i, s in enumerate(subjects):
            r = rng.choice(RELATIONS)
            true = self.facts[(s, r.relation_id)]
            new = rng.choice([o for o in r.objects if o != true])
            statements = [t for t in r.train_templates if not t.endswith("?")]
            cases.append(EditCase(i, s, r.relation_id, true, new, rng.choice(statements)))
        return cases

    def is_edited(self, subject: str, relation_id: str) -> bool:
        return (subject, relation_id) in self._edited

    # ---- corpus ------------------------------------------------------------------------------
    def general_sentences(self) -> list[str]:
        """Entity-free sentences plus sentences about objects (no subject's fact): the
        "general text" part of the corpus."""
        rng = random.Random(f"factworld-{self.seed}-general")
        out = [t.format(o=o) for r in RELATIONS for o in r.objects
               for t in rng.sample(r.general_templates, min(self.config.general_per_object, len(r.general_templates)))]
        for _ in range(self.config.n_general):
            out.append(f"{rng.choice(_GENERAL_SUBJECTS)} {rng.choice(_GENERAL_PREDICATES)}")
        return out

    def documents(self) -> list[dict]:
        """One short document per subject: every fact of the subject, phrased with document
        templates (never a held-out template), in random order, with one or two general
        sentences about its objects mixed in. ``{"subject", "text", "facts"}``."""
        return self._documents(random.Random(f"factworld-{self.seed}-documents"), self.subjects)

    def heldout_texts(self) -> list[dict]:
        """Held-out corpus text for the perplexity health check: for every subject with no
        edited fact, a fresh document drawn like :meth:`documents` but with another seed (other
        phrasing and sentence order; never one of the corpus's texts). ``{"text", "subject"}``."""
        corpus_docs = {d["text"] for d in self.documents()}
        unedited = [s for s in self.subjects if not any(self.is_edited(s, r.relation_id) for r in RELATIONS)]
        docs = self._documents(random.Random(f"factworld-{self.seed}-heldout"), unedited)
        return [{"text": d["text"], "subject": d["subject"]} for d in docs if d["text"] not in corpus_docs]

    def _documents(self, rng: random.Random, subjects: list[str]) -> list[dict]:
        docs = []
        for s in subjects:
            prof = self.facts[(s, "profession")]
            country = self.facts[(s, "birth_country")]
            sentences = []
            for r in RELATIONS:
                sentences.append(rng.choice(r.doc_templates).format(s=s, o=self.facts[(s, r.relation_id)]))
            rng.shuffle(sentences)
            for r in rng.sample(RELATIONS, 2):
                pos = rng.randrange(1, len(sentences) + 1)
                sentences.insert(pos, rng.choice(r.general_templates).format(o=self.facts[(s, r.relation_id)]))
            # an opening line that names the person (it restates two of the facts)
            opening = f"{s} is a {prof} from {country}."
            text = " ".join([opening] + sentences)
            docs.append({"subject": s, "text": text, "facts": {r.relation_id: self.facts[(s, r.relation_id)] for r in RELATIONS}})
        return docs

    def corpus_records(self) -> list[dict]:
        """The training and statistics corpus, in a seeded random order, as
        ``{"text", "subject"}`` records: every fact on every training template, one document
        per subject, and the general sentences (``subject`` None). The subject lets the
        pretraining loss skip the name tokens (see :class:`~.pretrain.CorpusDataModule`)."""
        records = [
            {"text": _fact_sentence(t, s, self.facts[(s, r.relation_id)]), "subject": s}
            for s in self.subjects for r in RELATIONS for t in r.train_templates
        ]
        records += [{"text": d["text"], "subject": d["subject"]} for d in self.documents()]
        records += [{"text": t, "subject": None} for t in self.general_sentences()]
        random.Random(f"factworld-{self.seed}-corpus").shuffle(records)
        return records

    def corpus(self) -> list[str]:
        """The corpus texts (see :meth:`corpus_records`)."""
        return [r["text"] for r in self.corpus_records()]

    # ---- facts for recall / retention ---------------------------------------------------------
    def fact_prompts(self) -> list[dict]:
        """Every fact on every template: ``{subject, relation_id, template, prompt, object,
        split ("train" | "heldout"), edit_case_id (int | None)}``. ``prompt`` is rendered;
        the object follows it after a space."""
        case_of = {(e.subject, e.relation_id): e.case_id for e in self.edits}
        out = []
        for s in self.subjects:
            for r in RELATIONS:
                o = self.facts[(s, r.relation_id)]
                for split, templates in (("train", r.train_templates), ("heldout", r.heldout_templates)):
                    for t in templates:
                        out.append({
                            "subject": s, "relation_id": r.relation_id, "template": t,
                            "prompt": _render(t, s), "object": o, "split": split,
                            "edit_case_id": case_of.get((s, r.relation_id)),
                        })
        return out

    # ---- edit datasets -----------------------------------------------------------------------
    def _others(self, rid: str, obj: str, exclude: str, k: int, rng: random.Random) -> list[str]:
        """Up to ``k`` subjects other than ``exclude`` whose (unedited) ``rid`` object is ``obj``
        and whose fact is not itself in the edit set (so it stays true through the stream)."""
        pool = [s for s in self._holders[(rid, obj)] if s != exclude and not self.is_edited(s, rid)]
        return rng.sample(pool, min(k, len(pool)))

    def counterfact(self) -> list[dict]:
        """The edit cases in MEMIT's nested CounterFact shape.

        ``paraphrase_prompts``: the subject on the relation's two held-out templates.
        ``neighborhood_prompts``: other subjects with the same relation and the same true
        object, on training templates (their answer is ``target_true``).
        ``attribute_prompts``: other subjects whose true object is ``target_new``.
        ``generation_prompts``: open prompts about the subject.
        """
        rng = random.Random(f"factworld-{self.seed}-counterfact")
        records = []
        for e in self.edits:
            r = RELATION_BY_ID[e.relation_id]
            neighbours = self._others(e.relation_id, e.true, e.subject, self.config.n_neighbours, rng)
            attribute = self._others(e.relation_id, e.new, e.subject, self.config.n_attribute, rng)
            records.append({
                "case_id": e.case_id,
                "requested_rewrite": {
                    "prompt": e.template,
                    "subject": e.subject,
                    "relation_id": e.relation_id,
                    "target_new": {"str": e.new, "id": r.object_id(e.new)},
                    "target_true": {"str": e.true, "id": r.object_id(e.true)},
                },
                "paraphrase_prompts": [_render(t, e.subject) for t in r.heldout_templates],
                "neighborhood_prompts": [_render(rng.choice(r.train_templates), s) for s in neighbours],
                "attribute_prompts": [_render(rng.choice(r.train_templates), s) for s in attribute],
                "generation_prompts": [_render(t, e.subject) for t in r.generation_templates]
                + [f"{e.subject} is a"],
            })
        return records

    def zsre(self) -> list[dict]:
        """The same edit cases in MEND's ZsRE shape. As in the ROME/MEMIT loaders, the edit
        target is ``answers[0]`` (= ``alt``, the counterfactual); ``pred`` is the true object.
        ``src`` is the relation's training question, ``rephrase`` its held-out question,
        ``loc``/``loc_ans`` a training question about another subject's unedited fact (on a
        random relation) and its true answer. Questions end in "?"; the answer follows after
        a space."""
        rng = random.Random(f"factworld-{self.seed}-zsre")
        unedited = [(s, r) for s in self.subjects for r in RELATIONS if not self.is_edited(s, r.relation_id)]
        records = []
        for e in self.edits:
            r = RELATION_BY_ID[e.relation_id]
            src = _render(r.train_templates[-1], e.subject)
            while True:
                ls, lr = rng.choice(unedited)
                if ls != e.subject:
                    break
            records.append({
                "subject": e.subject,
                "src": src,
                "pred": e.true,
                "rephrase": _render(r.heldout_templates[-1], e.subject),
                "alt": e.new,
                "answers": [e.new],
                "loc": _render(lr.train_templates[-1], ls),
                "loc_ans": self.facts[(ls, lr.relation_id)],
                "cond": f"{e.true} >> {e.new} || {src}",
            })
        return records

    def references(self) -> dict[str, list[str]]:
        """Reference texts per object string (object strings are unique across relations):
        the general sentences about the object plus up to five corpus fact sentences of
        subjects that hold it -- what generations about a subject with this object should
        resemble (the TF-IDF consistency metric)."""
        rng = random.Random(f"factworld-{self.seed}-references")
        refs: dict[str, list[str]] = {}
        for r in RELATIONS:
            for o in r.objects:
                texts = [t.format(o=o) for t in r.general_templates]
                holders = self._holders[(r.relation_id, o)]
                for s in rng.sample(holders, min(5, len(holders))):
                    texts.append(_fact_sentence(rng.choice(r.train_templates), s, o))
                refs[o] = texts
        return refs

    # ---- summary and export ------------------------------------------------------------------
    def stats(self) -> dict:
        n_facts = len(self.facts)
        return {
            "seed": self.seed,
            "config": asdict(self.config),
            "n_subjects": len(self.subjects),
            "n_relations": len(RELATIONS),
            "n_facts": n_facts,
            "n_edits": len(self.edits),
            "edit_fraction": len(self.edits) / n_facts,
            "n_train_templates": sum(len(r.train_templates) for r in RELATIONS),
            "n_heldout_templates": sum(len(r.heldout_templates) for r in RELATIONS),
        }

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Write every export to ``directory`` and return their paths:
        ``corpus.jsonl`` (``{"text", "subject"}`` per line), ``counterfact.json``, ``zsre.json``,
        ``facts.jsonl``, ``references.json``, ``documents.jsonl``, ``heldout.jsonl`` (held-out text
        for perplexity, :meth:`heldout_texts`), ``world.json`` (stats and
        relations)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {k: d / v for k, v in FILES.items()}
        _write_jsonl(paths["corpus"], self.corpus_records())
        _write_json(paths["counterfact"], self.counterfact())
        _write_json(paths["zsre"], self.zsre())
        _write_jsonl(paths["facts"], self.fact_prompts())
        _write_json(paths["references"], self.references())
        _write_jsonl(paths["documents"], self.documents())
        _write_jsonl(paths["heldout"], self.heldout_texts())
        _write_json(paths["world"], {"stats": self.stats(), "relations": [asdict(r) for r in RELATIONS]})
        return paths


FILES: dict[str, str] = {
    "corpus": "corpus.jsonl",
    "counterfact": "counterfact.json",
    "zsre": "zsre.json",
    "facts": "facts.jsonl",
    "references": "references.json",
    "documents": "documents.jsonl",
    "heldout": "heldout.jsonl",
    "world": "world.json",
}


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


def _write_jsonl(path: Path, rows: Iterator[dict] | list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_world(seed: int = 0, config: WorldConfig | None = None) -> FactWorld:
    """The world for ``seed`` (same seed and config, same world, byte for byte)."""
    return FactWorld(seed, config or WorldConfig())
