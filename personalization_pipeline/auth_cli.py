"""`pp-auth hubspot|mailchimp`: run the OAuth 2.0 authorization-code flow once and keep the
result in the secret store, so scheduled runs never need a person again.

It prints the URL to open, waits for the vendor to redirect the browser to a local
callback (http://localhost:PORT/callback; register exactly that redirect URL with the
app), exchanges the code with requests-oauthlib and stores the tokens. Secrets are read
from the environment and never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import requests
from oauthlib.oauth2 import OAuth2Error
from requests_oauthlib import OAuth2Session

from personalization_pipeline import settings
from personalization_pipeline.resources.hubspot import allow_loopback_http, hubspot_token_key
from personalization_pipeline.resources.mailchimp import mailchimp_token_key
from personalization_pipeline.resources.shared_state import SecretStore

HUBSPOT_SCOPES = ["crm.objects.contacts.read", "crm.objects.contacts.write"]


class AuthError(RuntimeError):
    pass


def _require(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise AuthError(f"{name} is not set; export it before running pp-auth (see README, 'Real accounts')")
    return value


def wait_for_code(port: int, state: str, open_url: Callable[[str], None], url: str, timeout: float) -> str:
    """Serve one request on the local callback and return its `code`."""
    box: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            query = parse_qs(urlsplit(self.path).query)
            if query.get("state", [""])[0] != state:
                box["error"] = "the callback's state did not match (a stale or forged redirect)"
            elif "code" not in query:
                box["error"] = f"the vendor returned no code: {query.get('error', ['unknown'])[0]}"
            else:
                box["code"] = query["code"][0]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"Authorised. You can close this tab." if "code" in box else b"Authorisation failed.")

        def log_message(self, *args):
            pass

    try:
        server = HTTPServer(("127.0.0.1", port), Handler)
    except OSError:
        raise AuthError(f"port {port} is in use; pass --port with a free port (and register that redirect URL)") from None
    server.timeout = 0.5
    opener = threading.Thread(target=open_url, args=(url,), daemon=True)
    opener.start()
    deadline = time.monotonic() + timeout
    try:
        while "code" not in box and "error" not in box and time.monotonic() < deadline:
            server.handle_request()
    finally:
        server.server_close()
    if "error" in box:
        raise AuthError(box["error"])
    if "code" not in box:
        raise AuthError(f"no redirect arrived within {timeout:.0f} s")
    return box["code"]


def authorise_hubspot(port: int, open_url: Callable[[str], None], timeout: float, account: str = "default") -> str:
    client_id, client_secret = _require("HUBSPOT_CLIENT_ID"), _require("HUBSPOT_CLIENT_SECRET")
    base = os.environ.get("HUBSPOT_BASE_URL", "https://api.hubapi.com").rstrip("/")
    authorize_url = os.environ.get("HUBSPOT_AUTHORIZE_URL", "https://app.hubspot.com/oauth/authorize")
    token_url = os.environ.get("HUBSPOT_TOKEN_URL", f"{base}/oauth/v1/token")
    redirect = f"http://localhost:{port}/callback"
    allow_loopback_http(token_url)
    allow_loopback_http(redirect)
    session = OAuth2Session(client_id, redirect_uri=redirect, scope=HUBSPOT_SCOPES)
    url, state = session.authorization_url(authorize_url)
    code = wait_for_code(port, state, open_url, url, timeout)
    try:
        token = session.fetch_token(token_url, code=code, client_secret=client_secret, include_client_id=True)
    except (OAuth2Error, requests.RequestException) as exc:
        raise AuthError(f"HubSpot refused the code exchange: {getattr(exc, 'error', type(exc).__name__)}") from None
    now = time.time()
    SecretStore(settings.state_dir() / "secrets.json").put(
        hubspot_token_key(account, client_id),
        {
            "access_token": token["access_token"],
            "refresh_token": token["refresh_token"],
            "token_type": "Bearer",
            "expires_in": float(token.get("expires_in", 1800)),
            "expires_at": now + float(token.get("expires_in", 1800)) - 60,
            "obtained_at": now,
        },
    )
    return "HubSpot authorised; the refresh token is in the secret store."


def authorise_mailchimp(port: int, open_url: Callable[[str], None], timeout: float, account: str = "default") -> str:
    client_id, client_secret = _require("MAILCHIMP_CLIENT_ID"), _require("MAILCHIMP_CLIENT_SECRET")
    authorize_url = os.environ.get("MAILCHIMP_AUTHORIZE_URL", "https://login.mailchimp.com/oauth2/authorize")
    token_url = os.environ.get("MAILCHIMP_TOKEN_URL", "https://login.mailchimp.com/oauth2/token")
    metadata_url = os.environ.get("MAILCHIMP_METADATA_URL", "https://login.mailchimp.com/oauth2/metadata")
    redirect = f"http://localhost:{port}/callback"
    allow_loopback_http(token_url)
    allow_loopback_http(redirect)
    session = OAuth2Session(client_id, redirect_uri=redirect)
    url, state = session.authorization_url(authorize_url)
    code = wait_for_code(port, state, open_url, url, timeout)
    try:
        token = session.fetch_token(token_url, code=code, client_secret=client_secret, include_client_id=True)
    except (OAuth2Error, requests.RequestException) as exc:
        raise AuthError(f"Mailchimp refused the code exchange: {getattr(exc, 'error', type(exc).__name__)}") from None
    meta = requests.get(metadata_url, headers={"Authorization": f"OAuth {token['access_token']}"}, timeout=30)
    if meta.status_code != 200:
        raise AuthError(f"Mailchimp metadata endpoint answered {meta.status_code}")
    SecretStore(settings.state_dir() / "secrets.json").put(
        mailchimp_token_key(account), {"access_token": token["access_token"], "dc": meta.json().get("dc")}
    )
    return f"Mailchimp authorised (data centre {meta.json().get('dc')}); the token is in the secret store."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pp-auth", description=__doc__.split("\n\n")[0])
    parser.add_argument("vendor", choices=["hubspot", "mailchimp"])
    parser.add_argument("--port", type=int, default=8765, help="local callback port (default 8765)")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--account", default="default")
    args = parser.parse_args(argv)

    def show(url: str) -> None:
        print(f"Open this URL in a browser and approve access:\n\n  {url}\n", flush=True)

    flow = authorise_hubspot if args.vendor == "hubspot" else authorise_mailchimp
    try:
        print(flow(args.port, show, args.timeout, args.account))
    except AuthError as exc:
        print(f"pp-auth: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
