"""Model cards for the checkpoints of every plugin method, rendered with huggingface_hub from
`templates/<method>.md.j2` (`templates/plugin.md.j2` for a method without its own: the entmax
baselines). The card dispatches on the method(s) the checkpoint's config names; its settings (and
those of every layer the method attaches, e.g. SparseMix's MultiMax normalizer) go to the metadata
under their config keys, so the published card says what `config.json` says."""

from __future__ import annotations

import platform
from collections import Counter
from importlib.resources import files

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..integrations.attach import config_tree
from ..integrations.methods import Method, method_of
from ..layers.base import MethodLayer

__all__ = ["TEMPLATE", "TEMPLATES", "build_model_card", "checkpoint_methods", "last_training_values", "run_hardware"]

# Package data (setup.py's package_data), read through importlib.resources: it is then found wherever
# the package is installed (wheel, editable, zip), not only in a checkout of the repository.
TEMPLATES = files(__package__) / "templates"
TEMPLATE = TEMPLATES / "multimax.md.j2"  # the MultiMax card's (kept: its first name)
ARXIV = {"multimax": "2406.01189"}

# model class name suffix -> (pipeline tag, task type for model-index)
_TASKS = {
    "ForCausalLM": ("text-generation", "text-generation"),
    "ForSequenceClassification": ("text-classification", "text-classification"),
    "ForImageClassification": ("image-classification", "image-classification"),
    "ForMaskedLM": ("fill-mask", "fill-mask"),
}
# Trainer's bookkeeping, not results.
_NOT_RESULTS = ("runtime", "per_second", "epoch", "step", "total_flos", "grad_norm", "learning_rate")


def run_hardware(args=None) -> str:
    """What the calling process trains on: `"2 x NVIDIA H100 80GB HBM3 (2 processes)"` or
    `"CPU (x86_64, 2 threads)"`. Call it in the training run (the Trainer does, with its
    `TrainingArguments`): a card written elsewhere would describe the publishing machine instead."""
    device = getattr(args, "device", None)
    world = getattr(args, "world_size", 1) or 1
    processes = f" ({world} processes)" if world > 1 else ""
    if (device is not None and device.type == "cuda") or (device is None and torch.cuda.is_available()):
        index = device.index if device is not None and device.index is not None else 0
        count = max(world, getattr(args, "n_gpu", 0) or 0) if args is not None else torch.cuda.device_count()
        return f"{count} x {torch.cuda.get_device_name(index)}{processes}"
    if device is not None and device.type != "cpu":
        return f"{max(world, 1)} x {device.type}{processes}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads){processes}"


def last_training_values(log_history: list[dict]) -> dict[str, float] | None:
    """The last training log entry of a `Trainer` run (`trainer_state.json`'s `log_history`): the loss
    and the auxiliary terms logged beside it (`sparsemix_kl`); not Trainer's bookkeeping, nor the
    callbacks' per-module values (named with a `/`)."""
    last = next((h for h in reversed(log_history or []) if "loss" in h), None)
    if last is None:
        return None
    return {k: v for k, v in last.items() if isinstance(v, (int, float)) and "/" not in k and k not in _NOT_RESULTS}


def checkpoint_methods(model) -> list[Method]:
    """The plugin methods `model`'s config (or a sub-config) names, top-level first."""
    found = (method_of(c.__dict__.get("_attn_implementation_internal")) for c in config_tree(model.config))
    return list({m.name: m for m in found if m is not None}.values())


def _settings_of(method: Method, config) -> dict[str, dict]:
    """`{config key: settings dict}` for the method and every layer it attaches with these settings."""
    if method.settings is None:
        return {}
    own = method.settings.from_config(config)
    out = {method.settings.config_key: own.to_dict()}
    for cls in method.layers(own):
        key = cls.settings_cls.config_key
        out.setdefault(key, cls.settings_cls.from_config(config).to_dict())
    return out


def _learned(model) -> list[dict]:
    """Per kind of attached layer: its title, how many modules hold one and their parameter count."""
    modules = [m for m in model.modules() if isinstance(m, MethodLayer)]
    counts = Counter(type(m).title for m in modules)
    params = Counter()
    for m in modules:
        params[type(m).title] += sum(p.numel() for p in m.parameters())
    return [{"title": title, "modules": counts[title], "parameters": params[title]} for title in counts]


def _template(method: Method):
    own = TEMPLATES / f"{method.name}.md.j2"
    template = own if own.is_file() else TEMPLATES / "plugin.md.j2"
    if not template.is_file():
        raise FileNotFoundError(
            f"model card template not found at {template}: this hf-multimax install lacks its package data; "
            "reinstall it with `pip install .` from a clone (setup.py's package_data ships hub/templates/*.md.j2)"
        )
    return template


def build_model_card(
    model,
    repo_id: str,
    *,
    base_model: str | None = None,
    training_data: str | None = None,
    dataset_id: str | None = None,
    eval_results: dict[str, float] | None = None,
    license: str = "apache-2.0",
    training_args: str | None = None,
    hardware: str | None = None,
    training_log: dict[str, float] | None = None,
) -> ModelCard:
    """A `ModelCard` for a checkpoint of any plugin method: YAML metadata (library, tags, base model,
    the settings under their config keys, model-index with the results) and a body from the method's
    template: what the method does, its settings, training, results, a usage snippet, citations.

    Args:
        model: the `PreTrainedModel` being published (its config names a plugin method).
        repo_id (`str`): where it will live on the Hub; used in the usage snippet.
        eval_results (`dict`, *optional*): the run's results, e.g. `{"eval_accuracy": 0.93}` or any
            measured `{"passkey_accuracy_8k": 0.6}`; `eval_` prefixes are dropped, Trainer's
            bookkeeping (runtime, samples per second, epoch) is not a result.
        hardware (`str`, *optional*): what the run trained on (`run_hardware()` in the training
            process; the Trainer records it). Default: "not recorded", never the publishing machine.
        training_log (`dict`, *optional*): last logged training values (loss, `sparsemix_kl`...).
    """
    config = model.config
    methods = checkpoint_methods(model)
    if not methods:
        raise ValueError(
            f"{type(model).__name__} uses no hf-multimax attention method (attn_implementation="
            f"{getattr(config, '_attn_implementation', None)!r}): nothing to describe; convert it first, e.g. "
            "from_pretrained(..., attn_implementation='multimax')"
        )
    method = methods[0]
    settings = {}
    for m in methods:
        for key, value in _settings_of(m, config).items():
            settings.setdefault(key, value)
    name = type(model).__name__
    suffix = next((s for s in _TASKS if name.endswith(s)), None)
    pipeline_tag, task_type = _TASKS.get(suffix, (None, None))
    auto_class = f"AutoModel{suffix}" if suffix else "AutoModel"
    dataset_name = dataset_id or training_data or "generated"
    results = [
        EvalResult(task_type=task_type or "other", dataset_type=dataset_id or "generated", dataset_name=dataset_name,
                   metric_type=key.removeprefix("eval_"), metric_value=float(value))
        for key, value in (eval_results or {}).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith(_NOT_RESULTS)
    ]
    papers = [ARXIV[key] for key in settings if key in ARXIV]
    tags = ["hf-multimax", *(m.name for m in methods), *(k for k in settings if k not in {m.name for m in methods}),
            "attention", *(f"arxiv:{p}" for p in papers)]
    data = ModelCardData(
        library_name="transformers",
        license=license,
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(tags)),
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
        attn_implementation=method.name,
        training_data=training_data,
        training_hardware=hardware,
        training_arguments=training_args,
        **settings,
    )
    template = _template(method)
    layers = [m for m in model.modules() if isinstance(m, MethodLayer)]
    selectors = sorted({m.selector for m in layers if isinstance(getattr(m, "selector", None), str)})
    return ModelCard.from_template(
        data,
        template_str=template.read_text(encoding="utf-8"),
        model_name=repo_id.split("/")[-1],
        method=method.name,
        methods=[m.name for m in methods],
        base_model=base_model,
        settings=settings,
        multimax=settings.get("multimax"),
        sparsemix=settings.get("sparsemix"),
        learned=_learned(model),
        selectors=selectors,
        n_scalars=sum(p.numel() for m in layers if m.attr == "multimax" for p in m.parameters()),
        n_modules=sum(1 for m in layers if m.attr == "multimax"),
        training_data=training_data,
        hardware=hardware,
        training_args=training_args,
        training_log={k: v for k, v in (training_log or {}).items() if isinstance(v, (int, float))},
        eval_results=results,
        auto_class=auto_class,
        repo_id=repo_id,
    )
