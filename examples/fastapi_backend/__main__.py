"""``python -m examples.fastapi_backend [--host H] [--port P] [--delivery-mode direct]``."""

from examples.fastapi_backend.app import main

if __name__ == "__main__":
    main()
