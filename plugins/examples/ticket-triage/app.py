"""Support-ticket triage, written in Python to show the plugin contract is language-neutral.

Routes a ticket to a team by keywords from the installation's settings and sets its priority from
the customer's sentiment (the platform's `sentiment` model).

Settings: `routes` (team -> list of keywords; default billing/technical/shipping), `default_team`
("general"), `urgent_negative_above` (0.7), `high_negative_above` (0.4).
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.handler import Error_Failed, Error_InvalidRequest
from wit_world.imports import config, inference, log

DEFAULT_ROUTES = {
    "billing": ["invoice", "refund", "charge", "payment", "price"],
    "technical": ["error", "crash", "bug", "login", "password"],
    "shipping": ["delivery", "order", "package", "tracking"],
}


def setting(key, default):
    raw = config.get(key)
    return default if raw is None else json.loads(raw)


class Handler(exports.Handler):
    def handle(self, request: str) -> str:
        try:
            ticket = json.loads(request)
        except ValueError as err:
            raise Err(Error_InvalidRequest(f"the request is not JSON: {err}"))
        text = " ".join(
            str(ticket.get(field, "")) for field in ("subject", "body") if isinstance(ticket, dict)
        ).strip()
        if not text:
            raise Err(Error_InvalidRequest("`subject` or `body` (text) is required"))

        routes = setting("routes", DEFAULT_ROUTES)
        words = text.lower()
        scores = {
            team: [k for k in keywords if k.lower() in words] for team, keywords in routes.items()
        }
        team, matched = max(scores.items(), key=lambda item: len(item[1]), default=(None, []))
        if not matched:
            team = setting("default_team", "general")

        try:
            mood = inference.classify("sentiment", [text])[0]
        except Err as err:
            raise Err(Error_Failed(f"sentiment: {err.value.value}"))
        negative = next((s.score for s in mood.scores if s.label == "negative"), 0.0)
        if negative > setting("urgent_negative_above", 0.7):
            priority = "urgent"
        elif negative > setting("high_negative_above", 0.4):
            priority = "high"
        else:
            priority = "normal"
        log.log(log.Level.INFO, f"ticket routed to {team} ({priority})")
        return json.dumps({
            "team": team,
            "priority": priority,
            "matched_keywords": matched,
            "sentiment": {"label": mood.label, "negative": negative},
        })
