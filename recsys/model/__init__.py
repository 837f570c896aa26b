"""The GRU4Rec network and what trains and ships it: losses, sampling, batching, optimiser, checkpoint."""

from recsys import lazy_exports

__all__ = ["GRU4Rec", "GRU4RecRecommender", "SessionParallelTrainer", "build_model", "load_checkpoint",
           "save_checkpoint"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "GRU4Rec": "gru4rec", "GRU4RecRecommender": "recommender", "SessionParallelTrainer": "step",
    "build_model": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
})
