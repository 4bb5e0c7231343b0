"""Block layout shared by the SparseMix kernels: queries regrouped per key/value head and query
block, keys and values gathered per selected block with `index_select`, and the keep mask of a tile.

A tile holds `c` query blocks of one batch row range: scores `[B, Hkv, c, G * bs, S * bs]`, rows
ordered (query head in the group, token), columns (slot, token).
"""

from __future__ import annotations

import torch

from ..multimax.naive import check_theta
from ..naive_attention import check_qkv
from .selection import BlockGeometry, block_geometry

__all__ = ["SparseLayout", "check_selection"]


def check_selection(block_idx: torch.Tensor, block_valid: torch.Tensor, batch: int, n_kv_heads: int, geometry: BlockGeometry):
    expected = (batch, n_kv_heads, geometry.n_q_blocks)
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != expected or block_valid.shape != block_idx.shape:
        raise ValueError(
            f"block_idx/block_valid must be [B, Hkv, n_q_blocks, S] = [{', '.join(map(str, expected))}, S]; got "
            f"{tuple(block_idx.shape)} and {tuple(block_valid.shape)}"
        )
    if block_idx.dtype != torch.long or block_valid.dtype != torch.bool:
        raise ValueError(f"block_idx must be int64 and block_valid bool, got {block_idx.dtype} and {block_valid.dtype}")


class SparseLayout:
    """Inputs of one SparseMix call rearranged into blocks (see module docstring)."""

    def __init__(self, query, key, value, block_idx, block_valid, *, block_size, is_causal, mask, theta, affine):
        n_heads, n_kv_heads = check_qkv(query, key, value)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be a positive int")
        B, _, Q, D = query.shape
        K = key.shape[-2]
        g = block_geometry(Q, K, block_size, is_causal)
        check_selection(block_idx, block_valid, B, n_kv_heads, g)
        self.geometry, self.batch, self.n_heads, self.n_kv_heads = g, B, n_heads, n_kv_heads
        # Scores in fp32 at least (fp64 stays fp64, for gradcheck).
        self.acc = torch.promote_types(query.dtype, torch.float32)
        self.groups = n_heads // n_kv_heads
        bs, nQB, nKB = block_size, g.n_q_blocks, g.n_k_blocks
        self.block_idx, self.block_valid = block_idx, block_valid
        # Flat row of each selected block in the [B * Hkv * nKB, bs, D] view of the keys.
        base = (torch.arange(B * n_kv_heads, device=key.device) * nKB).view(B, n_kv_heads, 1, 1)
        self.flat_idx = block_idx + base
        self.k_pad = nKB * bs - K
        self.q_tail = nQB * bs - g.front_pad - Q

        if theta is not None:
            check_theta(theta)
            theta = self._per_head(theta, 8, "theta")
        if affine is not None:
            affine = self._per_head(affine, 2, "affine")
        self.theta, self.affine = theta, affine

        # Slot 1 always holds the local block when it is valid (select_blocks); see additive_mask.
        local_valid = block_valid[..., 1] if block_valid.shape[-1] > 1 else block_valid[..., 0] & False
        self.local_fast = (
            is_causal and mask is None and block_valid.shape[-1] > 1
            and bool(local_valid.all()) and bool((block_idx[..., 1] == self._abs_blocks(key.device)).all())
        )
        self.mask = None
        if mask is not None:
            if mask.dtype != torch.bool or mask.dim() != 4:
                raise ValueError(f"mask must be a 4-D boolean tensor (True = attend), got {mask.dtype} {tuple(mask.shape)}")
            mask = mask.expand(B, n_heads, Q, K)
            mask = torch.nn.functional.pad(mask, (0, self.k_pad, g.front_pad, self.q_tail), value=False)
            # [B, Hkv, G, nQB, bs, nKB, bs]: rows and columns in blocks.
            self.mask = mask.view(B, n_kv_heads, self.groups, nQB, bs, nKB, bs)

    def _abs_blocks(self, device):
        return torch.arange(self.geometry.n_q_blocks, device=device) + self.geometry.q_block0

    def _per_head(self, t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
        """`[rows]` stays (shared); `[rows, H]` (or `[rows, H, 1, 1]`) -> broadcastable to tile scores
        viewed as `[B, Hkv, c, G, bs, S*bs]`."""
        if t.shape[0] != rows:
            raise ValueError(f"{name} must have {rows} rows, got shape {tuple(t.shape)}")
        if t.dim() == 1:
            return t.to(self.acc)
        t = t.reshape(rows, -1)
        if t.shape[1] != self.n_heads:
            raise ValueError(f"per-head {name} has {t.shape[1]} heads, the query has {self.n_heads}")
        return t.to(self.acc).view(rows, 1, self.n_kv_heads, 1, self.groups, 1, 1)

    def blocked_queries(self, query: torch.Tensor) -> torch.Tensor:
        """`[B, H, Q, D]` -> `[B, Hkv, nQB, G * bs, D]` (padding rows are zeros). A view, no copy,
        for aligned lengths without grouped heads (long MHA prefill)."""
        g, bs = self.geometry, self.geometry.block_size
        B, H, _, D = query.shape
        q = query if g.front_pad == self.q_tail == 0 else torch.nn.functional.pad(query, (0, 0, g.front_pad, self.q_tail))
        q = q.view(B, self.n_kv_heads, self.groups, g.n_q_blocks, bs, D).permute(0, 1, 3, 2, 4, 5)
        return q.reshape(B, self.n_kv_heads, g.n_q_blocks, self.groups * bs, D)

    def unblock_queries(self, q_blocks: torch.Tensor) -> torch.Tensor:
        """Inverse of `blocked_queries`, padding rows dropped: -> `[B, H, Q, D]`."""
        g, bs = self.geometry, self.geometry.block_size
        B, D = q_blocks.shape[0], q_blocks.shape[-1]
        x = q_blocks.view(B, self.n_kv_heads, g.n_q_blocks, self.groups, bs, D).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(B, self.n_heads, g.n_q_blocks * bs, D)
        if g.front_pad == self.q_tail == 0:
            return x  # no slice: its backward would allocate a full-size gradient
        return x[:, :, g.front_pad : g.front_pad + g.q_len]

    def flat_blocks(self, kv: torch.Tensor) -> torch.Tensor:
        """`[B, Hkv, K, D]` -> `[B * Hkv * nKB, bs, D]` (tail padded with zeros; a view when K is a
        multiple of the block size)."""
        bs = self.geometry.block_size
        kv = kv if self.k_pad == 0 else torch.nn.functional.pad(kv, (0, 0, 0, self.k_pad))
        return kv.reshape(-1, bs, kv.shape[-1])

    def gather(self, flat: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """The selected blocks of query blocks [c0, c1): `[B, Hkv, c, S * bs, D]`."""
        idx = self.flat_idx[:, :, c0:c1]
        out = flat.index_select(0, idx.reshape(-1))
        return out.view(*idx.shape[:3], idx.shape[3] * self.geometry.block_size, flat.shape[-1])

    def keep(self, c0: int, c1: int) -> torch.Tensor:
        """Boolean keep mask of a tile, broadcastable to `[B, Hkv, c, G, bs, S * bs]`."""
        g, bs = self.geometry, self.geometry.block_size
        device = self.block_idx.device
        idx, valid = self.block_idx[:, :, c0:c1], self.block_valid[:, :, c0:c1]
        tok = torch.arange(bs, device=device)
        k_pos = (idx[..., None] * bs + tok).flatten(-2)  # [B, Hkv, c, S*bs]
        keep = (valid[..., None].expand(*valid.shape, bs).flatten(-2)) & (k_pos < g.k_len)
        keep = keep[:, :, :, None, None, :]
        if g.causal:
            q_pos = (torch.arange(c0, c1, device=device)[:, None] + g.q_block0) * bs + tok  # [c, bs]
            keep = keep & (k_pos[:, :, :, None, None, :] <= q_pos[None, None, :, None, :, None])
        if self.mask is not None:
            m = self.mask[:, :, :, c0:c1]  # [B, Hkv, G, c, bs, nKB, bs]
            index = idx[:, :, None, :, None, :, None].expand(*m.shape[:5], idx.shape[-1], bs)
            m = m.gather(5, index).permute(0, 1, 3, 2, 4, 5, 6).flatten(-2)  # [B, Hkv, c, G, bs, S*bs]
            keep = keep & m
        return keep

    def mask_tile_(self, y: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """Set the masked scores of a tile `[B, Hkv, c, G, bs, S*bs]` to -inf, in place."""
        return y.masked_fill_(~self.keep(c0, c1), float("-inf"))

    def additive_mask(self, c0: int, c1: int, dtype) -> torch.Tensor:
        """The tile's keep mask as 0 / -inf, broadcastable to `[B, Hkv, c, G*bs, S*bs]`.

        Causal calls without a mask whose local block is forced (the common LM case) need no
        token-level mask but the causal triangle of the local slot (slot 1, see `select_blocks`):
        padding keys past the last query are inside it. Once every slot of the tile is filled (all
        but the first `top_k + 1` query blocks) that is one `[G*bs, S*bs]` pattern for all tiles.
        """
        bs = self.geometry.block_size
        if self.local_fast:
            pattern = self._local_pattern(dtype)
            valid = self.block_valid[:, :, c0:c1]
            if bool(valid.all()):
                return pattern.expand(*valid.shape[:3], *pattern.shape)
            slots = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))
            return pattern + slots.repeat_interleave(bs, dim=-1)[..., None, :]
        keep = self.keep(c0, c1).expand(*self.block_idx[:, :, c0:c1].shape[:3], self.groups, bs, -1)
        zero = torch.zeros((), dtype=dtype, device=keep.device)
        return torch.where(keep, zero, float("-inf")).flatten(3, 4)

    def _local_pattern(self, dtype) -> torch.Tensor:
        bs, S = self.geometry.block_size, self.block_idx.shape[-1]
        if getattr(self, "_pattern", None) is None or self._pattern.dtype != dtype:
            upper = torch.ones(bs, bs, dtype=torch.bool, device=self.block_idx.device).triu_(1)
            masked = torch.zeros(bs, S, bs, dtype=torch.bool, device=upper.device)
            masked[:, 1] = upper
            pattern = torch.zeros(bs, S * bs, dtype=dtype, device=upper.device).masked_fill_(masked.view(bs, -1), float("-inf"))
            self._pattern = pattern.repeat(self.groups, 1)  # rows are (query head in the group, token)
        return self._pattern

    def chunks(self, budget: int = 1 << 20):
        """Query-block ranges whose tiles hold about `budget` scores (cache-sized work units)."""
        g = self.geometry
        per_block = self.batch * self.n_heads * g.block_size * self.block_idx.shape[-1] * g.block_size
        step = max(1, budget // max(per_block, 1))
        for c0 in range(0, g.n_q_blocks, step):
            yield c0, min(g.n_q_blocks, c0 + step)
