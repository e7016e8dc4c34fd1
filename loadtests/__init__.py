"""Load tests for the agent execution registry: Locust users, a pure checker and a runner.

Import rules: :mod:`loadtests.checker` and :mod:`loadtests.wire` are pure (no locust, gevent or
trio) so both the gevent Locust users and the trio benchmark load generator can reuse them.
:mod:`loadtests.locustfile` imports locust and must never share a process with trio.
"""
