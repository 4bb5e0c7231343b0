"""One backend registry for every method's kernels. Pure Python: no transformers import.

Each `Backend` says whether it can run here at all (`is_available`), whether it can serve one call
correctly (`supports(call) -> (ok, reason)`) and whether `auto` should pick it for that call
(`preferred`, where measurements say it is the fastest that can serve). `auto` walks the backends by
priority and takes the first that is available, supports the call and is preferred; an explicit
name is used as asked, or refused with the reason. There is no fallback to softmax: every backend
of a method computes that method.

`HF_MULTIMAX_DISABLE_BACKENDS="flex,multimax:chunked"` takes backends out (all methods' or one
method's), e.g. to work around a broken compiler stack.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Callable, NamedTuple

__all__ = ["AttentionCall", "Backend", "BackendRegistry", "always"]

DISABLE_ENV = "HF_MULTIMAX_DISABLE_BACKENDS"


class AttentionCall(NamedTuple):
    """What a backend needs to know about one attention call to say whether it can serve it (a
    NamedTuple: built for every attention call, so it must be cheap).

    Attributes:
        device (`str`): `query.device.type`.
        q_len, k_len (`int`): query and key lengths.
        needs_grad (`bool`): a backward will run through the call.
        want_probs (`bool`): the caller asked for the attention probabilities (`output_attentions`).
        dropout (`float`): attention dropout probability (0 outside training).
        same_head_dims (`bool`): query and value heads have the same size.
        modulated (`bool`): the scores go through a learnable modulator (MultiMax's scalars) rather
            than straight into softmax.
        sink_logits (`bool`): the softmax denominator holds an attention-sink logit per head (`s_aux`).
    """

    device: str
    q_len: int
    k_len: int
    needs_grad: bool = False
    want_probs: bool = False
    dropout: float = 0.0
    same_head_dims: bool = True
    modulated: bool = False
    sink_logits: bool = False


def always(call: AttentionCall) -> tuple[bool, str]:
    return True, ""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One kernel of a method.

    Args:
        name (`str`): the name users pass (`backend=` setting, `"<method>:<name>"`).
        kernel (`Callable`): the tensor function (signature of the method's `naive_*` reference).
        priority (`int`): `auto` tries higher priorities first.
        supports (`Callable[[AttentionCall], tuple[bool, str]]`): can it compute this call correctly.
        preferred (`Callable[[AttentionCall], bool]`): should `auto` take it for this call.
        available (`Callable[[], tuple[bool, str]]`): can it run in this process (imports, versions).
        prepare_inference (`Callable`, *optional*): `(theta-like params..., softcap) -> run(query, key,
            value, scale, is_causal)`, the kernel with its learnable inputs converted once, for repeated
            no-gradient calls on unmasked inputs (decoding). Callers rebuild it when the inputs change.
        reads_lengths (`bool`): `supports` or `preferred` look at `q_len`/`k_len`. The registry keeps
            `auto`'s choice per kind of call (lengths aside) when no backend it asked reads them:
            decoding resolves once, not once per token.
    """

    name: str
    kernel: Callable
    priority: int
    supports: Callable[[AttentionCall], tuple[bool, str]] = always
    preferred: Callable[[AttentionCall], bool] = lambda call: True
    available: Callable[[], tuple[bool, str]] = lambda: (True, "")
    reads_lengths: bool = False
    prepare_inference: Callable | None = None

    def is_available(self, method: str) -> tuple[bool, str]:
        value = os.environ.get(DISABLE_ENV, "")
        if value and (self.name in _disabled(value) or f"{method}:{self.name}" in _disabled(value)):
            return False, f"disabled by {DISABLE_ENV}={value!r}"
        return self.available()


def _kind(call: AttentionCall) -> tuple:
    """Everything about a call but its lengths, and the opt-out variable: what `auto`'s choice depends
    on when no backend it asks reads the lengths."""
    return (*call[:1], *call[3:], os.environ.get(DISABLE_ENV, ""))


@functools.lru_cache(maxsize=16)
def _disabled(value: str) -> frozenset[str]:
    return frozenset(n.strip() for n in value.split(",") if n.strip())


class BackendRegistry(Mapping):
    """A method's backends: a mapping name -> kernel, plus `resolve` for `auto`.

    Examples:
        >>> from hf_multimax.ops.multimax import BACKENDS
        >>> BACKENDS.resolve("auto", AttentionCall("cpu", 4096, 4096)).name
        'chunked'
    """

    def __init__(self, method: str, backends: list[Backend]):
        self.method = method
        self._backends = {b.name: b for b in backends}  # iterated in declaration order (reference first)
        self._by_priority = sorted(self._backends.values(), key=lambda b: -b.priority)
        self._chosen: dict[tuple, Backend] = {}  # auto's choices that do not depend on lengths

    def __getitem__(self, name: str) -> Callable:
        return self._backends[name].kernel

    def __setitem__(self, name: str, kernel: Callable) -> None:
        """Swap the kernel of an existing backend (a wrapper for tracing or profiling)."""
        self._backends[name] = dataclasses.replace(self._backends[name], kernel=kernel)
        self._by_priority = sorted(self._backends.values(), key=lambda b: -b.priority)
        self._chosen.clear()

    def __iter__(self):
        return iter(self._backends)

    def __len__(self) -> int:
        return len(self._backends)

    def resolve(self, requested: str, call: AttentionCall) -> Backend:
        """The backend that runs `call`: `requested` if it can, else ValueError saying why; for `auto`
        the first (by priority) that is available, supports the call and is preferred for it."""
        if requested != "auto":
            if requested not in self._backends:
                raise ValueError(
                    f"{self.method} backend={requested!r} is not supported; allowed values: {('auto', *self)}"
                )
            backend = self._backends[requested]
            for ok, reason in (backend.is_available(self.method), backend.supports(call)):
                if not ok:
                    raise ValueError(
                        f"{self.method} backend={requested!r} cannot run this call: {reason}; use backend 'auto' "
                        f"(it picks one that can) or one of {tuple(self)}"
                    )
            return backend
        # Availability can change with the environment variable only (a build is tried once per process).
        kind = _kind(call)
        chosen = self._chosen.get(kind)
        if chosen is not None:
            return chosen
        chosen, asked = self._resolve_auto(call)
        if not any(b.reads_lengths for b in asked):
            self._chosen[kind] = chosen
        return chosen

    def resolve_for_any_length(self, requested: str, call: AttentionCall) -> Backend | None:
        """`resolve(requested, call)` when that choice holds for every q_len/k_len of the same kind
        of call (so a caller may keep it while decoding), else None."""
        backend = self.resolve(requested, call)
        if requested != "auto":
            return None if backend.reads_lengths else backend
        kind = _kind(call)
        return backend if self._chosen.get(kind) is backend else None

    def _resolve_auto(self, call: AttentionCall) -> tuple[Backend, list[Backend]]:
        # Availability is asked last: it may build a kernel, which only a backend that would be
        # taken should pay for.
        reasons, capable, asked = [], [], []
        for backend in self._by_priority:
            asked.append(backend)
            ok, reason = backend.supports(call)
            if not ok:
                reasons.append(f"{backend.name}: {reason}")
            elif not backend.preferred(call):
                capable.append(backend)
            else:
                ok, reason = backend.is_available(self.method)
                if ok:
                    return backend, asked
                reasons.append(f"{backend.name}: {reason}")
        for backend in capable:
            ok, reason = backend.is_available(self.method)
            if ok:
                return backend, asked
            reasons.append(f"{backend.name}: {reason}")
        raise ValueError(f"no {self.method} backend can run this call ({'; '.join(reasons)})")
