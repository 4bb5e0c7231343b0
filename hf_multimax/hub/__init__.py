"""Publishing: model cards (one per method) and pushes to the Hub."""

from .card import build_model_card, checkpoint_methods, run_hardware
from .publish import publish, stage_folder

__all__ = ["build_model_card", "checkpoint_methods", "publish", "run_hardware", "stage_folder"]
