"""Configuration of the webhook ingest service, read from the environment.

Secrets (write keys, the Shopify and Mailchimp webhook secrets) are kept out of ``repr``
so that a logged or printed config never shows them (PRODUCT.md section 11).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_REPLAY_WINDOW_SECONDS = 48 * 3600.0
"""Shopify keeps `X-Shopify-Triggered-At` when it retries a delivery, for up to 48 hours:
a shorter window would refuse every retry after an outage of the receiver. A replayed
delivery inside the window is harmless: it repeats its webhook id and is de-duplicated."""
DEFAULT_ROTATE_BYTES = 8 << 20
DEFAULT_ROTATE_SECONDS = 5.0


class ConfigError(ValueError):
    """A missing or invalid setting; the message names the environment variable."""


@dataclass(frozen=True)
class IngestConfig:
    """Settings of one ingest service process.

    ``landing_dir`` holds ``open/`` (files being appended to) and ``ready/`` (published
    files, the only place downstream reads). ``write_keys`` authenticate track batches
    (HTTP Basic user name). ``replay_window_seconds`` bounds how far
    ``X-Shopify-Triggered-At`` may be from the receiver's clock, either side.
    With ``s3_bucket`` set, published files are then uploaded to
    ``s3://<s3_bucket>/<s3_prefix>/ready/...`` and deleted locally (``s3_upload.py``);
    ``s3_endpoint_url`` points boto3 at another endpoint (moto, MinIO).
    """

    landing_dir: Path
    write_keys: frozenset[str] = field(repr=False)
    shopify_secret: str = field(repr=False)
    mailchimp_webhook_secret: str = field(repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    replay_window_seconds: float = DEFAULT_REPLAY_WINDOW_SECONDS
    rotate_bytes: int = DEFAULT_ROTATE_BYTES
    rotate_seconds: float = DEFAULT_ROTATE_SECONDS
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "landing_dir", Path(self.landing_dir))
        keys = self.write_keys
        if isinstance(keys, str):
            keys = [keys]
        object.__setattr__(self, "write_keys", frozenset(k for k in keys if k))
        if not self.write_keys:
            raise ConfigError("write_keys: at least one non-empty write key is required")
        if not self.shopify_secret:
            raise ConfigError("shopify_secret must not be empty")
        if not self.mailchimp_webhook_secret:
            raise ConfigError("mailchimp_webhook_secret must not be empty")
        if self.max_body_bytes <= 0:
            raise ConfigError("max_body_bytes must be positive")
        if self.replay_window_seconds <= 0:
            raise ConfigError("replay_window_seconds must be positive")
        if self.rotate_bytes <= 0:
            raise ConfigError("rotate_bytes must be positive")
        if self.rotate_seconds <= 0:
            raise ConfigError("rotate_seconds must be positive")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "IngestConfig":
        """Read the settings from the environment.

        Required: ``INGEST_LANDING_DIR``, ``INGEST_WRITE_KEYS`` (comma-separated),
        ``SHOPIFY_WEBHOOK_SECRET``, ``MAILCHIMP_WEBHOOK_SECRET``. Optional:
        ``INGEST_MAX_BODY_BYTES`` (1 MiB), ``INGEST_REPLAY_WINDOW_SECONDS`` (300),
        ``INGEST_ROTATE_BYTES`` (8 MiB), ``INGEST_ROTATE_SECONDS`` (5),
        ``PP_LANDING_S3_BUCKET`` / ``PP_LANDING_S3_PREFIX`` (the S3 landing zone; unset:
        local disk only), ``AWS_ENDPOINT_URL``.
        """
        env = os.environ if environ is None else environ

        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError(f"{name} is not set (required by the ingest service)")
            return value

        def number(name: str, default: float, kind: type) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            what = "a positive integer" if kind is int else "a positive number"
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name} must be {what}, got {raw!r}") from None
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be {what}, got {raw!r}")
            return value

        landing_dir = Path(required("INGEST_LANDING_DIR")).expanduser()
        if not landing_dir.is_absolute():
            landing_dir = landing_dir.resolve()
        keys = frozenset(k.strip() for k in required("INGEST_WRITE_KEYS").split(",") if k.strip())
        if not keys:
            raise ConfigError("INGEST_WRITE_KEYS holds no write key (comma-separated list)")
        return cls(
            landing_dir=landing_dir,
            write_keys=keys,
            shopify_secret=required("SHOPIFY_WEBHOOK_SECRET"),
            mailchimp_webhook_secret=required("MAILCHIMP_WEBHOOK_SECRET"),
            max_body_bytes=int(number("INGEST_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, int)),
            replay_window_seconds=float(
                number("INGEST_REPLAY_WINDOW_SECONDS", DEFAULT_REPLAY_WINDOW_SECONDS, float)
            ),
            rotate_bytes=int(number("INGEST_ROTATE_BYTES", DEFAULT_ROTATE_BYTES, int)),
            rotate_seconds=float(number("INGEST_ROTATE_SECONDS", DEFAULT_ROTATE_SECONDS, float)),
            s3_bucket=env.get("PP_LANDING_S3_BUCKET", "").strip() or None,
            s3_prefix=env.get("PP_LANDING_S3_PREFIX", "").strip().strip("/"),
            s3_endpoint_url=env.get("AWS_ENDPOINT_URL", "").strip() or None,
        )
