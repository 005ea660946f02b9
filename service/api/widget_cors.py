"""Cross-origin access for the feedback widget: pages on CHATLOOP_WIDGET_ORIGINS may call the feedback routes
from the browser, and nothing else.

Only those routes answer CORS, so a page elsewhere cannot even send an `Authorization` header to the API (the
browser's preflight fails), and a widget page cannot chat or reach the admin routes from the browser. Widget
pages hold their key in plain sight, so it must be a user-role key: an admin key arriving with a widget origin is
refused (deps.get_caller, auth.refuse_admin_from_widget).
"""

import functools

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

WIDGET_ROUTES = frozenset({"/v1/feedback", "/v1/comparisons"})


@functools.cache
def parse_origins(setting: str) -> frozenset[str]:
    return frozenset(o.strip().rstrip("/").lower() for o in setting.split(",") if o.strip())


class WidgetCORSMiddleware:
    def __init__(self, app: ASGIApp, origins: str) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app, allow_origins=sorted(parse_origins(origins)), allow_methods=["POST"],
            allow_headers=["authorization", "content-type"], max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in WIDGET_ROUTES:
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
