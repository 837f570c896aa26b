"""Training stage: train (select, refit, test), the one evaluation protocol, baselines, tuning."""

from recsys import lazy_exports

__all__ = ["ItemKNN", "MostPopular", "Recommender", "TrainResult", "evaluate_all", "evaluate_recommender",
           "fit_baselines", "train_model"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "train_model": "train", "TrainResult": "train", "evaluate_all": "evaluate",
    "evaluate_recommender": "evaluate", "Recommender": "protocol", "fit_baselines": "baselines",
    "ItemKNN": "baselines", "MostPopular": "baselines",
})
