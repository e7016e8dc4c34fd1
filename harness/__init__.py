"""The chat server of PROTOCOL.md over the registry, its demo agents and a reference client."""

from harness._auth import AuthError as AuthError
from harness._auth import mint_token as mint_token
from harness._auth import verify_token as verify_token
from harness._server import ChatServer as ChatServer
from harness._server import serve as serve
from harness.agents import demo_agents as demo_agents
