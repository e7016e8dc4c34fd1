"""A small FastAPI support-chat backend on the agent execution registry (the migration's AFTER).

``app`` wires FastAPI to the registry, ``service`` is the AgentService, ``agents`` the agents,
``domain`` the backend's own business (shared with ``examples/legacy_before``). Run it with
``python -m examples.fastapi_backend``; docs/MIGRATION.md walks through it.
"""
