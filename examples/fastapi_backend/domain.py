"""The support backend's own business: orders, help articles, answers, history and users.

Nothing here knows about WebSockets, runs or the registry. Both examples import this module
unchanged (``examples/legacy_before`` too), so what differs between them is only the glue
that docs/MIGRATION.md measures.
"""

from __future__ import annotations

import re
from typing import Any, Final

import anyio
import jwt
from pydantic import BaseModel, Field

__all__ = [
    "TYPING_DELAY_S",
    "ChatReply",
    "ChatRequest",
    "ConversationStore",
    "Unauthorized",
    "compose_answer",
    "find_order",
    "greeting",
    "order_number",
    "search_help",
    "user_from_token",
    "words",
]

#: Pause between two streamed words of an answer (what the user sees as typing).
TYPING_DELAY_S: Final = 0.02

_ORDERS: Final[dict[str, dict[str, str]]] = {
    "1001": {"order_id": "1001", "item": "espresso machine", "status": "shipped",
             "eta": "Thursday"},
    "1002": {"order_id": "1002", "item": "milk frother", "status": "being packed",
             "eta": "next week"},
}

_ARTICLES: Final[dict[str, str]] = {
    "Where is my order?": "order shipped delivery track tracking where eta",
    "Returns and refunds": "return refund money back broken damaged",
    "Descaling your machine": "espresso machine descale clean limescale taste",
    "Changing your address": "address move change delivery",
}

_ORDER_NUMBER: Final = re.compile(r"#\s*(\d{3,10})\b")


class ChatRequest(BaseModel):
    """What the browser posts to ``/api/chat``."""

    message: str = Field(min_length=1, max_length=4000)
    request_id: str = Field(min_length=1, max_length=128)
    agent: str = "support"
    thread_id: str | None = Field(default=None, min_length=1, max_length=128)


class ChatReply(BaseModel):
    """What ``/api/chat`` answers once the run has ended (its events went over ``/ws``)."""

    run_id: str
    thread_id: str
    status: str
    result: Any = None
    error: str | None = None
    duplicate: bool = False


class ConversationStore:
    """Each user's past replies (a database in a real backend)."""

    def __init__(self) -> None:
        self._replies: dict[str, list[ChatReply]] = {}

    def record(self, user_id: str, reply: ChatReply) -> None:
        self._replies.setdefault(user_id, []).append(reply)

    def replies(self, user_id: str) -> list[ChatReply]:
        return list(self._replies.get(user_id, ()))


class Unauthorized(Exception):
    """The request carries no valid token."""


def user_from_token(token: str | None, secret: str) -> str:
    """The user id (claim ``sub``) of an HS256 token signed with ``secret``.

    The same tokens open the chat WebSocket, so one login serves both.

    Raises:
        Unauthorized: no token, a bad signature, no ``exp`` or ``sub``, or expired.
    """
    if not token:
        raise Unauthorized("no token")
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"],
                            options={"require": ["exp", "sub"]})
    except jwt.PyJWTError as exc:
        raise Unauthorized(str(exc)) from None
    user_id = claims["sub"]
    if not isinstance(user_id, str) or not user_id:
        raise Unauthorized("sub is not a user id")
    return user_id


def order_number(message: str) -> str | None:
    """The order number a message mentions (``#1001``), if any."""
    match = _ORDER_NUMBER.search(message)
    return match[1] if match else None


async def find_order(order_id: str) -> dict[str, str]:
    """The order from the order service.

    Raises:
        LookupError: no such order.
    """
    await anyio.sleep(0.05)  # the order service's latency
    try:
        return dict(_ORDERS[order_id])
    except KeyError:
        raise LookupError(f"no order #{order_id}") from None


async def search_help(query: str) -> list[str]:
    """Titles of the help articles that share words with ``query``, best first."""
    await anyio.sleep(0.1)  # the search index's latency
    asked = set(re.findall(r"[a-z]+", query.lower()))
    scored = [(len(asked & set(keywords.split())), title)
              for title, keywords in _ARTICLES.items()]
    return [title for score, title in sorted(scored, key=lambda s: -s[0]) if score][:2]


def compose_answer(order: dict[str, str] | None, order_id: str | None,
                   articles: list[str]) -> str:
    """The support answer for what the lookups found."""
    parts = []
    if order is not None:
        parts.append(f"Your order #{order['order_id']} ({order['item']}) is {order['status']}"
                     f" and should reach you {order['eta']}.")
    elif order_id is not None:
        parts.append(f"I could not find an order #{order_id}; please check the number on"
                     " your confirmation email.")
    if articles:
        parts.append("These help articles may answer the rest: " + "; ".join(articles) + ".")
    parts.append("Is there anything else I can do for you today?")
    return " ".join(parts)


def greeting(message: str) -> str:
    """A friendly answer to small talk."""
    return (f"Thanks for your message ({len(message.split())} words)! I am the support"
            " assistant: ask me about an order, a return or your machine.")


def words(text: str) -> list[str]:
    """``text`` cut into the pieces an answer is streamed in (each with its space)."""
    pieces = text.split(" ")
    return [piece + " " for piece in pieces[:-1]] + pieces[-1:]
