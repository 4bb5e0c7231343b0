"""Save + card + push: the folder a checkpoint of any plugin method is published as."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from .card import build_model_card, checkpoint_methods

__all__ = ["publish", "stage_folder"]

logger = logging.getLogger(__name__)


def stage_folder(model, folder, repo_id, *, tokenizer=None, **card_kwargs) -> Path:
    """Write exactly what will be uploaded: weights (safetensors), config.json (with the method's
    settings), the tokenizer if given, and README.md (the method's model card, `build_model_card`)."""
    folder = Path(folder)
    card = build_model_card(model, repo_id, **card_kwargs)  # first: a model it cannot describe writes nothing
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    card.save(folder / "README.md")
    return folder


def publish(
    model,
    repo_id: str,
    *,
    tokenizer=None,
    private: bool = False,
    token: str | None = None,
    local_dir: str | None = None,
    dry_run: bool = False,
    commit_message: str | None = None,
    **card_kwargs,
) -> dict:
    """Stage the folder (in `local_dir`, else a temporary one) and upload it with huggingface_hub:
    `create_repo` then `upload_folder`. The token comes from `token` or the usual places
    (`HF_TOKEN`, `hf auth login`). With `dry_run=True` nothing is sent: the staged folder and
    the calls that would be made are returned. `card_kwargs` go to `build_model_card` (base model,
    training data, results, the run's hardware...). The commit message names the method by default.
    """
    if commit_message is None:
        names = " + ".join(m.name for m in checkpoint_methods(model)) or "a"
        commit_message = f"Upload {names} model with hf-multimax"
    folder = Path(local_dir) if local_dir else Path(tempfile.mkdtemp(prefix="hf_multimax_publish_"))
    stage_folder(model, folder, repo_id, tokenizer=tokenizer, **card_kwargs)
    calls = [
        ("create_repo", {"repo_id": repo_id, "private": private, "exist_ok": True}),
        ("upload_folder", {"repo_id": repo_id, "folder_path": str(folder), "commit_message": commit_message}),
    ]
    plan = {"folder": str(folder), "files": sorted(p.name for p in folder.iterdir()), "calls": calls}
    if dry_run:
        logger.info("dry run: would call %s", calls)
        return plan
    api = HfApi(token=token)
    for method, kwargs in calls:
        result = getattr(api, method)(**kwargs)
    plan["commit_url"] = str(result)
    return plan
