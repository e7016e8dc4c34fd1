"""A nursery-scoped agent execution registry for real-time chat backends.

Open one with ``async with open_registry(config) as reg:``; every run lives in a task scope of
the registry, so it always ends with exactly one terminal event and is always unregistered.
"""

from registry._agents import AgentContext as AgentContext
from registry._agents import AgentFn as AgentFn
from registry._agents import AgentRegistry as AgentRegistry
from registry._agents import AgentSpec as AgentSpec
from registry._agents import Supervisor as Supervisor
from registry._agents import ToolDispatcher as ToolDispatcher
from registry._agents import ToolFn as ToolFn
from registry._config import Config as Config
from registry._config import ConfigError as ConfigError
from registry._config import Setting as Setting
from registry._current import get_agent_execution_registry as get_agent_execution_registry
from registry._errors import DuplicateRun as DuplicateRun
from registry._errors import EventRefused as EventRefused
from registry._errors import InvalidField as InvalidField
from registry._errors import Overloaded as Overloaded
from registry._errors import RateLimited as RateLimited
from registry._errors import RegistryClosed as RegistryClosed
from registry._errors import RegistryError as RegistryError
from registry._errors import ResumeUnavailable as ResumeUnavailable
from registry._errors import RunNotFound as RunNotFound
from registry._errors import TooManyConnections as TooManyConnections
from registry._errors import UnknownAgent as UnknownAgent
from registry._errors import quote as quote
from registry._events import Event as Event
from registry._health import Health as Health
from registry._health import RegistryStatistics as RegistryStatistics
from registry._lifecycle import IllegalTransition as IllegalTransition
from registry._lifecycle import RunLifecycle as RunLifecycle
from registry._lifecycle import RunState as RunState
from registry._lifecycle import Trigger as Trigger
from registry._manager import DeliveryError as DeliveryError
from registry._manager import Subscriber as Subscriber
from registry._manager import WebSocketManager as WebSocketManager
from registry._memory import MemorySubscriber as MemorySubscriber
from registry._notifier import WebSocketNotifier as WebSocketNotifier
from registry._open import open_registry as open_registry
from registry._outbound import CLOSE_OVERFLOW as CLOSE_OVERFLOW
from registry._outbound import OutboundQueue as OutboundQueue
from registry._payloads import AgentCompleted as AgentCompleted
from registry._payloads import AgentStarted as AgentStarted
from registry._payloads import AgentThinking as AgentThinking
from registry._payloads import PartialResult as PartialResult
from registry._payloads import Payload as Payload
from registry._payloads import PayloadError as PayloadError
from registry._payloads import ToolCompleted as ToolCompleted
from registry._payloads import ToolExecuting as ToolExecuting
from registry._payloads import outcome as outcome
from registry._payloads import payload_from_dict as payload_from_dict
from registry._payloads import payload_to_dict as payload_to_dict
from registry._payloads import validate_payload as validate_payload
from registry._registry import AgentExecutionRegistry as AgentExecutionRegistry
from registry._run import AgentExecutionContext as AgentExecutionContext
from registry._run import Run as Run
from registry._stream import RunStream as RunStream
from registry._stream import SeqOutOfRange as SeqOutOfRange
from registry._stream import StreamError as StreamError
from registry._vocabulary import EventType as EventType
from registry._vocabulary import EventTypeName as EventTypeName
from registry._vocabulary import RunStatus as RunStatus
from registry._vocabulary import RunStatusName as RunStatusName
from registry._vocabulary import ToolStatus as ToolStatus
from registry._vocabulary import ToolStatusName as ToolStatusName

__version__ = "0.1.0"


__all__ = [
    "CLOSE_OVERFLOW",
    "AgentCompleted",
    "AgentContext",
    "AgentExecutionContext",
    "AgentExecutionRegistry",
    "AgentFn",
    "AgentRegistry",
    "AgentSpec",
    "AgentStarted",
    "AgentThinking",
    "Config",
    "ConfigError",
    "DeliveryError",
    "DuplicateRun",
    "Event",
    "EventRefused",
    "EventType",
    "EventTypeName",
    "Health",
    "IllegalTransition",
    "InvalidField",
    "MemorySubscriber",
    "OutboundQueue",
    "Overloaded",
    "PartialResult",
    "Payload",
    "PayloadError",
    "RateLimited",
    "RegistryClosed",
    "RegistryError",
    "RegistryStatistics",
    "ResumeUnavailable",
    "Run",
    "RunLifecycle",
    "RunNotFound",
    "RunState",
    "RunStatus",
    "RunStatusName",
    "RunStream",
    "SeqOutOfRange",
    "Setting",
    "StreamError",
    "Subscriber",
    "Supervisor",
    "TooManyConnections",
    "ToolCompleted",
    "ToolDispatcher",
    "ToolExecuting",
    "ToolFn",
    "ToolStatus",
    "ToolStatusName",
    "Trigger",
    "UnknownAgent",
    "WebSocketManager",
    "WebSocketNotifier",
    "get_agent_execution_registry",
    "open_registry",
    "outcome",
    "payload_from_dict",
    "payload_to_dict",
    "quote",
    "validate_payload",
]
