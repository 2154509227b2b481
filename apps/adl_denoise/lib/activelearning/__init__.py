"""Active-learning strategies and the review records they read."""
from .review import (HANDOUT_EVENT, MAX_REASON_CHARS, VERDICTS, NextUnreviewed, NotThisStudysResult, NothingToJudge,
                     ambiguous_images, audit_trail, has_image, reconcile_reviews, record_handout, record_result,
                     record_verdict, refuse_unreviewable, results_of, stored_results)

__all__ = ["HANDOUT_EVENT", "MAX_REASON_CHARS", "VERDICTS", "NextUnreviewed", "NotThisStudysResult", "NothingToJudge",
           "ambiguous_images", "audit_trail", "has_image", "reconcile_reviews", "record_handout", "record_result",
           "record_verdict", "refuse_unreviewable", "results_of", "stored_results"]
