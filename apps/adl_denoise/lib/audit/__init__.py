"""The audit trail: an append-only, hash-chained JSON-lines log (:mod:`.log`, standard library only), the
identity of input volumes (:mod:`.identity`), its default folder (:mod:`.location`) and what the server records
in it (:mod:`.recording`)."""
from .log import (GENESIS, LOG_NAME, AuditBrokenError, AuditError, AuditLog, AuditReadError, AuditWriteError,
                  Verification, canonical_json, entry_hash, sanitise)

__all__ = ["GENESIS", "LOG_NAME", "AuditBrokenError", "AuditError", "AuditLog", "AuditReadError", "AuditWriteError",
           "Verification", "canonical_json", "entry_hash", "sanitise"]
