"""What the experiment measures: answer accuracy, and whether SparseMix keeps the needle's block
(with the model's own scorers, or with a scorer that matched its KL target exactly)."""

from __future__ import annotations

import torch

from hf_multimax.layers.sparsemix import SparseMixSettings
from hf_multimax.ops.sparsemix import select_sparsemix_blocks

from .task import RetrievalDataset

__all__ = ["evaluate_retrieval", "kl_target_needle_recall", "needle_block_recall"]


@torch.no_grad()
def evaluate_retrieval(model, dataset: RetrievalDataset, batch_size: int = 8) -> float:
    """Fraction of queries whose answer is the argmax over the whole vocabulary at the query token."""
    was_training = model.training
    model.eval()
    data, correct, total = dataset.data, 0, 0
    for s in range(0, len(dataset), batch_size):
        ids = data["input_ids"][s : s + batch_size]
        logits = model(input_ids=ids).logits  # [b, L, V]
        q_pos = data["query_pos"][s : s + batch_size]
        pred = logits.gather(1, q_pos[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)
        correct += (pred == data["answer"][s : s + batch_size]).sum().item()
        total += q_pos.numel()
    model.train(was_training)
    return correct / total


def _layer_queries_keys(model, hidden: torch.Tensor, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The post-RoPE query `[B, H, L, D]` and key `[B, Hkv, L, D]` a Llama layer's attention sees."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    B, L, _ = x.shape
    q = attn.q_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)
    positions = torch.arange(L, device=x.device)[None].expand(B, L)
    cos, sin = model.model.rotary_emb(x, positions)
    return apply_rotary_pos_emb(q, k, cos, sin)


@torch.no_grad()
def needle_block_recall(model, dataset: RetrievalDataset, batch_size: int = 8,
                        by_queries_in_block: bool = False) -> dict[str, float]:
    """How often the block holding a query's needle is among the blocks SparseMix keeps for the
    query's block, per layer (averaged over key/value heads) and at best over the heads of a layer.
    With `by_queries_in_block`, the latter also per number of queries sharing the query's block
    (`layer{i}_any_head_{n}_in_block`): a block selects once for all its queries.

    The selection is recomputed from the layer's inputs with the model's own scorer weights and
    settings by `select_sparsemix_blocks`, as `sparsemix_attention` selects in the attention path.
    """
    layers = model.model.layers
    if any(getattr(layer.self_attn, "sparsemix", None) is None for layer in layers):
        raise ValueError("needle_block_recall needs a model built with attn_implementation='sparsemix'")
    settings = SparseMixSettings.from_dict(model.config.sparsemix)
    bs = settings.block_size
    was_training = model.training
    model.eval()
    data = dataset.data
    hits_mean = [0.0] * len(layers)
    hits_any = [0.0] * len(layers)
    by_count = [{} for _ in layers]  # per layer, queries in the block -> [queries, any-head hits]
    total = 0
    for s in range(0, len(dataset), batch_size):
        ids = data["input_ids"][s : s + batch_size]
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # [layers + 1] x [b, L, E]
        q_block = data["query_pos"][s : s + batch_size] // bs  # [b, n_q]
        needle_block = data["needle_pos"][s : s + batch_size] // bs
        sharing = (q_block[:, :, None] == q_block[:, None, :]).sum(-1)  # [b, n_q]: queries in each one's block
        for li, layer in enumerate(layers):
            q, k = _layer_queries_keys(model, hidden[li], layer)
            scorer = layer.self_attn.sparsemix
            _, idx, valid = select_sparsemix_blocks(
                q, k, scorer(), block_size=bs, top_k=settings.top_k, sink=settings.sink, local=settings.local,
                causal=True, scale=layer.self_attn.scaling, selector=scorer.selector,
            )
            # [b, Hkv, n_q, S]: the slots of each query's block
            b, hkv = idx.shape[:2]
            gather = q_block[:, None, :, None].expand(b, hkv, -1, idx.shape[-1])
            slots, ok = idx.gather(2, gather), valid.gather(2, gather)
            hit = ((slots == needle_block[:, None, :, None]) & ok).any(-1)  # [b, Hkv, n_q]
            hits_mean[li] += hit.float().mean(1).sum().item()
            any_head = hit.any(1)  # [b, n_q]
            hits_any[li] += any_head.float().sum().item()
            if by_queries_in_block:
                for n in sharing.unique().tolist():
                    count = by_count[li].setdefault(n, [0, 0])
                    count[0] += int((sharing == n).sum())
                    count[1] += int(any_head[sharing == n].sum())
        total += q_block.numel()
    model.train(was_training)
    out = {f"layer{i}_mean_over_heads": h / total for i, h in enumerate(hits_mean)}
    out.update({f"layer{i}_any_head": h / total for i, h in enumerate(hits_any)})
    out.update({f"layer{i}_any_head_{n}_in_block": h / q for i, c in enumerate(by_count) for n, (q, h) in sorted(c.items())})
    return out


@torch.no_grad()
def kl_target_needle_recall(model, dataset: RetrievalDataset, *, block_size: int, top_k: int, n: int = 64) -> dict:
    """Could a scorer that matched its KL target perfectly find the needles? For each query, rank the
    candidate key blocks (not sink, not local, not future) of its query block by the dense attention
    mass pooled over the block's query rows, and report how often the needle's block is in the top
    `top_k`, per layer, for three poolings of the rows:

    - `mean`: the mean over the block's rows (SparseMix's first KL target);
    - `max`: the max over the rows (SeerAttention's max-pooled ground truth; SparseMix's KL target);
    - `query_row`: the query token's own row (an upper bound: what the lookup needs).

    Counted per key/value head, averaged (`*_mean_over_heads`) and at best (`*_any_head`). Runs the
    dense model (or a converted one; the probabilities are always dense) on the first `n` sequences.
    """
    was_training = model.training
    model.eval()
    data = dataset.data
    n = min(n, len(dataset))
    names = ("mean", "max", "query_row")
    hits = {}
    total = 0
    for i in range(n):
        ids = data["input_ids"][i : i + 1]
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        q_pos, needle = data["query_pos"][i], data["needle_pos"][i]
        for li, layer in enumerate(model.model.layers):
            q, k = _layer_queries_keys(model, hidden[li], layer)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            L = q.shape[-2]
            scores = torch.matmul(q, k.transpose(-1, -2)) * layer.self_attn.scaling
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)[0]  # [H, L, L]
            n_blocks = L // block_size
            mass = probs.view(probs.shape[0], L, n_blocks, block_size).sum(-1)  # [H, L rows, key blocks]
            rows = mass.view(mass.shape[0], n_blocks, block_size, n_blocks)  # [H, query block, row, key block]
            pooled = {"mean": rows.mean(2), "max": rows.amax(2)}
            for name in names:
                if name == "query_row":
                    target = mass[:, q_pos]  # [H, n_q, key blocks]
                else:
                    target = pooled[name][:, q_pos // block_size]
                a = (q_pos // block_size)[:, None]
                j = torch.arange(n_blocks)[None, :]
                candidate = (j > 0) & (j < a)  # not the sink, not the local block, not the future
                top = target.masked_fill(~candidate, -1.0).topk(min(top_k, n_blocks), dim=-1).indices
                hit = (top == (needle // block_size)[None, :, None]).any(-1)  # [H, n_q]
                key = f"layer{li}_{name}"
                hits[key + "_mean_over_heads"] = hits.get(key + "_mean_over_heads", 0.0) + hit.float().mean(0).sum().item()
                hits[key + "_any_head"] = hits.get(key + "_any_head", 0.0) + hit.any(0).float().sum().item()
        total += len(q_pos)
    model.train(was_training)
    return {key: value / total for key, value in sorted(hits.items())}
