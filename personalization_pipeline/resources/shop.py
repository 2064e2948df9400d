"""The shop's product catalogue (product id -> product type), read through Shopify's Admin
REST API shape. An order's category is the product type of its top line item."""

from __future__ import annotations

from typing import Optional

import dagster as dg
import requests
from pydantic import Field

from personalization_pipeline.resources.http import CallStats, RequestLoop, RetryPolicy


class ShopResource(dg.ConfigurableResource):
    """Shopify store (or the sandbox shop) for the product catalogue."""

    base_url: str = Field(description="e.g. https://my-shop.myshopify.com or the sandbox shop URL")
    access_token: Optional[str] = Field(default=None, description="Admin API access token.")
    api_version: str = "2024-10"

    def catalogue(self) -> dict[str, str]:
        session = requests.Session()
        if self.access_token:
            session.headers["X-Shopify-Access-Token"] = self.access_token
        loop = RequestLoop(vendor="Shop", session_request=session.request, stats=CallStats(), policy=RetryPolicy())
        url: Optional[str] = f"{self.base_url.rstrip('/')}/admin/api/{self.api_version}/products.json"
        params: Optional[dict] = {"limit": 250, "fields": "id,product_type"}
        catalogue: dict[str, str] = {}
        while url:
            response = loop.send("GET", url, params=params)
            for product in response.json().get("products", []):
                catalogue[str(product["id"])] = str(product.get("product_type") or "")
            url = response.links.get("next", {}).get("url")
            params = None
        return catalogue
