"""Every Redis key chatloop uses, in one place.

chatloop:completion:<id>      JSON of one answered request (all its choices); expires unless rated, and a rated
                              one is deleted once no event in the stream holds it
chatloop:vote:<vote key>      hash: the current vote of one voter on one answer (or one comparison); deleted
                              when its event leaves the stream
chatloop:feedback:events      stream of feedback events (thumbs, comparisons); every training run reads it;
                              the newest `feedback_max_events` are kept (feedback_store.py)
chatloop:feedback:holds       hash: completion key -> events in the stream that hold it (rated answers)
chatloop:feedback:stats       hash of counters (thumbs_up, thumbs_down, comparisons, pairs, events...)
chatloop:feedback:trained     the `events` count the last training run had seen
chatloop:apikey:<sha256>      hash: one API key (id, role, name, created); only the hash is stored
chatloop:apikeys              hash: key id -> sha256, for listing and revoking
chatloop:ratelimit:<who>:<route>:<minute>  request counter of one fixed one-minute window
"""

PREFIX = "chatloop"
EVENTS = f"{PREFIX}:feedback:events"
STATS = f"{PREFIX}:feedback:stats"
TRAINED_EVENTS = f"{PREFIX}:feedback:trained"
HOLDS = f"{PREFIX}:feedback:holds"
API_KEYS = f"{PREFIX}:apikeys"


def completion(completion_id: str) -> str:
    return f"{PREFIX}:completion:{completion_id}"


def vote(vote_key: str) -> str:
    return f"{PREFIX}:vote:{vote_key}"


def api_key(digest: str) -> str:
    return f"{PREFIX}:apikey:{digest}"


def rate_limit(who: str, route: str, window: int) -> str:
    return f"{PREFIX}:ratelimit:{who}:{route}:{window}"
