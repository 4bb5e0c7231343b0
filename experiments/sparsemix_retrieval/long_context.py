"""The long-context evaluations of a trained dense/sparse pair (no training here), every set seeded:

- key-value lookup at each of `lengths` (the training task, longer: at 16k the needle is ~8k back
  and a query block keeps 10 of 256 key blocks);
- multi-query associative recall: `mqar_needles` pairs and as many queries per sequence (half-size
  segments, so that 32 pairs fit in the first half of a 4k sequence; a query block then holds up to
  two queries, and the needle recall is also reported by the number of queries sharing the block);
- needle depth sweep: one query at the end, its needle at each depth of the context (0: right
  after the sink block, 1: the block before the query's), among distractor pairs.

Each setting reports dense accuracy, sparse accuracy, their ratio and the needle-block recall of the
sparse model's selection.
"""

from __future__ import annotations

import dataclasses
import logging

from .measures import evaluate_retrieval, needle_block_recall
from .task import RetrievalDataset, RetrievalTask

__all__ = ["long_context_suite"]

logger = logging.getLogger(__name__)


def _setting(dense, sparse, data: RetrievalDataset, batch_size: int, by_queries_in_block: bool = False,
             **fields) -> dict:
    acc_dense = evaluate_retrieval(dense, data, batch_size=batch_size)
    acc_sparse = evaluate_retrieval(sparse, data, batch_size=batch_size)
    recall = needle_block_recall(sparse, data, batch_size=batch_size, by_queries_in_block=by_queries_in_block)
    row = {**fields, "sequences": len(data), "queries": int(data.data["query_pos"].numel()), "dense": acc_dense,
           "sparse": acc_sparse, "ratio": acc_sparse / acc_dense if acc_dense > 0 else float("nan"),
           "needle_recall_any_head": min(v for k, v in recall.items() if k.endswith("_any_head")),
           "needle_recall_mean_over_heads": min(v for k, v in recall.items() if k.endswith("_mean_over_heads"))}
    if by_queries_in_block:  # {queries sharing the block: any-head recall, the lowest over layers}
        shares = sorted({int(k.split("_")[-3]) for k in recall if k.endswith("_in_block")})
        row["needle_recall_any_head_by_queries_in_block"] = {
            n: min(v for k, v in recall.items() if k.endswith(f"_any_head_{n}_in_block")) for n in shares}
    logger.info("long-context %s", row)
    return row


def long_context_suite(dense, sparse, task: RetrievalTask, *, lengths: list[int], sequences: int,
                       mqar_length: int, mqar_needles: int, depths: list[float], depth_length: int,
                       depth_sequences: int, seed: int, progress=None) -> dict:
    """Every evaluation of the module docstring. `progress(name)` is called before each setting."""
    step = progress or (lambda name: None)
    out: dict = {"kv_lookup": [], "multi_query": None, "depth_sweep": []}
    for length in lengths:
        step(f"key-value lookup at {length}")
        data = RetrievalDataset(task, sequences, length, seed=20_000 + seed + length)
        out["kv_lookup"].append(_setting(dense, sparse, data, max(1, 8192 // length), length=length))
    if mqar_needles:
        step(f"multi-query recall, {mqar_needles} needles at {mqar_length}")
        mqar = dataclasses.replace(task, segment=task.segment // 2, max_pairs=mqar_needles)
        pairs, queries = mqar.counts(mqar_length)
        if pairs < mqar_needles:
            raise ValueError(
                f"mqar_needles={mqar_needles} does not fit: {mqar_length} tokens in segments of {mqar.segment} and "
                f"{task.n_keys} keys hold {pairs} pairs; lower it or raise mqar_length"
            )
        data = RetrievalDataset(mqar, sequences, mqar_length, seed=30_000 + seed)
        out["multi_query"] = _setting(dense, sparse, data, max(1, 8192 // mqar_length), by_queries_in_block=True,
                                      length=mqar_length, needles=pairs, queries_per_sequence=queries)
    for depth in depths:
        step(f"needle at depth {depth:.2f} of {depth_length}")
        data = RetrievalDataset(task, depth_sequences, depth_length, seed=40_000 + seed, depth=depth)
        out["depth_sweep"].append(_setting(dense, sparse, data, max(1, 8192 // depth_length), depth=depth,
                                           length=depth_length))
    return out
