"""Model cards for MultiMax checkpoints, rendered with huggingface_hub from `templates/multimax.md.j2`."""

from __future__ import annotations

import platform
from importlib.resources import files

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..layers.multimax import MultiMaxModulator

__all__ = ["TEMPLATE", "build_model_card"]

# Package data (setup.py's package_data), read through importlib.resources: it is then found wherever
# the package is installed (wheel, editable, zip), not only in a checkout of the repository.
TEMPLATE = files(__package__) / "templates" / "multimax.md.j2"
ARXIV = {"multimax": "2406.01189"}

# model class name suffix -> (pipeline tag, task type for model-index)
_TASKS = {
    "ForCausalLM": ("text-generation", "text-generation"),
    "ForSequenceClassification": ("text-classification", "text-classification"),
    "ForImageClassification": ("image-classification", "image-classification"),
    "ForMaskedLM": ("fill-mask", "fill-mask"),
}


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


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
) -> ModelCard:
    """A `ModelCard` for a MultiMax model: YAML metadata (library, tags, base model, MultiMax
    settings, model-index with the eval results) and a body with a usage snippet and citations.

    Args:
        model: the `PreTrainedModel` being published (with MultiMax attention).
        repo_id (`str`): where it will live on the Hub; used in the usage snippet.
        eval_results (`dict`, *optional*): e.g. `{"eval_accuracy": 0.93}`; `eval_` prefixes are dropped.
    """
    config = model.config
    settings = getattr(config, "multimax", None)
    if not settings:
        raise ValueError(f"{type(model).__name__} has no MultiMax settings (config.multimax): nothing to describe")
    name = type(model).__name__
    suffix = next((s for s in _TASKS if name.endswith(s)), None)
    pipeline_tag, task_type = _TASKS.get(suffix, (None, None))
    auto_class = f"AutoModel{suffix}" if suffix else "AutoModel"
    dataset_name = dataset_id or training_data or "generated"
    results = [
        EvalResult(task_type=task_type or "other", dataset_type=dataset_id or "generated", dataset_name=dataset_name,
                   metric_type=key.removeprefix("eval_"), metric_value=float(value))
        for key, value in (eval_results or {}).items()
        if isinstance(value, (int, float)) and not key.endswith(("runtime", "per_second", "epoch"))
    ]
    modulators = [m for m in model.modules() if isinstance(m, MultiMaxModulator)]
    data = ModelCardData(
        library_name="transformers",
        license=license,
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        pipeline_tag=pipeline_tag,
        tags=["hf-multimax", "multimax", "attention", f"arxiv:{ARXIV['multimax']}"],
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
        multimax=dict(settings),
        training_data=training_data,
    )
    if not TEMPLATE.is_file():
        raise FileNotFoundError(
            f"model card template not found at {TEMPLATE}: this hf-multimax install lacks its package data; "
            "reinstall it with `pip install .` from a clone (setup.py's package_data ships hub/templates/*.md.j2)"
        )
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE.read_text(encoding="utf-8"),
        model_name=repo_id.split("/")[-1],
        base_model=base_model,
        multimax=settings,
        n_scalars=sum(p.numel() for m in modulators for p in m.parameters()),
        n_modules=len(modulators),
        training_data=training_data,
        hardware=_hardware(),
        training_args=training_args,
        eval_results=results,
        auto_class=auto_class,
        repo_id=repo_id,
    )
