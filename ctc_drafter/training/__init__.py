"""Training the CTC draft on distilled shards: data plan, losses, metrics, the accelerate loop."""

from .data import TrainSequence, label_window_lengths, load_sequences, make_batch, sample_positions, split_eval
from .losses import LOSSES, compute_losses, ctc_loss, ce_loss
from .metrics import DraftMetrics, greedy_decodes
from .train import add_train_args, evaluate_draft, run_training

__all__ = ["TrainSequence", "label_window_lengths", "load_sequences", "make_batch", "sample_positions", "split_eval",
           "LOSSES", "compute_losses", "ctc_loss", "ce_loss", "DraftMetrics", "greedy_decodes", "add_train_args",
           "evaluate_draft", "run_training"]
