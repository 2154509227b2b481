"""Active-learning strategies and the review records they read."""
from .review import (MAX_REASON_CHARS, VERDICTS, NextUnreviewed, audit_trail, has_image, record_result,
                     record_verdict, results_of)

__all__ = ["MAX_REASON_CHARS", "VERDICTS", "NextUnreviewed", "audit_trail", "has_image", "record_result",
           "record_verdict", "results_of"]
