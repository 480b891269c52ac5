"""The training side: one loop (``Trainer``), its multi-task specialisation, replay, the run folder."""

from .callbacks import Callback, EarlyStopping
from .multitask import MultiTaskModel, MultiTaskTrainer, Task
from .replay import Replay
from .trainer import FitResult, Trainer

__all__ = ["Callback", "EarlyStopping", "FitResult", "MultiTaskModel", "MultiTaskTrainer", "Replay", "Task", "Trainer"]
