"""Fine-tuning engine: ``train(model, tokenizer, train_set, cfg_train, out_dir, ...)`` (see ``trainer``)."""

from qwha.finetune.config import TrainConfig
from qwha.finetune.trainer import train

__all__ = ["TrainConfig", "train"]
