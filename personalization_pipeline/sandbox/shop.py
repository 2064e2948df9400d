"""The sandbox shop: a Shopify-shaped product catalogue, plus admin views of customers and
anonymous visitors for the event simulator.

- `GET /admin/api/{version}/products.json` - Shopify's Admin REST shape. `limit` (default
  50, at most 250), cursor paging through the `Link` header (`page_info`, as Shopify does),
  also a plain 1-based `page`; `fields=id,product_type` trims each product; `ids=1,2`.
- `GET /admin/api/{version}/products/{id}.json`, `GET /admin/api/{version}/products/count.json`.
- `GET /_admin/products` - the whole catalogue, flat: id, title, product_type (= the
  category), price ("49.99", USD), price_minor (4999), sku, handle, url, variant_id.
- `GET /_admin/customers?limit=&offset=` - shop customers in Shopify's customer shape with
  `anonymous_ids` (the person's web cookies) and `person_id` (ground truth).
- `GET /_admin/visitors?limit=&offset=` - every anonymous id with its person and, when the
  person is a customer, `customer_id` and `email`.

No authentication is required (an `X-Shopify-Access-Token` header is accepted and ignored).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from personalization_pipeline.sandbox.data import World, format_email, iso_seconds_z
from personalization_pipeline.sandbox.faults import BuiltApp, FaultInjector, FaultMiddleware, RequestStats, admin_routes, json_response

MAX_LIMIT = 250


def shopify_product(product: dict[str, Any], created_ms: int) -> dict[str, Any]:
    stamp = iso_seconds_z(created_ms)
    return {
        "id": product["id"],
        "title": product["title"],
        "body_html": "",
        "vendor": product["vendor"],
        "product_type": product["product_type"],
        "created_at": stamp,
        "handle": product["handle"],
        "updated_at": stamp,
        "published_at": stamp,
        "status": "active",
        "tags": product["product_type"],
        "variants": [
            {
                "id": product["variant_id"],
                "product_id": product["id"],
                "title": "Default Title",
                "price": product["price"],
                "sku": product["sku"],
                "position": 1,
                "compare_at_price": None,
                "inventory_policy": "deny",
                "taxable": True,
                "requires_shipping": True,
            }
        ],
        "options": [{"name": "Title", "values": ["Default Title"]}],
        "images": [],
        "image": None,
    }


class _Hooks:
    def fault_error(self, status: int, path: str, retry_after: float) -> Response:
        headers = {"Retry-After": str(max(1, int(round(retry_after))))} if status in (429, 503) else None
        message = {429: "Exceeded 2 calls per second for api client. Reduce request rates to resume uninterrupted service.",
                   500: "Internal Server Error", 503: "Service Unavailable"}[status]
        return json_response({"errors": message}, status, headers=headers)

    def unauthorized(self) -> Response:
        return json_response({"errors": "[API] Invalid API key or access token (unrecognized login or wrong password)"}, 401)

    def expire_tokens(self) -> None:
        pass

    def mutate_during_paging(self, method: str, path: str, query: str, body: bytes, records: int) -> None:
        pass


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    padded = cursor + "=" * (-len(cursor) % 4)
    text = base64.urlsafe_b64decode(padded.encode()).decode()
    if not text.startswith("offset:"):
        raise ValueError(cursor)
    return int(text[7:])


def build_shop_app(world: World) -> BuiltApp:
    created_ms = world.now_ms - 400 * 86_400_000
    products = [shopify_product(p, created_ms) for p in world.products]
    by_id = {p["id"]: p for p in products}

    def error(status: int, message: str) -> Response:
        return json_response({"errors": message}, status)

    def trim(items: list[dict[str, Any]], fields: str | None) -> list[dict[str, Any]]:
        if not fields:
            return items
        wanted = {f.strip() for f in fields.split(",") if f.strip()}
        return [{k: v for k, v in item.items() if k in wanted} for item in items]

    async def products_json(request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", 50))
            offset = _decode_cursor(q["page_info"]) if q.get("page_info") else (int(q.get("page", 1)) - 1) * limit
        except ValueError:
            return error(400, "Invalid limit, page or page_info")
        if limit < 1 or limit > MAX_LIMIT or offset < 0:
            return error(400, f"limit must be between 1 and {MAX_LIMIT}")
        items = products
        if q.get("ids"):
            wanted = {int(x) for x in q["ids"].split(",") if x.strip().isdigit()}
            items = [p for p in items if p["id"] in wanted]
        if q.get("product_type"):
            items = [p for p in items if p["product_type"] == q["product_type"]]
        page = items[offset : offset + limit]
        links = []
        base = str(request.url.replace(query="")).rstrip("?")
        keep = f"&fields={q['fields']}" if q.get("fields") else ""
        if offset + limit < len(items):
            links.append(f'<{base}?limit={limit}{keep}&page_info={_encode_cursor(offset + limit)}>; rel="next"')
        if offset > 0:
            links.append(f'<{base}?limit={limit}{keep}&page_info={_encode_cursor(max(0, offset - limit))}>; rel="previous"')
        headers = {"Link": ", ".join(links)} if links else None
        return json_response({"products": trim(page, q.get("fields"))}, headers=headers)

    async def product_json(request: Request) -> Response:
        try:
            product = by_id.get(int(request.path_params["product_id"]))
        except ValueError:
            product = None
        if product is None:
            return error(404, "Not Found")
        return json_response({"product": trim([product], request.query_params.get("fields"))[0]})

    async def product_count(request: Request) -> Response:
        return json_response({"count": len(products)})

    async def admin_products(request: Request) -> Response:
        return json_response({"total": len(world.products), "currency": "USD", "products": world.products})

    def paging(request: Request, total: int) -> tuple[int, int]:
        q = request.query_params
        offset = max(0, int(q.get("offset", 0)))
        limit = int(q.get("limit", total or 1))
        return offset, max(0, min(limit, total - offset))

    async def admin_customers(request: Request) -> Response:
        total = len(world.customers)
        try:
            offset, count = paging(request, total)
        except ValueError:
            return error(400, "limit and offset are integers")
        customers = [world.customer_record(k) for k in range(offset, offset + count)]
        return json_response({"total": total, "offset": offset, "customers": customers})

    async def admin_visitors(request: Request) -> Response:
        total = len(world.web)
        try:
            offset, count = paging(request, total)
        except ValueError:
            return error(400, "limit and offset are integers")
        customer_of = np.full(world.size, -1, np.int64)
        customer_of[world.customers.person] = np.arange(len(world.customers))
        visitors = []
        c = world.customers
        for w in range(offset, offset + count):
            person = int(world.web.person[w])
            k = int(customer_of[person])
            visitors.append({
                "anonymous_id": world.anonymous_id(w),
                "person_id": person,
                "customer_id": int(c.customer_id[k]) if k >= 0 else None,
                "email": format_email(world.email(int(c.email_ref[k])), int(c.email_variant[k])) if k >= 0 else None,
            })
        return json_response({"total": total, "offset": offset, "visitors": visitors})

    injector = FaultInjector()
    stats_box: dict[str, RequestStats] = {}
    routes = [
        Route("/admin/api/{version}/products.json", products_json, methods=["GET"]),
        Route("/admin/api/{version}/products/count.json", product_count, methods=["GET"]),
        Route("/admin/api/{version}/products/{product_id}.json", product_json, methods=["GET"]),
        Route("/_admin/products", admin_products, methods=["GET"]),
        Route("/_admin/customers", admin_customers, methods=["GET"]),
        Route("/_admin/visitors", admin_visitors, methods=["GET"]),
        *admin_routes(injector, stats_box),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(getattr(exc, "status_code", 404), "Not Found")

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    stats = RequestStats(FaultMiddleware(app, injector, _Hooks()))
    stats_box["stats"] = stats
    return BuiltApp(asgi=stats, stats=stats, faults=injector)
