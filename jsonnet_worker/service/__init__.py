"""The reference service: the pool inside a Starlette app (``jsonnet-worker serve``).

Needs the ``serve`` extra (``pip install 'jsonnet-worker[serve]'``). Embedding::

    from jsonnet_worker.service import create_app, load_config
    app = create_app(load_config("service.yaml"))   # any ASGI server

See README.md ("The service") for the API, the config and how to scale it out.
"""

from ._app import create_app
from ._config import ConfigError, ServiceConfig, Snippet, SnippetKind, load_config
from ._errors import ApiError

__all__ = [
    "ApiError",
    "ConfigError",
    "ServiceConfig",
    "Snippet",
    "SnippetKind",
    "create_app",
    "load_config",
]
