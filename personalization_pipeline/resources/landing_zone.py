"""The landing zone the stream path reads: published files of the ingest service.

``LandingZoneResource`` is the interface; ``LocalLandingZoneResource`` reads
``<landing dir>/ready/`` on the local disk (the default), ``S3LandingZoneResource`` reads
``s3://<bucket>/<prefix>/ready/`` through dagster-aws's ``S3Resource`` (``endpoint_url``
points it at moto or MinIO). Both name files by a path string (an absolute path, or
``s3://bucket/key``) whose stem is the staging batch id, and both read a file into the
envelopes ``core.events.read_landing_file`` returns, a torn last line included.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_aws.s3.sensor import get_objects
from pydantic import Field

from personalization_pipeline import settings
from personalization_pipeline.core.events import parse_landing_bytes, read_landing_file

SUFFIX = ".jsonl"


def batch_id(path: str) -> str:
    """The staging batch of a landing file: its stem (the same locally and on S3)."""
    return PurePosixPath(path).stem


class LandingZoneResource(dg.ConfigurableResource):
    """Where published landing files are listed and read. Use a subclass."""

    def list_published(self) -> list[str]:
        """Every published file, in publication-name order."""
        raise NotImplementedError

    def read(self, path: str) -> list[dict[str, Any]]:
        """The envelopes of one published file; ``FileNotFoundError`` when it is gone."""
        raise NotImplementedError


class LocalLandingZoneResource(LandingZoneResource):
    """Published landing files under ``<root>/ready/`` on the local disk."""

    root: Optional[str] = Field(default=None, description="Defaults to $PP_DATA_DIR/landing.")

    def landing_root(self) -> Path:
        return settings.landing_dir(self.root)

    def list_published(self) -> list[str]:
        ready = self.landing_root() / "ready"
        if not ready.exists():
            return []
        return sorted(str(p) for p in ready.rglob(f"*{SUFFIX}"))

    def read(self, path: str) -> list[dict[str, Any]]:
        return read_landing_file(path)


class S3LandingZoneResource(LandingZoneResource):
    """Published landing files under ``s3://<bucket>/<prefix>/ready/``, where the ingest
    service's uploader puts them."""

    s3: S3Resource
    bucket: str = Field(description="PP_LANDING_S3_BUCKET")
    prefix: str = Field(default="", description="PP_LANDING_S3_PREFIX (no leading or trailing slash)")

    def ready_prefix(self) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/ready/" if prefix else "ready/"

    def list_published(self) -> list[str]:
        objects = get_objects(self.bucket, prefix=self.ready_prefix(), client=self.s3.get_client())
        keys = sorted(o["Key"] for o in objects if o["Key"].endswith(SUFFIX))
        return [f"s3://{self.bucket}/{key}" for key in keys]

    def read(self, path: str) -> list[dict[str, Any]]:
        bucket, _, key = path.removeprefix("s3://").partition("/")
        if not path.startswith("s3://") or not key:
            raise ValueError(f"not an s3:// landing file path: {path!r}")
        client = self.s3.get_client()
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(path) from None
        return parse_landing_bytes(body, path)


def landing_zone_from_env() -> LandingZoneResource:
    """S3 when ``PP_LANDING_S3_BUCKET`` is set (``PP_LANDING_S3_PREFIX``, ``AWS_ENDPOINT_URL``
    optional), else the local disk."""
    bucket = os.environ.get("PP_LANDING_S3_BUCKET", "").strip()
    if not bucket:
        return LocalLandingZoneResource()
    s3_config: dict[str, Any] = {}
    if os.environ.get("AWS_ENDPOINT_URL", "").strip():
        s3_config["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"].strip()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        s3_config["region_name"] = region
    return S3LandingZoneResource(
        s3=S3Resource(**s3_config),
        bucket=bucket,
        prefix=os.environ.get("PP_LANDING_S3_PREFIX", "").strip().strip("/"),
    )
