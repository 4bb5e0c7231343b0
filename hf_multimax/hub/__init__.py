"""Publishing: model cards and pushes to the Hub."""

from .card import build_model_card
from .publish import publish, stage_folder

__all__ = ["build_model_card", "publish", "stage_folder"]
