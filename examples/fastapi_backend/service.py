"""AgentService after the migration: the plan's AFTER pattern, in its block form.

``open_execution_context`` registers the run (deduplicated per user and ``request_id``,
counted against the limits, followed by every socket the user has open) and makes the block
the run's cancel scope. Whatever ends the block, the run ends with exactly one
``agent_completed`` that reached the client before the block is left:

* the supervisor returns: ``complete_execution`` ends the run ``succeeded`` with its result;
* the agent raises: the run ends ``failed`` and the exception goes on to the caller;
* the user cancels over ``/ws``, ``agent_timeout_s`` passes, the stale sweep or the
  server's shutdown: the block is cancelled and the run ends ``cancelled`` / ``timed_out``.

What docs/MIGRATION.md counts as integration code is between ``# [glue]`` and ``# [/glue]``.
"""

from __future__ import annotations

from typing import final

from examples.fastapi_backend.domain import ChatReply, ChatRequest, ConversationStore
from registry import DuplicateRun, Run, Supervisor, get_agent_execution_registry

__all__ = ["AgentService"]


@final
class AgentService:
    """Runs an agent for each chat message and keeps the replies.

    Args:
        supervisor: Runs the backend's agents (see ``agents.build_supervisor``).
        history: Where replies are kept.
    """

    def __init__(self, supervisor: Supervisor, history: ConversationStore) -> None:
        self.supervisor = supervisor
        self.history = history

    async def execute_agent(self, user_id: str, request: ChatRequest) -> ChatReply:
        """Runs ``request.agent`` on the message; returns the reply once the run has ended.

        The run's events go to the user's open ``/ws`` sockets as they happen. A repeated
        ``request_id`` (a retry, a double click) starts nothing: it waits for the first
        run and answers with its reply, marked ``duplicate``.

        Raises:
            UnknownAgent, InvalidField, RateLimited, Overloaded, RegistryClosed: the run
                could not start.
            Exception: what the agent raised (the run has ended ``failed``, and the client
                has been told, before this is raised).
        """
        # [glue]
        orchestrator = await get_agent_execution_registry()
        try:
            async with orchestrator.open_execution_context(
                agent_type=request.agent, user_id=user_id, message=request.message,
                context={"request_id": request.request_id, "thread_id": request.thread_id},
            ) as (context, _notifier):
                result = await self.supervisor.run(
                    request.message, context.thread_id, user_id, context.run_id)
                await orchestrator.complete_execution(context, result)
        except DuplicateRun as exc:
            assert isinstance(exc.run, Run)
            return await _reply(exc.run, duplicate=True)
        # [/glue]
        reply = await _reply(context)
        self.history.record(user_id, reply)
        return reply


# [glue]
async def _reply(run: Run, *, duplicate: bool = False) -> ChatReply:
    """The reply for a run, once it has ended (its ``agent_completed`` payload)."""
    final = await run.wait_done()
    return ChatReply(run_id=run.run_id, thread_id=run.thread_id, status=str(final["status"]),
                     result=final.get("result"), error=final.get("error"), duplicate=duplicate)
# [/glue]
