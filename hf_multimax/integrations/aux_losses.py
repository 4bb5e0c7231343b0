"""Auxiliary training losses (the SparseMix scorers' KL term), collected per forward.

Attention functions cannot return extra outputs through transformers' models, and state left on
modules is lost or mixed up (tuple outputs, custom losses, two threads on one model). So a training
forward that wants to add a term adds it to the collector that the caller opened around the forward;
the caller adds `aux.loss()` to its loss. `MultiMaxTrainer.compute_loss` does this for the Trainer.

    with collect_aux_losses() as aux:
        outputs = model(**batch)
    loss = outputs.loss + aux.loss()

The collector lives in a `ContextVar`: each thread (and asyncio task) has its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging

import torch

__all__ = ["AuxLosses", "active_aux_losses", "collect_aux_losses"]

logger = logging.getLogger(__name__)

_ACTIVE: contextvars.ContextVar["AuxLosses | None"] = contextvars.ContextVar("hf_multimax_aux_losses", default=None)


class AuxLosses:
    """The weighted auxiliary terms added during one `collect_aux_losses()` block, by name
    (`"sparsemix_kl"`), one entry per layer and forward."""

    def __init__(self):
        self.terms: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        self.terms.setdefault(name, []).append(value)

    def loss(self) -> torch.Tensor | float:
        """Sum over names of the mean over entries (layers): the term to add to the training loss;
        `0.0` when nothing was added (eval mode, short inputs, weight 0)."""
        parts = [torch.stack(values).mean() for values in self.terms.values() if values]
        return torch.stack(parts).sum() if parts else 0.0

    def values(self) -> dict[str, float]:
        """The detached mean of each term, for logging."""
        return {name: torch.stack(v).mean().item() for name, v in self.terms.items() if v}


@contextlib.contextmanager
def collect_aux_losses():
    """Collect the auxiliary losses of the forwards run inside the block (see the module docstring)."""
    aux = AuxLosses()
    token = _ACTIVE.set(aux)
    try:
        yield aux
    finally:
        _ACTIVE.reset(token)


def active_aux_losses(name: str) -> AuxLosses | None:
    """The collector of this context, or None, said once per process: a training forward that
    computes `name` outside `collect_aux_losses()` would otherwise drop it without a word."""
    aux = _ACTIVE.get()
    # Only a forward that builds a graph trains: a train-mode model run under torch.no_grad() (a model
    # from from_config is in train mode) loses nothing. A checkpointed layer recomputed during backward
    # runs after the block closed: nothing is lost either. (A reentrant checkpoint's forward runs under
    # no_grad, so it goes unwarned; transformers' gradient checkpointing is non-reentrant by default.)
    if aux is None and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
        _warn_uncollected(name)
    return aux


@functools.cache
def _warn_uncollected(name: str) -> None:
    logger.warning(
        "A training forward computed the auxiliary loss %r outside `hf_multimax.collect_aux_losses()`, so it is not "
        "part of any loss and what it trains (the SparseMix scorers) does not learn. Train with "
        "hf_multimax.training.MultiMaxTrainer, or wrap the forward in `with collect_aux_losses() as aux:` and add "
        "`aux.loss()` to the loss (or set its weight to 0).", name,
    )
