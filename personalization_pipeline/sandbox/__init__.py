"""Vendor-compatible servers on loopback, over a deterministic synthetic world.

`start_sandbox(SandboxConfig(...))` serves four Starlette apps (uvicorn, one thread each):

- HubSpot (`hubspot.py`): `POST /oauth/v1/token`, `GET /oauth/authorize` (auto-approves),
  `/crm/v3/objects/contacts` search, list, get, batch read/update/create/upsert/archive,
  archive, gdpr-delete; 100 requests per rolling 10 s and 4 searches per second (429 +
  Retry-After + policy body); `X-HubSpot-RateLimit-*` headers.
- Mailchimp (`mailchimp.py`): `GET /oauth2/authorize`, `POST /oauth2/token`,
  `GET /oauth2/metadata`; under `/3.0` the list's members (windows by last_changed),
  batch subscribe/update, single-member writes and permanent delete, merge fields,
  campaigns, email activity; at most 10 requests in flight.
- shop (`shop.py`): Shopify-shaped `products.json`, and customers / visitors for the
  event simulator.
- alerts (`alerts.py`): a JSON webhook sink.

Sandbox-only endpoints live under `/_admin/` on each app (ground truth, edits, pushes,
reset, fault injection: see `faults.py`). Default credentials are the `SandboxConfig`
defaults (e.g. `Authorization: Bearer sandbox-hubspot-private-app`,
`Authorization: Bearer sandbox-mailchimp-token`).

`python -m personalization_pipeline.sandbox --help` runs it in the foreground.
"""

from personalization_pipeline.sandbox.data import World, generate_world
from personalization_pipeline.sandbox.server import PortInUseError, Sandbox, SandboxConfig, start_sandbox

__all__ = ["PortInUseError", "Sandbox", "SandboxConfig", "World", "generate_world", "start_sandbox"]
