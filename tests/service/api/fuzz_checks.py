"""schemathesis checks for test_fuzz.py (loaded by the CLI through SCHEMATHESIS_HOOKS).

A body the published schema allows is never refused by request validation: validation refusals carry the code
"invalid_request" (service/api/errors.py). Refusals that no schema can express (an unknown completion, a prompt
past the context, a ranking of the wrong length for the answers it names) carry their own codes and stay allowed;
schemathesis's own positive_data_acceptance cannot tell the two apart, as it judges by status code alone.
"""

import schemathesis


@schemathesis.check
def schema_valid_body_passes_validation(ctx, response, case) -> None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code not in (400, 422):
        return
    error = (response.json() or {}).get("error") or {}
    if error.get("code") == "invalid_request":
        raise AssertionError(f"the schema allows this request, but validation refused it: {error.get('message')}")


@schemathesis.check
def streams_end_without_error(ctx, response, case) -> None:
    """A stream's status went out before its generation ran: a failure there is an error event in a 200."""
    event_stream = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
    if not event_stream or response.stream_cut_short:
        return
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    if events[-1:] != ["[DONE]"] or any('"error"' in event[:10] for event in events):
        raise AssertionError(f"the stream broke off: {events[-1:]}")
