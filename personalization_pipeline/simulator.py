"""Traffic simulator: Shopify-shaped webhooks and track batches for the sandbox shop's people.

It reads the sandbox shop over HTTP -- ``GET {shop_url}/_admin/customers`` (customers with
their anonymous web ids), ``GET {shop_url}/admin/api/2024-10/products.json`` (the
catalogue) and, when the shop has it, ``GET {shop_url}/_admin/visitors`` (anonymous
visitors who are not customers) -- and then sends, at a configured rate, what those people would cause:

- track batches to ``POST {ingest_url}/v1/batch`` (write key as HTTP Basic user name):
  Page Viewed, Product Viewed (product_id, category, price), Product Added, Checkout
  Started, Order Completed; ``anonymousId`` always, ``userId`` (the shop customer id) once
  the visitor is logged in or identified at checkout; a desktop/mobile/tablet user agent
  and a city/country per device; ``sentAt`` and ``timestamp`` on the device's (slightly
  skewed) clock;
- signed Shopify webhooks to ``POST {ingest_url}/webhooks/shopify``: checkouts/create,
  orders/create, orders/cancelled (rarely), customers/update, each with a unique
  ``X-Shopify-Webhook-Id``; some deliveries are sent again with the same id, body and
  ``X-Shopify-Triggered-At``, as Shopify's retries do.

Each track message and each webhook counts as one event for ``rate`` and ``count``.
Failed sends (connection errors, 408, 429, 5xx) are retried with exponential backoff and
full jitter, honouring ``Retry-After``; other 4xx answers are permanent and counted.

Kafka: with ``kafka_bootstrap`` (``--kafka-bootstrap``) each event is instead published as
one message to ``kafka_topic`` whose value is the envelope the ingest service would have
landed (transport "track" or "shopify", ``delivery_id`` = messageId / webhook id,
``received_at`` = produce time) and whose key is the person's id (customer id, else the
anonymous id), so one person's events stay in order on one partition. The producer uses
acks=all and idempotence; an event counts as acked when the broker acknowledged it. With
both an ingest URL and Kafka, ``kafka_share`` of the requests go to Kafka, the rest over HTTP.

CLI: ``python -m personalization_pipeline.simulator --ingest-url URL --shop-url URL
--rate 5 [--kafka-bootstrap HOST:PORT --kafka-topic pp.events --kafka-share 0.3]``
(``--ingest-url`` may be left out with ``--kafka-bootstrap``; secrets from
``INGEST_WRITE_KEY`` or the first of ``INGEST_WRITE_KEYS``, and ``SHOPIFY_WEBHOOK_SECRET``).
SIGINT/SIGTERM stop it cleanly after the request in flight.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import hmac
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterator
from urllib.parse import urljoin

import requests

from .core.events import CURRENCY_EXPONENTS

log = logging.getLogger(__name__)

CUSTOMERS_PATH = "/_admin/customers"
PRODUCTS_PATH = "/admin/api/2024-10/products.json"
VISITORS_PATH = "/_admin/visitors"
DEFAULT_SHOP_DOMAIN = "sandbox-shop.myshopify.com"
API_VERSION = "2024-10"

USER_AGENTS = {
    "desktop": [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.0.0 Safari/537.36",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6_1) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.1 Safari/605.1.15",
        "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.0.0 Safari/537.36 Edg/130.0.0.0",
    ],
    "mobile": [
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.6723.102 Mobile Safari/537.36",
        "Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.0.0 Mobile Safari/537.36",
    ],
    "tablet": [
        "Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.7 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.0.0 Safari/537.36",
    ],
}
DEVICE_WEIGHTS = {"desktop": 0.45, "mobile": 0.45, "tablet": 0.10}
COUNTRY_NAMES = {
    "GB": "United Kingdom", "US": "United States", "DE": "Germany", "FR": "France",
    "NL": "Netherlands", "IE": "Ireland", "ES": "Spain", "IT": "Italy", "JP": "Japan",
}
"""Geolocation often reports full country names; the pipeline normalises them."""
TRAVEL_CITIES = [("London", "GB"), ("Paris", "FR"), ("Berlin", "DE"), ("New York", "US"),
                 ("Amsterdam", "NL"), ("Dublin", "IE"), ("Madrid", "ES")]


class ShopUnavailableError(RuntimeError):
    """The sandbox shop could not be read (down, or answered something unexpected)."""


# --------------------------------------------------------------------------- shop data


def _get_json(session: requests.Session, url: str, timeout: float) -> tuple[Any, requests.Response]:
    response = session.get(url, timeout=timeout)
    response.raise_for_status()
    return response.json(), response


def fetch_shop_data(
    shop_url: str,
    *,
    session: requests.Session | None = None,
    timeout: float = 10.0,
    attempts: int = 5,
) -> tuple[list[dict], list[dict]]:
    """(customers, products) from the sandbox shop, retrying while it starts up.

    Customers: ``{id, email, first_name, last_name, default_address:{city, country_code},
    anonymous_ids:[...]}`` (a JSON list, or ``{"customers": [...]}``). Products follow
    Shopify's ``{products:[{id, title, product_type, variants:[{price}]}]}``, paged by the
    ``Link: <...>; rel="next"`` header when the shop pages.
    """
    session = session or requests.Session()
    base = shop_url.rstrip("/") + "/"
    last_error: Exception | None = None
    for attempt in range(attempts):
        try:
            doc, _ = _get_json(session, urljoin(base, CUSTOMERS_PATH.lstrip("/")), timeout)
            customers = doc.get("customers", []) if isinstance(doc, dict) else doc
            products: list[dict] = []
            url: str | None = urljoin(base, PRODUCTS_PATH.lstrip("/")) + "?limit=250"
            pages = 0
            while url and pages < 1000:
                doc, response = _get_json(session, url, timeout)
                products.extend(doc.get("products", []) if isinstance(doc, dict) else [])
                url = response.links.get("next", {}).get("url")
                pages += 1
            customers = [c for c in customers if isinstance(c, dict) and c.get("id") is not None]
            products = [p for p in products if isinstance(p, dict) and p.get("id") is not None]
            if not products:
                raise ShopUnavailableError(f"the shop at {shop_url} has no products")
            return customers, products
        except (requests.RequestException, ValueError) as exc:
            last_error = exc
            if attempt + 1 < attempts:
                time.sleep(min(5.0, 0.2 * 2**attempt))
    raise ShopUnavailableError(f"cannot read the shop at {shop_url}: {last_error}")


def fetch_anonymous_visitors(
    shop_url: str, *, session: requests.Session | None = None, timeout: float = 10.0
) -> list[str]:
    """Anonymous ids of the shop's visitors who are not customers, from the sandbox's
    optional ``GET {shop_url}/_admin/visitors`` (``{visitors:[{anonymous_id,
    customer_id}]}``), so that logged-out traffic also belongs to the sandbox's people.
    Empty when the shop has no such endpoint (the simulator then makes visitors up)."""
    session = session or requests.Session()
    try:
        doc, _ = _get_json(session, shop_url.rstrip("/") + VISITORS_PATH, timeout)
    except (requests.RequestException, ValueError):
        return []
    visitors = doc.get("visitors", []) if isinstance(doc, dict) else []
    return [
        v["anonymous_id"]
        for v in visitors
        if isinstance(v, dict) and isinstance(v.get("anonymous_id"), str) and v.get("customer_id") is None
    ]


# --------------------------------------------------------------------------- generation


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _iso_z(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _shop_time(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def format_amount(minor: int, currency: str) -> str:
    """Integer minor units -> Shopify's decimal string ("19.99", "1500", "1.234")."""
    exponent = CURRENCY_EXPONENTS.get(currency, 2)
    return str((Decimal(minor).scaleb(-exponent)).quantize(Decimal(1).scaleb(-exponent)))


@dataclass
class _Device:
    anonymous_id: str
    user_agent: str
    skew: timedelta
    city: str | None
    country: str | None


@dataclass
class _Product:
    id: int | str
    title: str
    product_type: str | None
    price_minor: int
    sku: str


@dataclass
class Outbound:
    """One request to send: a track batch or a Shopify webhook."""

    kind: str  # "track" | "shopify"
    events: int
    build: Callable[[], tuple[str, bytes, dict[str, str]]]  # -> (path, body, headers)
    topic: str = "track"
    delivery_ids: list[str] = field(default_factory=list)
    redelivery: bool = False
    trim: Callable[[int], "Outbound"] | None = None  # track only: the first n messages
    frozen: dict[str, Any] = field(default_factory=dict)  # webhook body/headers once built


class TrafficModel:
    """Turns customers and products into an endless, seeded stream of ``Outbound`` items.

    Timestamps are taken when an item is built (just before it is sent), so the events
    are "now" on each device's skewed clock.
    """

    def __init__(
        self,
        customers: list[dict],
        products: list[dict],
        *,
        write_key: str,
        shopify_secret: str,
        seed: int | None = None,
        shop_domain: str = DEFAULT_SHOP_DOMAIN,
        currency: str = "USD",
        redelivery_rate: float = 0.05,
        cancel_rate: float = 0.05,
        customer_update_rate: float = 0.05,
        anonymous_share: float = 0.2,
        anonymous_visitors: list[str] | None = None,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.rng = random.Random(seed)
        self.currency = currency
        self.customers = [dict(c) for c in customers]
        self.products = [p for p in (self._product(p) for p in products) if p is not None]
        if not self.products:
            raise ValueError("no usable products (each needs an id and a variant price)")
        self.write_key = write_key
        self.secret = shopify_secret.encode("utf-8")
        self.shop_domain = shop_domain
        self.redelivery_rate = redelivery_rate
        self.cancel_rate = cancel_rate
        self.customer_update_rate = customer_update_rate
        self.anonymous_share = anonymous_share if self.customers else 1.0
        self.now = now
        self.devices: dict[str, _Device] = {}
        self.anonymous_visitors = list(anonymous_visitors or []) or [
            self._uuid() for _ in range(max(10, len(self.customers) // 2))
        ]
        self.queue: collections.deque[Outbound] = collections.deque()
        self.next_order_id = 5_000_000_000 + self.rng.randrange(1_000_000)
        self.next_checkout_id = 30_000_000_000 + self.rng.randrange(1_000_000)

    def _product(self, p: Any) -> _Product | None:
        if not isinstance(p, dict) or p.get("id") is None:
            return None
        variants = p.get("variants") or [{}]
        price = variants[0].get("price") if isinstance(variants[0], dict) else None
        try:
            minor = int(Decimal(str(price)).scaleb(CURRENCY_EXPONENTS.get(self.currency, 2)))
        except (InvalidOperation, ValueError, TypeError):
            return None
        return _Product(p["id"], str(p.get("title") or p["id"]), p.get("product_type"),
                        minor, f"SKU-{p['id']}")

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _device(self, anonymous_id: str, home: tuple[str | None, str | None]) -> _Device:
        device = self.devices.get(anonymous_id)
        if device is None:
            kind = self.rng.choices(list(DEVICE_WEIGHTS), weights=list(DEVICE_WEIGHTS.values()))[0]
            skew = self.rng.gauss(0, 2.0)
            if self.rng.random() < 0.05:
                skew = self.rng.choice([-1, 1]) * self.rng.uniform(60, 300)
            city, country = home
            if city is None or self.rng.random() < 0.1:
                city, country = self.rng.choice(TRAVEL_CITIES)
            device = _Device(anonymous_id, self.rng.choice(USER_AGENTS[kind]),
                             timedelta(seconds=skew), city, country)
            self.devices[anonymous_id] = device
        return device

    # -- items

    def __iter__(self) -> Iterator[Outbound]:
        return self

    def __next__(self) -> Outbound:
        while not self.queue:
            self._new_session()
        return self.queue.popleft()

    def push_later(self, item: Outbound, min_gap: int = 1, max_gap: int = 6) -> None:
        """Queue ``item`` a few items from now (redeliveries, cancellations)."""
        position = min(len(self.queue), self.rng.randint(min_gap, max_gap))
        self.queue.insert(position, item)

    def _new_session(self) -> None:
        rng = self.rng
        items: list[Outbound] = []
        customer = None
        if self.customers and rng.random() >= self.anonymous_share:
            customer = rng.choice(self.customers)
        if customer is not None:
            ids = [a for a in customer.get("anonymous_ids") or [] if isinstance(a, str) and a]
            anonymous_id = rng.choice(ids) if ids else f"anon-{customer['id']}"
            address = customer.get("default_address") or {}
            home = (address.get("city"), address.get("country_code"))
        else:
            anonymous_id = rng.choice(self.anonymous_visitors)
            home = (None, None)
        device = self._device(anonymous_id, home)
        identified = customer is not None and rng.random() < 0.6

        messages: list[tuple[str, dict]] = [("Page Viewed", {"path": "/", "title": "Home"})]
        viewed = rng.sample(self.products, k=min(len(self.products), rng.randint(1, 4)))
        for product in viewed:
            messages.append(("Product Viewed", self._product_props(product)))
        cart: list[tuple[_Product, int]] = []
        if rng.random() < 0.35:
            for product in viewed[: rng.randint(1, len(viewed))]:
                qty = rng.choice([1, 1, 1, 2, 3])
                cart.append((product, qty))
                messages.append(("Product Added", {**self._product_props(product), "quantity": qty}))
        checkout = bool(cart) and customer is not None and rng.random() < 0.5
        items += self._track_batches(messages, device, customer if identified else None)
        if checkout:
            # Checking out identifies the visitor: later events carry the customer id.
            checkout_id = self.next_checkout_id = self.next_checkout_id + 1
            total = sum(p.price_minor * q for p, q in cart)
            props = {"checkout_id": str(checkout_id), "value": self._amount(total),
                     "currency": self.currency, "products": self._cart_props(cart)}
            items += self._track_batches([("Checkout Started", props)], device, customer)
            items.append(self._webhook("checkouts/create",
                                       lambda c=customer, cart=cart, cid=checkout_id:
                                       self._checkout_payload(c, cart, cid)))
            if rng.random() < 0.6:
                order_id = self.next_order_id = self.next_order_id + 1
                order = {"created_at": None}
                items.append(self._webhook("orders/create",
                                           lambda c=customer, cart=cart, oid=order_id, o=order:
                                           self._order_payload(c, cart, oid, o)))
                items += self._track_batches(
                    [("Order Completed", {"order_id": str(order_id), "total": self._amount(total),
                                          "currency": self.currency,
                                          "products": self._cart_props(cart)})],
                    device, customer)
                if rng.random() < self.cancel_rate:
                    cancel = self._webhook("orders/cancelled",
                                           lambda c=customer, cart=cart, oid=order_id, o=order:
                                           self._order_payload(c, cart, oid, o, cancelled=True))
                    items.append(cancel)
        if customer is not None and rng.random() < self.customer_update_rate:
            items.append(self._webhook("customers/update",
                                       lambda c=customer: self._customer_update_payload(c)))
        self.queue.extend(items)

    def _amount(self, minor: int) -> str:
        return format_amount(minor, self.currency)

    def _product_props(self, product: _Product) -> dict:
        return {"product_id": str(product.id), "sku": product.sku, "name": product.title,
                "category": product.product_type, "price": float(self._amount(product.price_minor)),
                "currency": self.currency}

    def _cart_props(self, cart: list[tuple[_Product, int]]) -> list[dict]:
        return [{"product_id": str(p.id), "sku": p.sku, "quantity": q,
                 "price": float(self._amount(p.price_minor))} for p, q in cart]

    def _track_batches(
        self, messages: list[tuple[str, dict]], device: _Device, customer: dict | None
    ) -> list[Outbound]:
        def outbound(chunk: list[tuple[str, dict]], ids: list[str]) -> Outbound:
            return Outbound(
                "track", len(chunk),
                lambda: self._track_request(chunk, ids, device, customer),
                delivery_ids=ids,
                trim=lambda n: outbound(chunk[:n], ids[:n]),
            )

        out = []
        i = 0
        while i < len(messages):
            chunk = messages[i : i + self.rng.randint(1, 5)]
            out.append(outbound(chunk, [self._uuid() for _ in chunk]))
            i += len(chunk)
        return out

    def _track_request(self, chunk, ids, device: _Device, customer: dict | None):
        now = self.now()
        device_now = now + device.skew
        sent_at = _iso_z(device_now)
        batch = []
        for k, ((event, props), message_id) in enumerate(zip(chunk, ids)):
            happened = device_now - timedelta(seconds=(len(chunk) - 1 - k) * self.rng.uniform(0.3, 3))
            location = {"city": device.city, "country": device.country}
            if device.country in COUNTRY_NAMES and self.rng.random() < 0.5:
                location["country"] = COUNTRY_NAMES[device.country]
            message = {
                "type": "track",
                "messageId": message_id,
                "event": event,
                "anonymousId": device.anonymous_id,
                "userId": str(customer["id"]) if customer is not None else None,
                "timestamp": _iso_z(happened),
                "sentAt": sent_at,
                "context": {
                    "userAgent": device.user_agent,
                    "ip": f"203.0.113.{self.rng.randint(1, 254)}",
                    "locale": "en-GB" if device.country == "GB" else "en-US",
                    "location": location,
                    "library": {"name": "personalization_pipeline.simulator", "version": "1"},
                },
                "properties": props,
            }
            if customer is None:
                del message["userId"]
            batch.append(message)
        body = json.dumps({"batch": batch, "sentAt": sent_at}, separators=(",", ":")).encode()
        token = base64.b64encode(f"{self.write_key}:".encode()).decode()
        return "/v1/batch", body, {"Content-Type": "application/json",
                                   "Authorization": f"Basic {token}"}

    def _webhook(self, topic: str, payload: Callable[[], dict]) -> Outbound:
        webhook_id = self._uuid()
        item = Outbound("shopify", 1, lambda: build(), topic=topic, delivery_ids=[webhook_id])
        frozen = item.frozen

        def build() -> tuple[str, bytes, dict[str, str]]:
            # Built once: a redelivery repeats the same body, id and Triggered-At.
            if not frozen:
                body = json.dumps(payload(), separators=(",", ":")).encode()
                signature = base64.b64encode(hmac.new(self.secret, body, hashlib.sha256).digest())
                frozen["body"] = body
                frozen["headers"] = {
                    "Content-Type": "application/json",
                    "X-Shopify-Topic": topic,
                    "X-Shopify-Hmac-Sha256": signature.decode(),
                    "X-Shopify-Webhook-Id": webhook_id,
                    "X-Shopify-Triggered-At": _iso_z(self.now()),
                    "X-Shopify-Shop-Domain": self.shop_domain,
                    "X-Shopify-API-Version": API_VERSION,
                    "X-Shopify-Event-Id": self._uuid(),
                }
                frozen["at"] = time.monotonic()
            return "/webhooks/shopify", frozen["body"], frozen["headers"]

        return item

    def maybe_redeliver(self, item: Outbound) -> None:
        """After a webhook was acknowledged, sometimes send it again, as Shopify retries do
        (only recent ones, so the original Triggered-At stays inside the replay window)."""
        frozen = item.frozen
        if item.kind != "shopify" or not frozen or self.rng.random() >= self.redelivery_rate:
            return
        if time.monotonic() - frozen.get("at", 0) > 60:
            return
        again = Outbound("shopify", 1, item.build, topic=item.topic,
                         delivery_ids=list(item.delivery_ids), redelivery=True, frozen=frozen)
        self.push_later(again)

    def _customer_json(self, customer: dict) -> dict:
        address = dict(customer.get("default_address") or {})
        return {
            "id": customer["id"],
            "email": customer.get("email"),
            "first_name": customer.get("first_name"),
            "last_name": customer.get("last_name"),
            "state": "enabled",
            "currency": self.currency,
            "default_address": {
                "customer_id": customer["id"],
                "first_name": customer.get("first_name"),
                "last_name": customer.get("last_name"),
                "city": address.get("city"),
                "country_code": address.get("country_code"),
                "default": True,
            },
        }

    def _line_items(self, cart: list[tuple[_Product, int]]) -> list[dict]:
        return [
            {
                "id": self.rng.randrange(10**13, 10**14),
                "product_id": p.id,
                "variant_id": self.rng.randrange(10**13, 10**14),
                "title": p.title,
                "quantity": q,
                "price": self._amount(p.price_minor),
                "sku": p.sku,
            }
            for p, q in cart
        ]

    def _checkout_payload(self, customer: dict, cart, checkout_id: int) -> dict:
        now = _shop_time(self.now())
        total = self._amount(sum(p.price_minor * q for p, q in cart))
        return {
            "id": checkout_id,
            "token": self._uuid().replace("-", ""),
            "cart_token": self._uuid().replace("-", ""),
            "email": customer.get("email"),
            "created_at": now,
            "updated_at": now,
            "currency": self.currency,
            "presentment_currency": self.currency,
            "subtotal_price": total,
            "total_price": total,
            "total_tax": self._amount(0),
            "line_items": self._line_items(cart),
            "customer": self._customer_json(customer),
        }

    def _order_payload(self, customer: dict, cart, order_id: int, order: dict,
                       cancelled: bool = False) -> dict:
        now = self.now()
        created = order.get("created_at") or _shop_time(now)
        order["created_at"] = created
        total = self._amount(sum(p.price_minor * q for p, q in cart))
        payload = {
            "id": order_id,
            "admin_graphql_api_id": f"gid://shopify/Order/{order_id}",
            "name": f"#{order_id % 100000}",
            "order_number": order_id % 100000,
            "email": customer.get("email"),
            "contact_email": customer.get("email"),
            "created_at": created,
            "updated_at": _shop_time(now),
            "processed_at": created,
            "currency": self.currency,
            "presentment_currency": self.currency,
            "subtotal_price": total,
            "total_price": total,
            "total_tax": self._amount(0),
            "financial_status": "refunded" if cancelled else "paid",
            "cancelled_at": _shop_time(now) if cancelled else None,
            "cancel_reason": "customer" if cancelled else None,
            "line_items": self._line_items(cart),
            "customer": self._customer_json(customer),
        }
        return payload

    def _customer_update_payload(self, customer: dict) -> dict:
        if self.rng.random() < 0.3:  # moved house: later orders carry the new address
            city, country = self.rng.choice(TRAVEL_CITIES)
            customer["default_address"] = {**(customer.get("default_address") or {}),
                                           "city": city, "country_code": country}
        payload = self._customer_json(customer)
        payload["updated_at"] = _shop_time(self.now())
        return payload


# --------------------------------------------------------------------------- sending


@dataclass
class SimulatorStats:
    """What a run sent. ``acked_delivery_ids`` (when recorded) lists every acknowledged
    delivery id, repeated for redeliveries -- exactly what the landing zone must hold."""

    events_acked: int = 0
    requests_acked: int = 0
    track_messages: int = 0
    track_batches: int = 0
    webhooks: dict[str, int] = field(default_factory=dict)
    redeliveries: int = 0
    retries: int = 0
    rejected: int = 0
    failed: int = 0
    abandoned: int = 0
    kafka_events: int = 0
    elapsed_seconds: float = 0.0
    acked_delivery_ids: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "acked_delivery_ids"}
        d["events_per_second"] = round(self.events_acked / self.elapsed_seconds, 2) if self.elapsed_seconds else None
        return d


def _received_at_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def kafka_messages(item: Outbound, body: bytes, headers: dict[str, str], received_at: str) -> list[tuple[str, bytes]]:
    """(key, envelope JSON) per event of ``item``: the envelopes the ingest service lands."""
    doc = json.loads(body)
    out: list[tuple[str, bytes]] = []

    def encode(envelope: dict) -> bytes:
        return json.dumps(envelope, separators=(",", ":")).encode()

    if item.kind == "track":
        head = {"batch_sent_at": doc["sentAt"]} if doc.get("sentAt") is not None else {}
        for message in doc["batch"]:
            key = str(message.get("userId") or message.get("anonymousId") or message.get("messageId"))
            out.append((key, encode({
                "v": 1, "delivery_id": message.get("messageId"), "transport": "track", "topic": "track",
                "received_at": received_at, "headers": head, "payload": message,
            })))
        return out
    env_headers = {"shop_domain": headers["X-Shopify-Shop-Domain"], "triggered_at": headers["X-Shopify-Triggered-At"]}
    for name, field_name in (("X-Shopify-API-Version", "api_version"), ("X-Shopify-Event-Id", "event_id")):
        if headers.get(name):
            env_headers[field_name] = headers[name]
    customer = doc.get("customer") if isinstance(doc.get("customer"), dict) else {}
    key = str(customer.get("id") or doc.get("id") or headers["X-Shopify-Webhook-Id"])
    out.append((key, encode({
        "v": 1, "delivery_id": headers["X-Shopify-Webhook-Id"], "transport": "shopify",
        "topic": headers["X-Shopify-Topic"], "received_at": received_at, "headers": env_headers,
        "payload": doc,
    })))
    return out


class KafkaPublisher:
    """Publishes events as envelopes; ``send`` returns once the broker acknowledged every
    message of the item (acks=all, idempotent producer) or the delivery timed out."""

    def __init__(self, bootstrap: str, topic: str, *, timeout: float = 10.0, extra: dict | None = None) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.timeout = timeout
        self.producer = Producer({
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 2,
            "delivery.timeout.ms": int(max(timeout, 1.0) * 1000),
            **(extra or {}),
        })

    def send(self, item: Outbound, body: bytes, headers: dict[str, str], stop: threading.Event) -> str:
        results: list[Any] = []
        messages = kafka_messages(item, body, headers, _received_at_now())
        for key, value in messages:
            self.producer.produce(self.topic, key=key.encode(), value=value,
                                  on_delivery=lambda err, msg: results.append(err))
        deadline = time.monotonic() + self.timeout + 5
        while len(results) < len(messages) and time.monotonic() < deadline:
            self.producer.poll(0.05)
            if stop.is_set() and time.monotonic() > deadline - self.timeout:
                break
        if len(results) < len(messages):
            return "abandoned" if stop.is_set() else "failed"
        errors = [e for e in results if e is not None]
        if errors:
            log.warning("Kafka delivery failed: %s", errors[0])
            return "failed"
        return "acked"

    def close(self) -> None:
        self.producer.flush(5)


RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def _retry_after(response: requests.Response | None) -> float | None:
    if response is None:
        return None
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def send_with_retry(
    session: requests.Session,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    stop: threading.Event,
    rng: random.Random,
    stats: SimulatorStats,
    timeout: float = 10.0,
    max_attempts: int = 6,
    backoff_base: float = 0.2,
    backoff_max: float = 10.0,
) -> str:
    """POST until a 2xx ("acked"), a permanent 4xx ("rejected"), too many failures
    ("failed") or a stop request ("abandoned"). Backoff: exponential with full jitter,
    at least ``Retry-After`` when the server sends one."""
    for attempt in range(max_attempts):
        response = None
        try:
            response = session.post(url, data=body, headers=headers, timeout=timeout)
            if 200 <= response.status_code < 300:
                return "acked"
            if response.status_code not in RETRYABLE_STATUS and response.status_code < 500:
                log.warning("permanent %d from %s: %s", response.status_code, url, response.text[:200])
                return "rejected"
            reason = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            reason = type(exc).__name__
        if attempt + 1 >= max_attempts:
            log.warning("giving up on %s after %d attempts (%s)", url, max_attempts, reason)
            return "failed"
        stats.retries += 1
        delay = rng.uniform(0, min(backoff_max, backoff_base * 2**attempt))
        delay = max(delay, _retry_after(response) or 0.0)
        log.info("retrying %s in %.2fs (%s)", url, delay, reason)
        if stop.wait(delay):
            return "abandoned"
    return "failed"


def run_simulator(
    ingest_url: str | None,
    shop_url: str,
    write_key: str,
    shopify_secret: str,
    rate: float = 5.0,
    *,
    seed: int | None = None,
    duration: float | None = None,
    count: int | None = None,
    shop_domain: str = DEFAULT_SHOP_DOMAIN,
    currency: str = "USD",
    redelivery_rate: float = 0.05,
    cancel_rate: float = 0.05,
    stop_event: threading.Event | None = None,
    record_deliveries: bool = False,
    timeout: float = 10.0,
    max_attempts: int = 6,
    backoff_base: float = 0.2,
    shop_attempts: int = 5,
    session: requests.Session | None = None,
    kafka_bootstrap: str | None = None,
    kafka_topic: str = "pp.events",
    kafka_share: float = 1.0,
) -> SimulatorStats:
    """Send simulated traffic for the shop's people until ``duration`` seconds or ``count``
    events (whichever first; neither -> until ``stop_event`` is set).

    ``rate`` is events per second (a track message or a webhook is one event); requests
    go one at a time, paced so the average holds. With ``kafka_bootstrap`` the events go
    to Kafka instead; with an ingest URL as well, ``kafka_share`` of the requests do.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    if not ingest_url and not kafka_bootstrap:
        raise ValueError("give an ingest URL, a Kafka bootstrap server, or both")
    stop = stop_event or threading.Event()
    session = session or requests.Session()
    customers, products = fetch_shop_data(
        shop_url, session=session, timeout=timeout, attempts=shop_attempts
    )
    model = TrafficModel(
        customers, products, write_key=write_key, shopify_secret=shopify_secret, seed=seed,
        shop_domain=shop_domain, currency=currency, redelivery_rate=redelivery_rate,
        cancel_rate=cancel_rate,
        anonymous_visitors=fetch_anonymous_visitors(shop_url, session=session, timeout=timeout),
    )
    base = (ingest_url or "").rstrip("/")
    publisher = KafkaPublisher(kafka_bootstrap, kafka_topic, timeout=timeout) if kafka_bootstrap else None
    share = 1.0 if not ingest_url else max(0.0, min(1.0, kafka_share))
    transport_rng = random.Random(None if seed is None else seed + 1)
    stats = SimulatorStats()
    started = time.monotonic()
    events_sent = 0
    while not stop.is_set():
        if duration is not None and time.monotonic() - started >= duration:
            break
        if count is not None and events_sent >= count:
            break
        item = next(model)
        if count is not None and events_sent + item.events > count and item.trim is not None:
            item = item.trim(count - events_sent)  # so that exactly `count` events are sent
        due = started + events_sent / rate
        delay = due - time.monotonic()
        if delay > 0 and stop.wait(delay):
            break
        path, body, headers = item.build()
        via_kafka = publisher is not None and transport_rng.random() < share
        if via_kafka:
            outcome = publisher.send(item, body, headers, stop)
        else:
            outcome = send_with_retry(
                session, base + path, body, headers, stop=stop, rng=model.rng, stats=stats,
                timeout=timeout, max_attempts=max_attempts, backoff_base=backoff_base,
            )
        events_sent += item.events
        if outcome == "acked":
            stats.events_acked += item.events
            if via_kafka:
                stats.kafka_events += item.events
            stats.requests_acked += 1
            if item.kind == "track":
                stats.track_batches += 1
                stats.track_messages += item.events
            else:
                stats.webhooks[item.topic] = stats.webhooks.get(item.topic, 0) + 1
                if item.redelivery:
                    stats.redeliveries += 1
                model.maybe_redeliver(item)
            if record_deliveries:
                stats.acked_delivery_ids.extend(item.delivery_ids)
        elif outcome == "rejected":
            stats.rejected += item.events
        elif outcome == "failed":
            stats.failed += item.events
        else:
            stats.abandoned += item.events
    if publisher is not None:
        publisher.close()
    stats.elapsed_seconds = round(time.monotonic() - started, 3)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m personalization_pipeline.simulator",
        description="Send simulated track batches and Shopify webhooks to the ingest service.",
    )
    parser.add_argument("--ingest-url", default=None, help="the ingest service (optional with --kafka-bootstrap)")
    parser.add_argument("--shop-url", required=True)
    parser.add_argument("--rate", type=float, default=5.0, help="events per second")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds (default: forever)")
    parser.add_argument("--count", type=int, default=None, help="events to send")
    parser.add_argument("--shop-domain", default=DEFAULT_SHOP_DOMAIN)
    parser.add_argument("--currency", default="USD")
    parser.add_argument("--redelivery-rate", type=float, default=0.05)
    parser.add_argument("--shop-attempts", type=int, default=5,
                        help="tries to read the shop before giving up (it may be starting)")
    parser.add_argument("--kafka-bootstrap", default=None, help="publish events to Kafka at HOST:PORT")
    parser.add_argument("--kafka-topic", default="pp.events")
    parser.add_argument("--kafka-share", type=float, default=1.0,
                        help="with --ingest-url too: the share of requests published to Kafka")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")

    write_key = os.environ.get("INGEST_WRITE_KEY") or next(
        (k.strip() for k in os.environ.get("INGEST_WRITE_KEYS", "").split(",") if k.strip()), None
    )
    secret = os.environ.get("SHOPIFY_WEBHOOK_SECRET")
    if not write_key:
        print("simulator: INGEST_WRITE_KEY (or INGEST_WRITE_KEYS) is not set", file=sys.stderr)
        return 2
    if not secret:
        print("simulator: SHOPIFY_WEBHOOK_SECRET is not set", file=sys.stderr)
        return 2
    if args.rate <= 0:
        print("simulator: --rate must be positive", file=sys.stderr)
        return 2
    if not args.ingest_url and not args.kafka_bootstrap:
        print("simulator: give --ingest-url, --kafka-bootstrap, or both", file=sys.stderr)
        return 2

    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        stats = run_simulator(
            args.ingest_url, args.shop_url, write_key, secret, args.rate, seed=args.seed,
            duration=args.duration, count=args.count, shop_domain=args.shop_domain,
            currency=args.currency, redelivery_rate=args.redelivery_rate, stop_event=stop,
            shop_attempts=max(1, args.shop_attempts), kafka_bootstrap=args.kafka_bootstrap,
            kafka_topic=args.kafka_topic, kafka_share=args.kafka_share,
        )
    except ShopUnavailableError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
