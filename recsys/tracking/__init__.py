"""Tracking stage: MLflow runs, the model registry, the champion/challenger gate, lineage and run reports."""

from recsys import lazy_exports

__all__ = ["PromotionDecision", "TrackingUnavailableError", "connect", "promote", "register_checkpoint",
           "resolve_model", "resolve_tracking_uri", "tracked_training"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "tracked_training": "runs", "register_checkpoint": "runs", "promote": "promotion",
    "PromotionDecision": "promotion", "resolve_model": "registry", "connect": "store",
    "resolve_tracking_uri": "store", "TrackingUnavailableError": "store",
})
