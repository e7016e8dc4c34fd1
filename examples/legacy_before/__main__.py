"""``python -m examples.legacy_before [--host H] [--port P]`` (needs ``CHAT_JWT_SECRET``)."""

from examples.legacy_before.app import main

if __name__ == "__main__":
    main()
