"""The webhook ingest service: track batches, Shopify and Mailchimp webhooks -> landing files.

``create_app(config)`` builds the ASGI app; ``start_ingest_service(config, host, port)``
runs it in a background thread (tests, the demo); ``python -m
personalization_pipeline.ingest_service`` runs it as a process.
"""

from .app import IngestServiceHandle, create_app, start_ingest_service
from .config import ConfigError, IngestConfig
from .landing import LandingWriter, list_ready_files

__all__ = [
    "ConfigError",
    "IngestConfig",
    "IngestServiceHandle",
    "LandingWriter",
    "create_app",
    "list_ready_files",
    "start_ingest_service",
]
