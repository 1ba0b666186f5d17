"""Prometheus collectors, defined once at import; callers only increment or observe.

Label values come from small closed sets, never from ids.
"""

from prometheus_client import Counter

# reason: timeout, error (transport), status (non-2xx), invalid (not a chat completion),
# empty (nothing left after cleaning), quoted (repeated the partner's note).
SUGGESTION_FALLBACKS = Counter(
    "gesture_suggestion_fallbacks_total",
    "Suggestions answered by the built-in composer because the configured provider failed",
    ["reason"],
)
