from .launch import launch
from .trainer import Trainer, create_ddp_model

__all__ = ["launch", "Trainer", "create_ddp_model"]
