"""BEFORE: the hand-written WebSocket/agent glue the migration deletes (see ``app``)."""
