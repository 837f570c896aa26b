"""Serving stage: viewer histories, batch scoring with the champion, sharding, atomic exports."""

from recsys import lazy_exports

__all__ = ["complete_partitions", "load_histories", "publish_recs", "read_manifest", "read_recs",
           "score_users"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "score_users": "score", "load_histories": "histories", "publish_recs": "export", "read_recs": "export",
    "read_manifest": "export", "complete_partitions": "export",
})
