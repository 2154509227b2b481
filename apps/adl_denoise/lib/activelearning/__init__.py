"""Active-learning strategies and the review records they read."""
from .review import VERDICTS, NextUnreviewed, audit_trail, has_image, record_result, record_verdict

__all__ = ["VERDICTS", "NextUnreviewed", "audit_trail", "has_image", "record_result", "record_verdict"]
