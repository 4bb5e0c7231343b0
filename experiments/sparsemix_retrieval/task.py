"""The generated key-value lookup task, its data and the tiny model that learns it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig

__all__ = ["RetrievalDataset", "RetrievalTask", "init_factored_embeddings", "tiny_llama_config"]


@dataclass(frozen=True)
class RetrievalTask:
    """Vocabulary and layout of the key-value lookup task.

    Ids: 0 BOS, then `n_filler` filler tokens, `n_keys * n_values` pair tokens, `n_keys` query tokens
    and `n_values` answer tokens.

    Args:
        n_keys (`int`): distinct keys; keys within one sequence are distinct. Default: `32`.
        n_values (`int`): distinct values (chance accuracy is `1 / n_values`). Default: `8`.
        n_filler (`int`): filler vocabulary (random noise between the pairs and queries). Default: `64`.
        segment (`int`): tokens per segment; at most one pair or one query per segment. Set it to the
            SparseMix block size so that a needle never shares the query's block. Default: `64`.
        max_pairs (`int`): pairs per sequence at most (fewer on short sequences). Default: `24`.
    """

    n_keys: int = 32
    n_values: int = 8
    n_filler: int = 64
    segment: int = 64
    max_pairs: int = 24

    def __post_init__(self):
        for name in ("n_keys", "n_values", "n_filler", "segment", "max_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RetrievalTask.{name}={value!r} must be a positive int")
        if self.segment < 2:
            raise ValueError(f"RetrievalTask.segment={self.segment} must be >= 2 (a query and its answer share a segment)")

    bos_id = 0

    @property
    def filler_start(self) -> int:
        return 1

    @property
    def pair_start(self) -> int:
        return self.filler_start + self.n_filler

    @property
    def query_start(self) -> int:
        return self.pair_start + self.n_keys * self.n_values

    @property
    def answer_start(self) -> int:
        return self.query_start + self.n_keys

    @property
    def vocab_size(self) -> int:
        return self.answer_start + self.n_values

    def pair_id(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.pair_start + key * self.n_values + value

    def counts(self, length: int) -> tuple[int, int]:
        """(pairs, queries) per sequence of `length` tokens."""
        n_seg = length // self.segment
        context, queries = n_seg // 2 - 1, n_seg - n_seg // 2
        n_pairs = min(self.max_pairs, self.n_keys, context)
        return n_pairs, min(n_pairs, queries)

    def generate(self, n: int, length: int, seed: int, mixed: bool = False) -> dict[str, torch.Tensor]:
        """`n` sequences of `length` tokens from `seed` (same arguments, same tensors). Pairs sit in
        the first half and queries in the second; `mixed=True` scatters both over the whole sequence
        instead (each query still after its pair, in another segment), so needles are found at every
        depth.

        Returns:
            dict with `input_ids` and `labels` `[n, length]` (labels -100 except at answers),
            `query_pos`, `needle_pos` and `answer` `[n, n_queries]` (position of each query token, of
            the pair it asks for, and the answer id).
        """
        if length % self.segment:
            raise ValueError(f"length={length} must be a multiple of segment={self.segment}")
        n_pairs, n_queries = self.counts(length)
        if n_queries < 1:
            raise ValueError(f"length={length} leaves no room for a pair and a query: use >= {4 * self.segment} tokens")
        n_seg = length // self.segment
        first_query_seg = n_seg - n_seg // 2
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(self.filler_start, self.pair_start, (n, length), generator=gen)
        ids[:, 0] = self.bos_id
        labels = torch.full((n, length), -100, dtype=torch.long)
        query_pos = torch.empty(n, n_queries, dtype=torch.long)
        needle_pos = torch.empty(n, n_queries, dtype=torch.long)
        answer = torch.empty(n, n_queries, dtype=torch.long)
        for i in range(n):
            keys = torch.randperm(self.n_keys, generator=gen)[:n_pairs]
            values = torch.randint(self.n_values, (n_pairs,), generator=gen)
            if mixed:
                pair_seg, asked, query_seg = self._mixed_layout(n_seg, n_pairs, n_queries, gen)
                pair_pos = pair_seg * self.segment + torch.randint(self.segment, (n_pairs,), generator=gen)
            else:  # (the order of the draws is the one the published results were generated with)
                # Segments 1 .. first_query_seg - 1 hold pairs (segment 0 is the always-kept sink block).
                pair_seg = 1 + torch.randperm(first_query_seg - 1, generator=gen)[:n_pairs]
                pair_pos = pair_seg * self.segment + torch.randint(self.segment, (n_pairs,), generator=gen)
                asked = torch.randperm(n_pairs, generator=gen)[:n_queries]
                query_seg = first_query_seg + torch.randperm(n_seg - first_query_seg, generator=gen)[:n_queries]
            # The answer follows the query inside the same segment.
            q_pos = query_seg * self.segment + torch.randint(self.segment - 1, (n_queries,), generator=gen)
            ids[i, pair_pos] = self.pair_id(keys, values)
            ids[i, q_pos] = self.query_start + keys[asked]
            ids[i, q_pos + 1] = self.answer_start + values[asked]
            labels[i, q_pos + 1] = ids[i, q_pos + 1]
            order = torch.argsort(q_pos)
            query_pos[i], needle_pos[i] = q_pos[order], pair_pos[asked][order]
            answer[i] = self.answer_start + values[asked][order]
        return {"input_ids": ids, "labels": labels, "query_pos": query_pos, "needle_pos": needle_pos, "answer": answer}

    @staticmethod
    def _mixed_layout(n_seg: int, n_pairs: int, n_queries: int, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pair segments, asked pairs, their query segments) anywhere in segments 1..n_seg-1: the
        asked pairs and their queries take random distinct segments two by two (the earlier one holds
        the pair), the other pairs the rest."""
        segs = 1 + torch.randperm(n_seg - 1, generator=gen)[: n_pairs + n_queries]
        couples = segs[: 2 * n_queries].view(n_queries, 2)
        pair_seg = torch.cat([couples.amin(1), segs[2 * n_queries :]])
        return pair_seg, torch.arange(n_queries), couples.amax(1)

    def generate_at_depth(self, n: int, length: int, depth: float, seed: int) -> dict[str, torch.Tensor]:
        """`n` needle-in-a-haystack sequences: one query in the last segment, its pair (the needle) at
        `depth` of the context (0: segment 1, right after the sink; 1: the segment before the
        query's), and `max_pairs - 1` distractor pairs with other keys in other segments anywhere
        before the query. Same dict as `generate`, with one query per sequence."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth} must be in [0, 1]")
        if length % self.segment:
            raise ValueError(f"length={length} must be a multiple of segment={self.segment}")
        n_seg = length // self.segment
        if n_seg < 4:
            raise ValueError(f"length={length} leaves no room for a needle and a query: use >= {4 * self.segment} tokens")
        n_pairs = min(self.max_pairs, self.n_keys, n_seg - 2)
        needle_seg = 1 + round(depth * (n_seg - 3))
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(self.filler_start, self.pair_start, (n, length), generator=gen)
        ids[:, 0] = self.bos_id
        labels = torch.full((n, length), -100, dtype=torch.long)
        query_pos, needle_pos, answer = (torch.empty(n, 1, dtype=torch.long) for _ in range(3))
        others = torch.tensor([s for s in range(1, n_seg - 1) if s != needle_seg])
        for i in range(n):
            keys = torch.randperm(self.n_keys, generator=gen)[:n_pairs]
            values = torch.randint(self.n_values, (n_pairs,), generator=gen)
            pair_seg = torch.cat([torch.tensor([needle_seg]), others[torch.randperm(len(others), generator=gen)[: n_pairs - 1]]])
            pair_pos = pair_seg * self.segment + torch.randint(self.segment, (n_pairs,), generator=gen)
            q_pos = (n_seg - 1) * self.segment + int(torch.randint(self.segment - 1, (1,), generator=gen))
            ids[i, pair_pos] = self.pair_id(keys, values)
            ids[i, q_pos] = self.query_start + keys[0]
            ids[i, q_pos + 1] = self.answer_start + values[0]
            labels[i, q_pos + 1] = ids[i, q_pos + 1]
            query_pos[i], needle_pos[i], answer[i] = q_pos, pair_pos[0], ids[i, q_pos + 1]
        return {"input_ids": ids, "labels": labels, "query_pos": query_pos, "needle_pos": needle_pos, "answer": answer}


class RetrievalDataset(torch.utils.data.Dataset):
    """Pre-generated sequences of `RetrievalTask.generate` (or `generate_at_depth` when `depth` is
    given), served as `{input_ids, labels}` rows."""

    def __init__(self, task: RetrievalTask, n: int, length: int, seed: int, depth: float | None = None,
                 mixed: bool = False):
        self.task, self.length, self.seed, self.depth = task, length, seed, depth
        if depth is None:
            self.data = task.generate(n, length, seed, mixed=mixed)
        else:
            self.data = task.generate_at_depth(n, length, depth, seed)

    def __len__(self) -> int:
        return self.data["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data["input_ids"][i], "labels": self.data["labels"][i]}


def tiny_llama_config(task: RetrievalTask, *, layers: int = 1, hidden_size: int = 128, heads: int = 2,
                      max_length: int = 4096, rope_theta: float = 1e9) -> LlamaConfig:
    """A tiny Llama for the task (built with `from_config`, nothing downloaded). head_dim 64 as in
    the SparseMix benchmarks. The task needs no position at all: a very large RoPE base (1e9; 1e6
    learned clearly slower) leaves most rotary pairs nearly constant over 4096 positions, so a
    query matches its key by content wherever the pair sits."""
    return LlamaConfig(
        vocab_size=task.vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden_size // heads, max_position_embeddings=max_length, bos_token_id=task.bos_id,
        eos_token_id=None, pad_token_id=None, tie_word_embeddings=False, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )


@torch.no_grad()
def init_factored_embeddings(model, task: RetrievalTask, seed: int) -> None:
    """Start the pair, query and answer embeddings from shared codes: pair(k, v) = key(k) + value(v) +
    pair_type, query(k) = key(k) + query_type, and the answer's output row = value(v).

    With independent random rows the model first has to discover which of the pair ids carry a
    given key (a long loss plateau on CPU); with shared codes the lookup is one attention pattern
    learned in a few hundred steps. The type codes let attention tell the needle from the query token
    itself, which shares its key code. The embeddings stay trainable; only the dense teacher's start
    is shaped, the sparse stages start from whatever it learned.
    """
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    std = emb.std().item()
    key = torch.randn(task.n_keys, emb.shape[1], generator=gen) * std
    value = torch.randn(task.n_values, emb.shape[1], generator=gen) * std
    pair_type, query_type = torch.randn(2, emb.shape[1], generator=gen) * std
    k, v = torch.meshgrid(torch.arange(task.n_keys), torch.arange(task.n_values), indexing="ij")
    emb[task.pair_id(k, v).flatten()] = (key[k] + value[v] + pair_type).flatten(0, 1).to(emb.dtype)
    emb[task.query_start : task.answer_start] = (key + query_type).to(emb.dtype)
    head = model.get_output_embeddings().weight
    head[task.answer_start : task.vocab_size] = (value * head.std().item() / std).to(head.dtype)
