"""Statistics corpora without Wikipedia: natural English text available offline for the key
second moments ``K0 K0^T`` (the knowledge an edit must preserve).

Five sources, each written as JSONL (``{"text", "source"}``) plus a ``manifest.json`` that
records how it was built (the statistics cache is keyed by the file's content hash, so a cache
entry belongs to exactly one built corpus):

* ``generated``: text the model itself samples from diverse openings (top-k, seeded; cached).
  It follows the model's own distribution, as pretraining text does, at the cost of sampling.
* ``samples``: the long-form answers of benchmark samples (``answer`` fields of the JSON files
  in a directory such as ``../shared/data``); not in a fresh clone.
* ``pydoc``: the English prose every CPython installation ships (``pydoc_data.topics``, the
  language reference's topics); free, but technical.
* ``docstrings``: ``n`` paragraphs of English prose from the standard library's docstrings
  (:func:`docstring_texts`; never the ``pydoc`` texts): held-out text for perplexity when the
  statistics read ``pydoc``.
* ``facts``: true statements of the real-facts set's candidate facts (``realfacts:<model>``,
  :func:`fact_texts`), several per text, in the relations' phrasings; never about a probe's
  subject. Knowledge of the kind an edit must not disturb.

Kinds combine with ``+`` (``corpus:pydoc+facts@<model>``): the texts of each, shuffled together.

Texts that mention an edited subject are dropped (``exclude``: the subjects of the edit file),
so the preserved statistics never contain the facts being changed.

In configs: ``stats.corpus: corpus:pydoc`` or ``corpus:generated@<model>`` (built on first use
under ``checkpoints/corpora``), with ``corpus:<kind>?exclude=<edit file resource>``; options
``n=<texts>`` and ``tokens=<new tokens per text>`` size ``generated``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from pydoc_data.topics import topics

import torch

from lightning_edit import resources
from lightning_edit.builtin.realfacts import RELATIONS
from lightning_edit.builtin.realfacts import resolve as realfacts_resolve
from lightning_edit.data.formats import records_to_requests
from lightning_edit.data.sources import load_records
from lightning_edit.engine.loading import load_pretrained
from lightning_edit.errors import InputError, MissingFileError
from lightning_edit.evaluation.scoring import inference, model_device

PREFIX = "corpus:"
KINDS = ("generated", "samples", "pydoc", "facts", "docstrings")

# openings across topics and registers (the model continues each one several times)
OPENINGS = (
    "The history of", "In the early morning,", "Scientists have found that", "The recipe calls for", "When I was a child,",
    "The new law requires", "According to the report,", "The team won the", "Researchers at the university", "The river flows",
    "Music has always", "The company announced", "Once upon a time,", "The best way to learn", "During the war,",
    "The museum displays", "Climate change is", "The patient was", "In mathematics, a", "The film tells the story of",
    "Farmers in the region", "The computer program", "My favourite book is", "The election results", "Healthy eating means",
    "The ancient city of", "Students should", "The weather today", "A good manager", "The painting shows",
    "The train left the station", "In biology, cells", "The price of oil", "Her first novel", "The mountain village",
    "To build a house,", "The church was built", "Football fans", "The ocean covers", "The king ordered",
    "Modern medicine", "The small shop on the corner", "Electricity is", "The festival takes place", "The bird species",
    "Learning a language", "The bridge was designed", "The restaurant serves", "In the summer of", "The court ruled",
)


def _stable_rng(*parts) -> random.Random:
    return random.Random(int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16], 16))


def subjects_of(edit_file: str | None) -> list[str]:
    """The subjects of the edit records in ``edit_file`` (any supported format)."""
    if not edit_file:
        return []

    return sorted({r.subject for r in records_to_requests(load_records(resources.resolve(edit_file)))})


def drop_mentions(texts: Iterable[dict], subjects: Sequence[str]) -> tuple[list[dict], int]:
    """Texts that mention none of ``subjects`` (whole-word, case-sensitive) and how many were dropped."""
    if not subjects:
        return list(texts), 0
    pat = re.compile(r"\b(?:" + "|".join(re.escape(s) for s in sorted(subjects, key=len, reverse=True)) + r")\b")
    kept, dropped = [], 0
    for t in texts:
        if pat.search(t["text"]):
            dropped += 1
        else:
            kept.append(t)
    return kept, dropped


def pydoc_texts(min_chars: int = 200) -> list[dict]:
    """Paragraphs of the Python language reference that CPython ships (``pydoc_data.topics``)."""
    out = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(line.strip() for line in para.splitlines() if line.strip())
            # prose only: no code listings, grammar rules or tables
            if len(text) >= min_chars and text[0].isupper() and not re.search(r"(>>>|::=|\+---|^\s*def )", para):
                out.append({"text": text, "source": f"pydoc:{name}"})
    return out


# docstrings that are no prose: code, doctest, signatures, markup, option tables
_NOT_PROSE = re.compile(r">>>|::=|\+---|^\s*def |[{}=<>|@$]|\w\(|\)\.|__|\.\.\s|`|^\s*[-*:]\s", re.M)
# never read: the statistics corpus (pydoc_data), tests, IDLE, demos, encodings, installed packages
_SKIP_DIRS = {"test", "tests", "idlelib", "pydoc_data", "site-packages", "dist-packages", "lib2to3", "turtledemo",
              "encodings", "ensurepip", "__phello__", "__pycache__"}


def _sentences(text: str, min_chars: int = 40) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) >= min_chars]


def docstring_texts(n_texts: int, exclude: Sequence[str] = (), min_chars: int = 200, per_file: int = 2,
                    seed: int = 0) -> list[dict]:
    """``n_texts`` paragraphs of English prose from the docstrings of the standard library's own
    source files (``<stdlib>/*.py`` and one package level down, read with :mod:`ast`, nothing
    imported), for the report's next-word accuracy: held-out natural text that every CPython
    ships and that no statistics corpus here reads.

    * Never from ``pydoc_data`` (the ``corpus:pydoc`` source; the report's perplexity texts);
      a paragraph sharing any sentence of 40+ characters with that corpus is dropped too.
    * Prose only: paragraphs of at least ``min_chars`` characters that start upper-case and hold
      no code, doctest, signature or markup characters.
    * ``exclude``: a paragraph naming any of these strings (whole words; the edit stream's
      subjects and targets) is dropped, so the check never reads the edited facts.
    * At most ``per_file`` paragraphs per source file, files in a seeded order (``seed``):
      deterministic for a Python version. ``{"text", "source": "stdlib:<path>"}``."""
    if n_texts <= 0:
        return []
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in [*root.glob("*.py"), *root.glob("*/*.py")]
                   if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    _stable_rng("docstrings", seed).shuffle(files)

    held = set()  # every sentence of the pydoc corpus's source, whitespace as the paragraphs below join it
    for raw in topics.values():
        held.update(_sentences(" ".join(raw.split())))
    out: list[dict] = []
    seen: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        found = []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for para in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                text = " ".join(para.split())
                if len(text) >= min_chars and text[0].isupper() and not _NOT_PROSE.search(para) and text not in seen \
                        and not any(s in held for s in _sentences(text)):
                    seen.add(text)
                    found.append({"text": text, "source": f"stdlib:{path.relative_to(root).as_posix()}"})
        found, _ = drop_mentions(found, [e.strip() for e in exclude if e and e.strip()])
        out.extend(found[:per_file])
        if len(out) >= n_texts:
            break
    return out[:n_texts]


def fact_texts(model_name: str, per_text: int = 6, seed: int = 0, exclude: Sequence[str] = ()) -> list[dict]:
    """True statements of every candidate fact of the real-facts set of ``model_name``
    (``known.json``: the facts the known-fact filter ranked, known to the model or not), each in
    a seeded one of its relation's phrasings, ``per_text`` to a text, in a seeded order; never a
    statement that names a subject of the set's probes (the retention probes stay unseen). The edited
    subjects (``exclude``) are dropped statement by statement, before the grouping (a statement
    naming one, as subject or as object, is left out; the rest of its group stays)."""
    detail = json.loads(Path(realfacts_resolve(f"realfacts:{model_name}/known")).read_text()).get("facts_detail", [])
    probes = Path(realfacts_resolve(f"realfacts:{model_name}/probes"))
    held = {json.loads(line)["subject"] for line in probes.read_text().splitlines() if line.strip()}
    rng = _stable_rng("facts", model_name, seed)
    sentences = []
    for d in detail:
        rel = RELATIONS.get(d["relation_id"])
        if rel is not None and d["subject"] not in held:
            sentences.append({"text": rng.choice(rel.templates).replace("{}", d["subject"], 1) + " " + d["object"] + "."})
    sentences, _ = drop_mentions(sentences, sorted(held | set(exclude)))  # nor one naming a probe's or an edited subject
    rng.shuffle(sentences)
    out = []
    for i in range(0, len(sentences), per_text):
        part = sentences[i:i + per_text]
        # edited subjects are gone already, so the corpus's own ``exclude`` pass drops none of these
        out.append({"text": " ".join(x["text"] for x in part), "source": f"facts:{model_name}"})
    return out


def sample_texts(directory: str | Path, min_chars: int = 200) -> list[dict]:
    """Long-form texts of benchmark sample files: the ``answer`` / ``text`` fields (EditEverything,
    UnKEBench) of at least ``min_chars`` characters (never AKEW's ``fact_new_uns``: counterfactual)."""
    out = []
    for f in sorted(Path(directory).glob("*.json")):
        data = json.loads(f.read_text())
        stack = list(data if isinstance(data, list) else [data])
        while stack:
            item = stack.pop(0)
            if isinstance(item, dict):
                for k, v in item.items():
                    if k in ("answer", "text") and isinstance(v, str) and len(v) >= min_chars:
                        out.append({"text": v.strip(), "source": f"{f.name}:{k}"})
                    elif isinstance(v, (list, dict)):
                        stack.append(v)
            elif isinstance(item, list):
                stack.extend(item)
    return out


@torch.no_grad()
def generated_texts(model, tokenizer, n_texts: int = 200, max_new_tokens: int = 96, batch_size: int = 16, seed: int = 0,
                    top_k: int = 40) -> list[dict]:
    """``n_texts`` continuations sampled (top-k, seeded generator, no global RNG state) by the
    model from :data:`OPENINGS`, batched with left padding and a KV cache."""
    device = model_device(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = {tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>") if t in tokenizer.get_vocab())}
    out = []
    with inference(model):
        for a in range(0, n_texts, batch_size):
            starts = [OPENINGS[i % len(OPENINGS)] for i in range(a, min(a + batch_size, n_texts))]
            rows = [tokenizer(s, add_special_tokens=True)["input_ids"] for s in starts]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            done = torch.zeros(len(rows), dtype=torch.bool)
            past, cur, new = None, ids, []
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            for _ in range(max_new_tokens):
                o = model(input_ids=cur.to(device), attention_mask=mask.to(device), position_ids=pos[:, -cur.shape[1]:].to(device),
                          past_key_values=past, use_cache=True)
                past = o.past_key_values
                logits = o.logits[:, -1].float().cpu()
                top = logits.topk(top_k, dim=-1)
                pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)
                nxt = top.indices.gather(-1, pick).squeeze(-1)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                done |= torch.tensor([int(t) in stops for t in nxt])
                new.append(nxt)
                cur = nxt[:, None]
                mask = torch.cat([mask, (~done).long()[:, None] | 1], dim=1)
                pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
                if done.all():
                    break
            toks = torch.stack(new, 1)
            for s, r, t in zip(starts, rows, toks.tolist()):
                cut = next((i for i, x in enumerate(t) if x in stops), len(t))
                text = tokenizer.decode(r + t[:cut], skip_special_tokens=True).strip()
                out.append({"text": text, "source": f"generated:{s}"})
    return out


def build_corpus(kind: str, out: str | Path, model_name: str | None = None, exclude: str | None = None,
                 samples_dir: str | None = None, n_texts: int = 200, max_new_tokens: int = 96, seed: int = 0) -> Path:
    """Write (or reuse) corpus ``kind`` as ``out/corpus.jsonl`` with ``out/manifest.json``."""
    parts = kind.split("+")
    bad = [k for k in parts if k not in KINDS]
    if bad:
        raise InputError(f"unknown statistics corpus kind {', '.join(map(repr, bad))}; choose from {KINDS} (several joined with '+')")
    if len(set(parts)) != len(parts):
        raise InputError(f"statistics corpus {kind!r} names a kind twice")
    out = Path(out)
    subjects = subjects_of(exclude)
    settings = {"kind": kind, "model": model_name, "exclude": exclude, "n_excluded_subjects": len(subjects),
                "samples_dir": samples_dir, "n_texts": n_texts, "max_new_tokens": max_new_tokens, "seed": seed, "version": 1}
    manifest, path = out / "manifest.json", out / "corpus.jsonl"
    if manifest.is_file() and path.is_file():
        try:
            if json.loads(manifest.read_text()).get("settings") == settings:
                return path
        except (OSError, json.JSONDecodeError):
            pass
    texts, per_kind = [], {}
    for part in parts:
        got = _kind_texts(part, model_name, samples_dir, n_texts, max_new_tokens, seed, subjects)
        per_kind[part] = len(got)
        texts += got
    texts, dropped = drop_mentions(texts, subjects)
    _stable_rng(kind, seed).shuffle(texts)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(t) + "\n" for t in texts))
    os.replace(tmp, path)
    manifest.write_text(json.dumps({"settings": settings, "texts": len(texts), "texts_per_kind": per_kind,
                                    "dropped_mentioning_edited_subjects": dropped,
                                    "chars": sum(len(t["text"]) for t in texts)}, indent=1))
    return path


def _kind_texts(kind: str, model_name: str | None, samples_dir: str | None, n_texts: int, max_new_tokens: int,
                seed: int, subjects: Sequence[str] = ()) -> list[dict]:
    if kind == "pydoc":
        return pydoc_texts()
    if kind == "docstrings":
        return docstring_texts(n_texts, seed=seed)
    if kind == "samples":
        if not samples_dir or not Path(samples_dir).is_dir():
            raise MissingFileError(f"statistics corpus 'samples' needs a directory of sample files, got {samples_dir!r}")
        return sample_texts(samples_dir)
    if not model_name:
        raise InputError(f"statistics corpus '{kind}' needs the model (corpus:{kind}@<model>)")
    if kind == "facts":
        return fact_texts(model_name, seed=seed, exclude=subjects)

    model, tok = load_pretrained(model_name, "float32")
    print(f"[lightning-edit] sampling {n_texts} texts from {model_name} for the statistics corpus (once)", file=sys.stderr)
    return generated_texts(model, tok, n_texts, max_new_tokens, seed=seed)


def resolve(spec: str, root: str | None = None) -> str:
    """``corpus:<kind>[@<model>][?exclude=<edit file>][&samples=<dir>][&n=<texts>]`` -> the JSONL file."""
    rest = spec[len(PREFIX):]
    head, _, query = rest.partition("?")
    kind, _, model_name = head.partition("@")
    opts = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
    unknown = set(opts) - {"exclude", "samples", "n", "tokens"}
    if unknown:
        raise InputError(f"{spec!r}: unknown corpus option(s) {sorted(unknown)} (exclude, samples, n, tokens)")
    root = Path(root or os.environ.get("LIGHTNING_EDIT_CORPORA", "checkpoints/corpora"))
    tag = hashlib.sha256(rest.encode()).hexdigest()[:10]
    return str(build_corpus(kind, root / f"{kind}-{tag}", model_name or None, opts.get("exclude"), opts.get("samples"),
                            int(opts.get("n", 200)), int(opts.get("tokens", 96))))
