"""The pipeline's resources pointed at a running sandbox: one place for the wiring the
end-to-end tests and the micro-batch benchmark share."""

from __future__ import annotations

from typing import Any, Optional

from personalization_pipeline.resources.hubspot import HubSpotResource
from personalization_pipeline.resources.lake import LakeResource
from personalization_pipeline.resources.landing_zone import LocalLandingZoneResource
from personalization_pipeline.resources.mailchimp import MailchimpResource
from personalization_pipeline.resources.runtime import RuntimeResource
from personalization_pipeline.resources.shop import ShopResource
from personalization_pipeline.resources.state_store import StateStoreResource


def sandbox_resources(sandbox, config, run_now: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    """HubSpot over OAuth, Mailchimp, the shop and local storage, on ``sandbox`` (started
    from ``config``); ``run_now`` (ISO 8601 UTC) pins the runs' clock; ``extra`` adds or replaces resources."""
    resources: dict[str, Any] = {
        "hubspot": HubSpotResource(
            base_url=sandbox.hubspot_url,
            client_id=config.hubspot_client_id,
            client_secret=config.hubspot_client_secret,
            refresh_token=config.hubspot_refresh_token,
        ),
        "mailchimp": MailchimpResource(
            access_token=config.mailchimp_access_token,
            list_id=config.mailchimp_list_id,
            metadata_url=f"{sandbox.mailchimp_url}/oauth2/metadata",
        ),
        "shop": ShopResource(base_url=sandbox.shop_url),
        "lake": LakeResource(),
        "landing_zone": LocalLandingZoneResource(),
        "state": StateStoreResource(),
        "runtime": RuntimeResource(lag_seconds=60, now_override=run_now),
    }
    resources.update(extra)
    return resources
