"""Key statistics: the uncentered second moment ``E[k k^T]`` of each edit layer's down-projection
input over a text corpus, computed in one streamed pass for all layers at once and cached.

Why it is fast: texts are packed into full ``max_length`` blocks (no padding), every edit layer
is captured in the same forward pass, and the forward stops after the last edit layer.
Why it is safe to reuse: a cache entry is keyed (file name *and* stored metadata) by a
fingerprint of the model (config + the weights that influence that layer's keys), the layer,
the corpus identity, the sample count, the block length and the dtype; anything else is a miss.
Stored as ``sum`` (float64) + ``count`` so partial sums (other processes, an interrupted run)
add up exactly; an interrupted run resumes from its last partial file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.bars import progress_bar
from lightning_edit.engine.closed_form import null_space_projector
from lightning_edit.engine.files import CorruptFileError, atomic_save_file, read_verified, short_hash, tensor_fingerprint
from lightning_edit.errors import InputError, MissingFileError, require_local_path
from lightning_edit.resources import resolve

STATS_FORMAT_VERSION = 2  # 2: entries carry a content hash per tensor


@dataclass
class StatsConfig:
    """Where the preserved-knowledge statistics come from.

    Args:
        corpus: where the texts come from. The default, ``corpus:pydoc`` (the English prose of
            the language reference every CPython ships), works offline for any model; other
            offline corpora: ``corpus:generated@<model>`` (text the model samples) and
            ``corpus:<kind>?exclude=<edit file>`` (texts naming an edited subject dropped). A
            local text/JSON/JSONL/parquet file (or directory, or glob), or a ``datasets`` hub id
            where a hub is reachable (the papers: ``wikitext`` with ``corpus_name:
            wikitext-103-raw-v1``, 100,000 texts), or ``factworld:<preset>/corpus``.
        corpus_name: the dataset configuration name for hub datasets (e.g. ``wikitext-103-raw-v1``).
        split: dataset split.
        text_field: the column holding the text.
        n_samples: number of texts to read (the reference uses 100,000 Wikipedia articles).
        max_length: tokens per packed block.
        batch_size: blocks per forward pass.
        dtype: dtype the keys' outer products ``k k^T`` are computed in (``float32`` or
            ``float64``; the sums are float64 either way, and the model runs in its own dtype).
        encoding: how corpus texts become model inputs: ``packed`` (the first ``n_samples`` texts
            tokenized and packed, EOS-separated, into full ``max_length`` blocks: no padding, texts
            cross block boundaries) or ``per_text`` (as the reference code: one text per row, from
            its BOS, truncated to ``max_length``, padding not counted).
        cache_dir: where sums, counts and projectors are cached.
        save_every: write a resumable partial sum every this many batches (0 = never).
    """

    corpus: str = "corpus:pydoc"
    corpus_name: str | None = None
    split: str = "train"
    text_field: str = "text"
    n_samples: int = 100_000
    max_length: int = 256
    batch_size: int = 16
    dtype: str = "float32"
    encoding: str = "packed"
    cache_dir: str = "checkpoints/stats"
    save_every: int = 50


def model_fingerprint(adapter: ModelAdapter, layer: int) -> str:
    """Identity of everything that determines layer ``layer``'s keys: the config and every
    parameter outside the blocks after ``layer``."""
    cfg = getattr(adapter.model, "config", None)
    cfg_json = cfg.to_json_string(use_diff=False) if cfg is not None else type(adapter.model).__name__
    cfg_json = json.dumps({k: v for k, v in json.loads(cfg_json).items() if k not in ("dtype", "torch_dtype", "transformers_version", "_name_or_path")}, sort_keys=True) if cfg is not None else cfg_json
    parts = [cfg_json, adapter.spec.mlp_down_template.format(layer)]
    for name, p in adapter.embedding_and_layer_params(layer):
        parts.append(name)
        parts.append(tensor_fingerprint(p))
    return short_hash(*parts)


def _corpus_path(cfg: StatsConfig) -> str:
    return resolve(cfg.corpus)


_CORPUS_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".csv")


def corpus_files(cfg: StatsConfig) -> list[Path] | None:
    """The local files of the corpus, sorted: a file, a directory's files, or the files a glob
    pattern (``data/*.jsonl``, ``shards/**/*.parquet``) matches; None for a hub dataset id."""
    raw = _corpus_path(cfg)
    path = Path(raw)
    if path.exists():
        return sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    if glob.has_magic(raw):
        files = sorted(Path(p) for p in glob.glob(raw, recursive=True) if Path(p).is_file())
        if not files:
            raise MissingFileError(f"statistics corpus {cfg.corpus!r}: the pattern matches no file")
        return files
    require_local_path(raw, "statistics corpus")  # e.g. corpus.jsonl: never a hub id
    return None


def corpus_fingerprint(cfg: StatsConfig) -> str:
    """Identity of the corpus: for local files (a file, a directory, or every file a glob
    matches) their names, sizes and content hash (the first and last 8 MiB for big files); for
    hub datasets the id, config name and split."""
    files = corpus_files(cfg)
    parts: list = [cfg.split, cfg.text_field, cfg.corpus_name]
    if files is not None:
        for f in files:
            size = f.stat().st_size
            parts += [f.name, size]
            with open(f, "rb") as fh:
                head = fh.read(8 << 20)
                parts.append(hashlib.blake2b(head, digest_size=12).hexdigest())
                if size > 16 << 20:
                    fh.seek(-(8 << 20), os.SEEK_END)
                    parts.append(hashlib.blake2b(fh.read(), digest_size=12).hexdigest())
                elif size > 8 << 20:
                    parts.append(hashlib.blake2b(fh.read(), digest_size=12).hexdigest())
    else:
        parts.append(cfg.corpus)
    return short_hash(*parts)


def corpus_provenance(cfg: StatsConfig) -> dict[str, str]:
    """Where a cache entry's texts came from, stored in its metadata: the config's ``corpus``
    and, for a built corpus (``corpus:...``), its ``manifest.json`` (kind, model, exclusions,
    texts per kind) as compact JSON."""
    out = {"corpus_spec": str(cfg.corpus)}
    try:
        manifest = Path(_corpus_path(cfg)).parent / "manifest.json"
        if str(cfg.corpus).startswith("corpus:") and manifest.is_file():
            out["corpus_manifest"] = json.dumps(json.loads(manifest.read_text()), separators=(",", ":"), sort_keys=True)
    except (OSError, ValueError):
        pass
    return out


def iter_corpus_texts(cfg: StatsConfig, shard: int = 0, num_shards: int = 1) -> Iterator[str]:
    """Stream ``n_samples`` non-empty texts (this process's shard of them) via ``datasets``."""
    import datasets

    path = Path(_corpus_path(cfg))
    files = corpus_files(cfg)
    if files is not None and not path.exists():  # a glob: exactly the files the fingerprint hashed
        exts = {f.suffix.lower() for f in files if f.suffix.lower() in _CORPUS_SUFFIXES}
        if len(exts) != 1:
            raise InputError(f"statistics corpus {cfg.corpus!r}: the pattern must match files of one type "
                             f"({', '.join(_CORPUS_SUFFIXES)}), got {sorted({f.suffix for f in files})}")
        ext = exts.pop()
        builder = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}[ext]
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files if f.suffix.lower() == ext], split=cfg.split, streaming=True)
    elif path.exists():
        suffix = (path.suffix if path.is_file() else "").lower()
        builder = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
        if builder is None and path.is_dir():
            exts = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
            builder = next((b for e, b in ((".parquet", "parquet"), (".jsonl", "json"), (".json", "json"), (".txt", "text")) if e in exts), None)
        if builder is None:
            raise InputError(f"statistics corpus {cfg.corpus!r}: cannot tell its format (use .txt, .json, .jsonl, .parquet or .csv)")
        data_files = str(path) if path.is_file() else [str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in (".txt", ".json", ".jsonl", ".parquet", ".csv")]
        ds = datasets.load_dataset(builder, data_files=data_files, split=cfg.split, streaming=True)
    else:
        try:
            ds = datasets.load_dataset(cfg.corpus, cfg.corpus_name, split=cfg.split, streaming=True)
        except Exception as err:  # ConnectionError offline, DatasetNotFoundError, a bad config name or split
            raise MissingFileError(
                f"statistics corpus {cfg.corpus!r} (corpus_name {cfg.corpus_name!r}, split {cfg.split!r}) is not a local file, "
                f"directory or pattern, and loading it as a Hugging Face hub dataset failed ({type(err).__name__}: {err}); "
                "offline, pass a local .txt / .json / .jsonl / .parquet / .csv file or a corpus:pydoc corpus") from err
    n = 0
    for i, rec in enumerate(ds):
        if n >= cfg.n_samples:
            break
        if cfg.text_field not in rec:
            raise InputError(f"statistics corpus {cfg.corpus!r} has no field {cfg.text_field!r} (fields: {sorted(rec)}); set text_field")
        text = rec[cfg.text_field]
        if not text or not text.strip():
            continue
        if n % num_shards == shard:
            yield text
        n += 1


_DOCUMENT_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def document_separator_ids(tokenizer) -> list[int]:
    """The token(s) that end a document in pretraining, appended after every packed text.

    The EOS of an instruct model is often its end-of-turn token (SmolLM2-Instruct's
    ``<|im_end|>``, Llama-3-Instruct's ``<|eot_id|>``), which never separates documents: a token
    that appears in the chat template is passed over for the first of EOS, the usual document
    separators and BOS that the vocabulary has. A BOS the tokenizer already prepends to every
    text is not added again."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    vocab = tokenizer.get_vocab()
    for token in (tokenizer.eos_token, *_DOCUMENT_SEPARATORS, tokenizer.bos_token):
        if not token or token not in vocab or token in template:
            continue
        tid = vocab[token]
        if token == tokenizer.bos_token and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tid]:
            return []
        return [tid]
    return []


def packed_blocks(tokenizer, texts: Iterator[str], max_length: int, batch_size: int, shard: int = 0, num_shards: int = 1) -> Iterator[torch.Tensor]:
    """Tokenize texts and pack them (each followed by the model's document separator,
    :func:`document_separator_ids`) into ``(batch_size, max_length)`` blocks;
    the last batch may be shorter and its last block partial (returned with its true length).

    With ``num_shards > 1`` only blocks ``shard, shard + num_shards, ...`` are kept: the shards
    of all processes together are exactly the unsharded blocks (sharding the *texts* instead
    would pack other token contexts, so the summed statistics would differ from one process's).
    """
    sep = document_separator_ids(tokenizer)
    buf: list[int] = []
    blocks: list[list[int]] = []
    n = 0  # blocks packed so far, over all shards
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        buf.extend(ids + sep)
        while len(buf) >= max_length:
            if n % num_shards == shard:
                blocks.append(buf[:max_length])
            n += 1
            buf = buf[max_length:]
            if len(blocks) == batch_size:
                yield torch.tensor(blocks)
                blocks = []
    if blocks:
        yield torch.tensor(blocks)
    if buf and n % num_shards == shard:
        yield torch.tensor([buf])


def key_gram(k: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``k^T k`` in ``dtype`` for keys ``(n, d_k)``. In float32, half-precision keys on a GPU
    multiply on the tensor cores with float32 accumulation and output (products of bf16/fp16
    numbers are exact in float32, so this is the float32 result at half-precision speed)."""
    if dtype == torch.float32 and k.is_cuda and k.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(k.T, k, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    k = k.to(dtype)
    return k.T @ k
def per_text_batches(tokenizer, texts: Iterator[str], max_length: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids, mask)`` batches of ``batch_size`` texts, one text per row from its BOS (the
    tokenizer's special tokens), truncated to ``max_length`` and right-padded (the reference
    code's encoding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows: list[list[int]] = []

    def emit():
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
        if ids:
            rows.append(ids)
        if len(rows) == batch_size:
            yield emit()
            rows = []
    if rows:
        yield emit()


_STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}
ENCODINGS = ("packed", "per_text")


def _check_cfg(cfg: StatsConfig) -> None:
    if cfg.dtype not in _STATS_DTYPES:
        raise InputError(f"stats.dtype must be one of {sorted(_STATS_DTYPES)} (the dtype k k^T is computed in; "
                         f"the model runs in its own dtype), got {cfg.dtype!r}")
    if cfg.encoding not in ENCODINGS:
        raise InputError(f"stats.encoding must be one of {list(ENCODINGS)}, got {cfg.encoding!r}")


@torch.no_grad()
def accumulate_moments(
    adapter: ModelAdapter,
    blocks: Iterator[torch.Tensor],
    layers: Sequence[int],
    init: dict[int, tuple[torch.Tensor, int]] | None = None,
    on_batch: Callable[[int, dict[int, tuple[torch.Tensor, int]]], None] | None = None,
    progress: tqdm | None = None,
    dtype: torch.dtype = torch.float32,
    stop_after: int | None = None,
    tally: list[int] | None = None,
) -> dict[int, tuple[torch.Tensor, int]]:
    """Sum of ``k k^T`` (float64, ``(d_k, d_k)``; each batch's product computed in ``dtype``)
    and key count per layer over ``blocks`` (id tensors, or ``(ids, mask)`` pairs whose padding
    is not counted). One forward per batch captures every layer and stops after the last one
    (or after ``stop_after``: sharded weights need the same forwards on every process, whatever
    layers each one sums; ``layers`` may then be empty). ``tally[0]`` (optional) counts the
    tokens seen, whatever the layers."""
    device = next(adapter.model.parameters()).device
    acc = {l: (init[l][0].to(device), int(init[l][1])) if init and l in init else (torch.zeros(adapter.dims(l)[1], adapter.dims(l)[1], dtype=torch.float64, device=device), 0) for l in layers}
    last = max(layers) if stop_after is None else stop_after
    for bi, item in enumerate(blocks):
        ids, mask = item if isinstance(item, tuple) else (item, None)
        ids = ids.to(device)
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        with adapter.trace(key_layers=layers, stop_after=last) as rec:
            adapter.forward(ids, mask)
        keep = mask.reshape(-1).bool()
        if tally is not None:
            tally[0] += int(keep.sum())
        for l in layers:
            k = rec["keys"][l].reshape(-1, rec["keys"][l].shape[-1])[keep]
            s, c = acc[l]
            acc[l] = (s.add_(key_gram(k, dtype)), c + k.shape[0])  # float64 running sum
        if progress is not None:
            progress.update(int(keep.sum()))
        if on_batch is not None:
            on_batch(bi, acc)
    return acc


class StatsCache:
    """Second moments and projectors on disk (safetensors), keyed and verified by metadata."""

    def __init__(self, cfg: StatsConfig):
        self.cfg = cfg
        self.root = Path(cfg.cache_dir)

    def key(self, adapter: ModelAdapter, layer: int) -> dict[str, str]:
        return {
            "format": str(STATS_FORMAT_VERSION),
            "model": model_fingerprint(adapter, layer),
            "layer": adapter.spec.mlp_down_template.format(layer),
            "corpus": corpus_fingerprint(self.cfg),
            "n_samples": str(self.cfg.n_samples),
            "max_length": str(self.cfg.max_length),
            "dtype": self.cfg.dtype,
            "encoding": self.cfg.encoding,
        }

    def path(self, key: dict[str, str], kind: str = "moment", extra: str = "") -> Path:
        return self.root / f"{key['layer']}.{kind}.{short_hash(*sorted(key.items()), extra)}.safetensors"

    def load(self, key: dict[str, str], kind: str = "moment", extra: str = "") -> dict[str, torch.Tensor] | None:
        """The cached tensors, or None (then they are recomputed). A truncated, garbled or
        non-finite entry is reported by path (a warning) and treated as missing."""
        p = self.path(key, kind, extra)
        if not p.exists():
            return None
        try:
            tensors, meta = read_verified(p, require_digest=True)
        except CorruptFileError as err:
            warnings.warn(f"statistics cache entry {err}; recomputing it", stacklevel=2)
            return None
        if any(meta.get(k) != v for k, v in key.items()):
            return None  # a hash collision or a stale file: never reuse on mismatch
        return tensors

    def save(self, key: dict[str, str], tensors: dict[str, torch.Tensor], kind: str = "moment", extra: str = "", meta: dict | None = None) -> Path:
        p = self.path(key, kind, extra)
        # atomic (a kill never leaves a half-written entry), with a content hash per tensor
        atomic_save_file(tensors, p, metadata={**key, **{k: str(v) for k, v in (meta or {}).items()}})
        return p


def _counted(texts: Iterator[str], bar: tqdm) -> Iterator[str]:
    """``texts``, ticking ``bar`` once per text."""
    for text in texts:
        bar.update()
        yield text


def second_moments(
    adapter: ModelAdapter,
    tokenizer,
    layers: Sequence[int],
    cfg: StatsConfig,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    shard: int = 0,
    num_shards: int = 1,
    is_writer: bool = True,
    show_progress: bool = True,
    owner: Callable[[int], int] | None = None,
    rank: int = 0,
    broadcast: Callable | None = None,
) -> dict[int, torch.Tensor]:
    """Normalized second moment ``C_0 = sum / count`` ``(d_k, d_k)`` per layer, from the cache
    where possible; missing layers are computed together in one streamed pass.

    Under DDP, pass this process's ``shard`` of ``num_shards`` and a ``reduce`` that sums a
    tensor across processes; only the writer saves the cache.

    With sharded weights, pass each layer's ``owner`` process, this process's ``rank`` and a
    ``broadcast(obj, src=...)``: every process runs the same forwards (FSDP needs them), but only
    the owner loads, sums and saves a layer, and only the owned layers are returned. Whether a
    layer must be computed is the owner's answer, sent to all. Partial sums are not resumed.
    """
    _check_cfg(cfg)
    cache = StatsCache(cfg)
    keys = {l: cache.key(adapter, l) for l in layers}  # every layer on every process (collective when sharded)
    out: dict[int, torch.Tensor] = {}
    missing = []
    for l in layers:
        mine = owner is None or owner(l) == rank
        hit = cache.load(keys[l]) if mine else None
        if owner is not None and broadcast is not None:
            absent = broadcast(hit is None if mine else None, src=owner(l))
        else:
            absent = hit is None
        if absent:
            missing.append(l)
        elif hit is not None:
            out[l] = hit["sum"] / float(hit["count"].item())
    if missing:
        stop = max(missing)
        if owner is not None:  # this process sums its own layers; the forwards still go up to ``stop``
            missing = [l for l in missing if owner(l) == rank]
            is_writer = True
        # resumable partial sums exist only for single-process runs (shards would differ)
        partial_key = dict(keys[missing[0]], layers=",".join(map(str, missing))) if missing else None
        init = None
        skip = 0
        if num_shards == 1 and owner is None:
            part = cache.load(partial_key, kind="partial")
            if part is not None:
                skip = int(part["batches"].item())
                init = {l: (part[f"sum.{l}"], int(part[f"count.{l}"].item())) for l in missing}

        def checkpoint(bi: int, acc):
            if num_shards == 1 and owner is None and is_writer and cfg.save_every and (bi + 1) % cfg.save_every == 0:
                t = {f"sum.{l}": s for l, (s, _) in acc.items()}
                t.update({f"count.{l}": torch.tensor(c) for l, (_, c) in acc.items()})
                t["batches"] = torch.tensor(skip + bi + 1)
                try:
                    cache.save(partial_key, t, kind="partial")
                except OSError as err:  # optional (resume only): a full disk must not kill the pass
                    warnings.warn(f"could not save the partial statistics to {cache.path(partial_key, kind='partial')} "
                                  f"({err}); continuing without it", stacklevel=2)

        # the bar counts the texts read (known up front: n_samples, or this process's share of
        # them), the keys counted so far in its postfix

        per_text = cfg.encoding == "per_text"
        shows = show_progress and (rank == 0 if owner is not None else is_writer)
        bar = progress_bar(f"key statistics (layers {missing})", len(range(shard, cfg.n_samples, num_shards)) if per_text else cfg.n_samples,
                           "text", enabled=shows, leave=True)

        def on_batch(bi: int, acc) -> None:
            checkpoint(bi, acc)
            if missing:
                bar.set_postfix(keys=tqdm.format_sizeof(acc[missing[0]][1]), refresh=False)

        # every process reads and packs all texts and keeps its share of the *blocks*
        if per_text:  # rows are independent: each process keeps its share of the texts
            blocks = per_text_batches(tokenizer, _counted(iter_corpus_texts(cfg, shard, num_shards), bar), cfg.max_length, cfg.batch_size)
        else:
            blocks = packed_blocks(tokenizer, _counted(iter_corpus_texts(cfg), bar), cfg.max_length, cfg.batch_size, shard, num_shards)
        with bar:
            for _ in range(skip):
                next(blocks, None)
            tally = [0]
            acc = accumulate_moments(adapter, blocks, missing, init=init, on_batch=on_batch, dtype=_STATS_DTYPES[cfg.dtype],
                                     stop_after=stop, tally=tally)
            if bar.total != bar.n:  # a corpus of fewer texts than n_samples
                bar.total = bar.n
                bar.refresh()
        if owner is not None and tally[0] == 0:  # every process decides alike, also one that owns no layer
            raise InputError(f"statistics corpus {cfg.corpus!r} produced no tokens")
        for l in missing:
            s, c = acc[l]
            count = torch.tensor(float(c), dtype=torch.float64, device=s.device)
            if reduce is not None:
                s, count = reduce(s), reduce(count)
            if float(count) == 0:
                raise InputError(f"statistics corpus {cfg.corpus!r} produced no tokens")
            if is_writer:
                cache.save(keys[l], {"sum": s, "count": count.reshape(1)}, meta={"tokens": int(count), **corpus_provenance(cfg)})
            out[l] = s / float(count)
        pp = cache.path(partial_key, kind="partial") if partial_key is not None else None
        if is_writer and pp is not None and pp.exists():
            pp.unlink()
    return out


def projectors(
    adapter: ModelAdapter,
    moments: dict[int, torch.Tensor],
    cfg: StatsConfig,
    threshold: float,
    mode: str,
    is_writer: bool = True,
    owned: Callable[[int], bool] | None = None,
    layers: Sequence[int] | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
    """AlphaEdit's null-space projector per layer from its moment, cached beside it. With
    ``owned`` only the layers it accepts get one, from ``moments`` of those layers only; the
    cache key of every edit layer (``layers``) is still computed on every process, since with
    sharded weights it reads them collectively. ``is_writer`` then means: writes the projectors
    it owns."""
    cache = StatsCache(cfg)
    out, infos = {}, {}
    for l in (sorted(moments) if layers is None else layers):
        key = cache.key(adapter, l)
        if owned is not None and not owned(l):
            continue
        m = moments[l]
        extra = f"{mode}:{threshold!r}"
        hit = cache.load(key, kind="projector", extra=extra)
        if hit is not None:
            out[l] = hit["P"]
            infos[l] = {"rank": int(hit["rank"].item()), "dim": int(m.shape[0])}
            continue
        p, info = null_space_projector(m, threshold, mode)  # type: ignore[arg-type]
        if is_writer:
            cache.save(key, {"P": p, "rank": torch.tensor(info["rank"])}, kind="projector", extra=extra, meta=info)
        out[l], infos[l] = p, info
    return out, infos

