"""Save + card + push: the folder a MultiMax checkpoint is published as."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from .card import build_model_card

__all__ = ["publish", "stage_folder"]

logger = logging.getLogger(__name__)


def stage_folder(model, folder, repo_id, *, tokenizer=None, **card_kwargs) -> Path:
    """Write exactly what will be uploaded: weights (safetensors), config.json (with the MultiMax
    settings), the tokenizer if given, and README.md (the model card)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    build_model_card(model, repo_id, **card_kwargs).save(folder / "README.md")
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
    commit_message: str = "Upload MultiMax model with hf-multimax",
    **card_kwargs,
) -> dict:
    """Stage the folder (in `local_dir`, else a temporary one) and upload it with huggingface_hub:
    `create_repo` then `upload_folder`. The token comes from `token` or the usual places
    (`HF_TOKEN`, `hf auth login`). With `dry_run=True` nothing is sent: the staged folder and
    the calls that would be made are returned.
    """
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
