"""Collect routing statistics: hooks on every MoE layer, teacher forcing or beam search, over FLORES directions.

The pieces live beside this orchestration: :mod:`pruning.stats.options` (what to collect),
:mod:`pruning.stats.batches` (tokenized batches), :mod:`pruning.stats.collector` (the counters of each
MoE layer call, by forward hooks), :mod:`pruning.stats.provenance` (what made the file, resuming),
:mod:`pruning.stats.distributed` (torchrun, expert parallelism, all-reduce).

Token conventions (docs/statistics.md):
- encoder input: the NLLB tokenizer's ``[src_lang] tokens </s>``; every non-padding position counts
  for the source language (``enc``);
- decoder labels: ``[tgt_lang] tokens </s>``; decoder input: the labels shifted right behind
  ``decoder_start_token_id`` (``</s>``): ``[</s>, tgt_lang] tokens``; one position per label, every one
  of them counts for the target language (``dec``); padding never counts (``decoder_attention_mask``);
- beam mode: the hypothesis beam search returns, ``[tgt_lang] tokens </s>`` (cut after its first
  ``</s>``), is run through the model with teacher forcing like a reference, so its routing is counted
  exactly once per position; the routing inside the search (discarded beams, cached steps) is not counted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from pruning.data.directions import split_direction
from pruning.stats.batches import Batch, decoder_inputs, encode, hypothesis_labels, make_batches
from pruning.stats.chunking import ChunkTable, chunk_layout, chunks_from_flat, num_chunk_values
from pruning.stats.collector import RoutingCollector
from pruning.stats.counters import RoutingStats, StatsError
from pruning.stats.options import StatsOptions, check_languages, check_tokenizer_languages
from pruning.stats.provenance import check_resumable, collection_info


# ---- running batches ----------------------------------------------------------------------------
@dataclass
class Decoding:
    """Settings of one direction's forward passes."""

    mode: str
    beam: int
    max_new_tokens: int
    start_id: int
    pad_id: int
    eos_id: int
    tgt_id: int
    synced: bool = False
    """Keep every process stepping until all finished (expert parallelism: every step exchanges tokens)."""


def run_batch(model: Any, collector: RoutingCollector, batch: Batch, decoding: Decoding, *, count: bool = True) -> None:
    """Forward ``batch`` (teacher forcing, or beam search then teacher forcing of the hypothesis) for its routing."""
    device = model.device
    input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    labels = batch.labels
    if decoding.mode == "beam":
        with collector.paused():
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_beams=decoding.beam,
                max_new_tokens=decoding.max_new_tokens,
                forced_bos_token_id=decoding.tgt_id,
                do_sample=False,
                synced_gpus=decoding.synced,
            )
        labels = hypothesis_labels(sequences.cpu(), eos_id=decoding.eos_id)
    assert labels is not None
    decoder_ids, decoder_mask = decoder_inputs(labels, start_id=decoding.start_id, pad_id=decoding.pad_id)
    previous = collector.enabled
    collector.enabled = count
    try:
        # the encoder-decoder stacks only: routing needs no output projection (a [tokens, vocab] product and
        # tensor, 256,206 x 2048 per token at NLLB-200's size)
        model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_ids.to(device),
            decoder_attention_mask=decoder_mask.to(device),
            use_cache=False,
        )
    finally:
        collector.enabled = previous


def placeholder_batch(decoding: Decoding, *, src_id: int) -> Batch:
    """A one-token batch run (and not counted) by a process with no work left at a step (expert parallelism)."""
    ids = torch.tensor([[src_id, decoding.eos_id]])
    return Batch(ids, torch.ones_like(ids), [[decoding.tgt_id, decoding.eos_id]], [])


# ---- the whole collection ----------------------------------------------------------------------
def collect_statistics(options: StatsOptions) -> Path:
    """Collect every asked direction into ``options.out`` (one process, or every process of torchrun).

    The file is written atomically after each direction (each round of directions when several
    processes share the work), so an interruption loses at most the running one; ``--resume`` skips
    the directions the file holds, after checking that it was collected on the same FLORES files.
    Rank 0 holds ``--out``'s lock (:mod:`pruning.locking`) from before the model loads to the end.
    """
    from pruning.data.flores import FloresDir
    from pruning.locking import claim_output
    from pruning.stats import distributed
    from pruning.stats.provenance import check_same_data, data_fingerprint, record_data

    options.validate()
    distributed.check_launch(options.expert_parallel)
    flores = FloresDir(options.data)
    check_languages(options, flores)
    out = Path(options.out)
    ctx = distributed.setup(expert_parallel=options.expert_parallel, device=options.device)
    held: dict[str, Any] = {}  # rank 0 only: the statistics being written
    claim = contextlib.ExitStack()  # rank 0 only: --out's lock

    def check_out() -> None:
        claim.enter_context(claim_output(out, command="stats"))
        held["previous"] = _previous(out, resume=options.resume)
        held["files"] = data_fingerprint(flores, split=options.split, languages=options.languages())
        if held["previous"] is not None:
            check_same_data(held["previous"].info, held["files"], data_dir=options.data, path=out)

    with claim, contextlib.closing(ctx):  # on any failure: the process group closes, then the lock is released
        ctx.agree(check_out)
        model = _load(options, ctx)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise StatsError(f"{options.model}: no tokenizer found beside the weights (sentencepiece.bpe.model or tokenizer files)")
        check_tokenizer_languages(tokenizer, options.languages())
        info = collection_info(options, model, expert_parallel=ctx.ep_size, data_parallel=ctx.dp_size, data_root=flores.root)

        def start() -> list[str]:
            info["data"]["files"] = dict(held["files"])
            held["stats"] = _start_stats(held.get("previous"), info, model, out)
            record_data(held["stats"].info, held["files"])
            return held["stats"].directions

        done = set(ctx.agree(start))  # every process learns which directions to skip, not the counters
        todo = [d for d in options.directions() if d not in done]
        collector = RoutingCollector(model, num_experts=model.topology.num_experts, expert_outputs=options.expert_outputs)
        try:
            _collect_rounds(options, ctx, model, collector, flores, todo, held.get("stats"), out)
        finally:
            collector.close()
    return out


def _previous(out: Path, *, resume: bool) -> Optional[RoutingStats]:
    if out.exists() and not resume:
        raise StatsError(f"{out} exists: pass --resume to continue it, or choose another --out")
    return RoutingStats.load(out) if out.exists() else None


def _start_stats(previous: Optional[RoutingStats], info: dict[str, Any], model: Any, out: Path) -> RoutingStats:
    if previous is None:
        return RoutingStats(model.topology, {}, info)
    model.topology.check_same_routing(previous.topology, what=str(out))
    check_resumable(previous.info, info, path=out)
    previous.info.setdefault("sentences", {})
    return previous


def _load(options: StatsOptions, ctx: Any) -> Any:
    from pruning.model.loading import load_model

    if ctx.ep_size > 1:
        from pruning.model.expert_parallel import load_expert_parallel_model

        return load_expert_parallel_model(
            options.model,
            group=ctx.ep_group,
            device=ctx.device,
            dtype=options.dtype,
            dispatch=options.dispatch,
            progress=options.progress and ctx.is_main,
        )
    return load_model(options.model, ctx.device, options.dtype, dispatch=options.dispatch, progress=options.progress and ctx.is_main)


def _collect_rounds(
    options: StatsOptions,
    ctx: Any,
    model: Any,
    collector: RoutingCollector,
    flores: Any,
    todo: list[str],
    stats: Optional[RoutingStats],
    out: Path,
) -> None:
    from tqdm.auto import tqdm

    tokenizer = model.tokenizer
    show = options.progress and ctx.is_main
    layout = chunk_layout(collector) if options.chunk_size else None
    chunk_ids = options.chunk_ids(flores.num_lines(options.split)) if options.chunk_size else range(0)
    tail = num_chunk_values(layout, len(chunk_ids)) if layout is not None else 0  # chunk values after the counters
    peaks = collector.peak_positions()  # the layout of flat() is fixed: find the max-merged positions once
    bar = tqdm(total=len(todo), desc="directions", unit="dir", disable=not show)
    for start in range(0, len(todo), ctx.dp_size):
        round_dirs = todo[start : start + ctx.dp_size]  # one direction per data-parallel group
        mine = round_dirs[ctx.dp_rank] if ctx.dp_rank < len(round_dirs) else None
        bar.set_postfix_str(", ".join(round_dirs) if len(round_dirs) > 1 else round_dirs[0])
        flat = _run_direction(options, ctx, model, collector, flores, tokenizer, mine, show=show)
        # [len(round), counters + 1 sentence count (+ chunk table and sentences per chunk)]: each group
        # writes its own row; the sum holds them all
        table = flat.new_zeros(len(round_dirs), flat.shape[0])
        if mine is not None:
            table[ctx.dp_rank] = flat
        table = reduce_counters(ctx, table, peaks=peaks)
        if ctx.is_main:
            assert stats is not None
            for direction, row in zip(round_dirs, table):
                counters = collector.unflatten(row[: row.shape[0] - tail - 1])
                if layout is not None:
                    chunks = chunks_from_flat(layout, row[row.shape[0] - tail :], ids=chunk_ids)
                    for side in chunks.counters:
                        counters[side].update(chunks.totals(side))  # exactly the sum of the chunks
                    stats.add_chunks(direction, chunks, chunk_sentences=int(options.chunk_size or 0), what=str(out))
                for side, named in counters.items():
                    for name, value in named.items():
                        stats.add(direction, side, name, value)
                stats.info.setdefault("sentences", {})[direction] = int(row[row.shape[0] - tail - 1])
            stats.info["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            stats.save(out)
        bar.update(len(round_dirs))
    bar.close()


def reduce_counters(ctx: Any, table: torch.Tensor, *, peaks: torch.Tensor) -> torch.Tensor:
    """``table`` [rows, flat] summed over every process, except at ``peaks`` [M] (``max_abs``,
    :meth:`RoutingCollector.peak_positions`): their maximum (expert-parallel ranks share a direction)."""
    peaks = peaks.to(table.device)
    if len(peaks):
        highest = ctx.all_reduce_peak(table[:, peaks].contiguous())
    table = ctx.all_reduce_sum(table)
    if len(peaks):
        table[:, peaks] = highest.to(table.device)
    return table


def _run_direction(
    options: StatsOptions,
    ctx: Any,
    model: Any,
    collector: RoutingCollector,
    flores: Any,
    tokenizer: Any,
    direction: Optional[str],
    *,
    show: bool,
) -> torch.Tensor:
    """This process's counters for ``direction`` (None: only keep step with the others), flat, + sentences
    (+ with ``--chunk-sentences``: the chunk table and sentences per chunk, :meth:`ChunkTable.flat`)."""
    from tqdm.auto import tqdm

    config = model.config
    batches: list[Batch] = []
    src: Optional[str] = None
    tgt: Optional[str] = None
    if direction is not None:
        src, tgt = split_direction(direction)
        batches = _direction_batches(options, flores, tokenizer, src=src, tgt=tgt, pad_id=config.pad_token_id)
    mine = batches[ctx.ep_rank :: ctx.ep_size]  # expert-parallel ranks share the direction's batches
    # expert parallelism: every forward exchanges tokens, so every process runs the same number of steps
    # (over the whole world: beam search keeps all processes stepping together, see Decoding.synced)
    steps = ctx.all_reduce_max(len(mine)) if ctx.ep_size > 1 else len(mine)
    any_lang = options.languages()[0]
    decoding = Decoding(
        mode=options.mode,
        beam=options.beam,
        max_new_tokens=options.max_new_tokens,
        start_id=config.decoder_start_token_id,
        pad_id=config.pad_token_id,
        eos_id=config.eos_token_id,
        tgt_id=tokenizer.convert_tokens_to_ids(tgt or any_lang),
        synced=ctx.ep_size > 1,
    )
    _route_direction(model, src, tgt)
    collector.reset()
    chunks = _chunk_table(options, collector, flores)
    sentences = 0
    with torch.no_grad():
        for step in tqdm(range(steps), desc=direction or "waiting", unit="batch", leave=False, disable=not show):
            if step < len(mine):
                run_batch(model, collector, mine[step], decoding)
                sentences += len(mine[step].sentences)
                if chunks is not None:
                    chunks.take_batch(collector, mine[step].sentences)
            else:  # no batch left here: run a placeholder so that the expert exchanges stay in step
                placeholder = placeholder_batch(decoding, src_id=tokenizer.convert_tokens_to_ids(src or any_lang))
                run_batch(model, collector, placeholder, decoding, count=False)
    if chunks is not None:
        total = chunks.flat()
        flat = total[: chunks.layout.size]
        return torch.cat([flat, flat.new_tensor([float(sentences)]), total[chunks.layout.size :]])
    flat = collector.flat()
    collector.reset()
    return torch.cat([flat, flat.new_tensor([float(sentences)])])


def _chunk_table(options: StatsOptions, collector: RoutingCollector, flores: Any) -> Optional[ChunkTable]:
    """An empty per-chunk table for one direction (every direction has the same chunks), or None without chunking."""
    if not options.chunk_size:
        return None
    ids = options.chunk_ids(flores.num_lines(options.split))
    device = collector.flat().device
    return ChunkTable(chunk_layout(collector), first_chunk=ids.start, num_chunks=len(ids), chunk_sentences=options.chunk_size, device=device)


def _route_direction(model: Any, src: Optional[str], tgt: Optional[str]) -> None:
    """A pruned export serving several directions routes each over its own experts (its manifest)."""
    if getattr(model, "manifest", None) and hasattr(model, "set_direction"):
        model.set_direction(src, tgt)


def _direction_batches(options: StatsOptions, flores: Any, tokenizer: Any, *, src: str, tgt: str, pad_id: int) -> list[Batch]:
    lines = options.lines(flores.num_lines(options.split))
    sources = flores.read(src, options.split)[lines.start : lines.stop]
    targets = flores.read(tgt, options.split)[lines.start : lines.stop] if options.mode == "teacher" else None
    source_ids = encode(tokenizer, sources, lang=src, target=False)
    label_ids = encode(tokenizer, targets, lang=tgt, target=True) if targets is not None else None
    return make_batches(source_ids, label_ids, batch_tokens=options.batch_tokens, pad_id=pad_id, first_line=lines.start, chunk_sentences=options.chunk_size)
