"""`pp-auth`: the OAuth authorization-code flow against the sandbox's (auto-approving)
authorize endpoints, over real HTTP through the local callback; the tokens land in the
secret store and the pipeline's clients use them."""

from __future__ import annotations


import pytest
import requests

from personalization_pipeline.ports import free_ports
from personalization_pipeline import auth_cli, settings
from personalization_pipeline.resources.hubspot import HubSpotResource, hubspot_token_key
from personalization_pipeline.resources.mailchimp import MailchimpResource, mailchimp_token_key
from personalization_pipeline.resources.shared_state import SecretStore
from personalization_pipeline.sandbox.server import SandboxConfig, start_sandbox


def browser(url: str) -> None:
    """What a person's browser does: open the URL, approve, follow the redirect."""
    requests.get(url, allow_redirects=True, timeout=10)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.setenv("PP_DATA_DIR", str(tmp_path))
    with start_sandbox(SandboxConfig(size=50)) as running:
        yield running


def test_hubspot_authorisation_stores_a_refresh_token_the_client_uses(sandbox, monkeypatch):
    cfg = sandbox.config
    monkeypatch.setenv("HUBSPOT_CLIENT_ID", cfg.hubspot_client_id)
    monkeypatch.setenv("HUBSPOT_CLIENT_SECRET", cfg.hubspot_client_secret)
    monkeypatch.setenv("HUBSPOT_BASE_URL", sandbox.hubspot_url)
    monkeypatch.setenv("HUBSPOT_AUTHORIZE_URL", f"{sandbox.hubspot_url}/oauth/authorize")
    message = auth_cli.authorise_hubspot(free_ports()[0], browser, timeout=20)
    assert "refresh token is in the secret store" in message
    stored = SecretStore(settings.state_dir() / "secrets.json").get(hubspot_token_key("default", cfg.hubspot_client_id))
    assert stored["refresh_token"] and stored["access_token"]
    # No HUBSPOT_REFRESH_TOKEN anywhere: the client runs on the stored token alone.
    client = HubSpotResource(
        base_url=sandbox.hubspot_url, client_id=cfg.hubspot_client_id, client_secret=cfg.hubspot_client_secret
    ).get_client()
    assert client.get_contact(sandbox.hubspot_state.ground_truth(None, None)[0]["id"])["id"]


def test_mailchimp_authorisation_stores_the_token_and_data_centre(sandbox, monkeypatch):
    cfg = sandbox.config
    monkeypatch.setenv("MAILCHIMP_CLIENT_ID", cfg.mailchimp_client_id)
    monkeypatch.setenv("MAILCHIMP_CLIENT_SECRET", cfg.mailchimp_client_secret)
    monkeypatch.setenv("MAILCHIMP_AUTHORIZE_URL", f"{sandbox.mailchimp_url}/oauth2/authorize")
    monkeypatch.setenv("MAILCHIMP_TOKEN_URL", f"{sandbox.mailchimp_url}/oauth2/token")
    monkeypatch.setenv("MAILCHIMP_METADATA_URL", f"{sandbox.mailchimp_url}/oauth2/metadata")
    message = auth_cli.authorise_mailchimp(free_ports()[0], browser, timeout=20)
    assert "data centre us1" in message
    stored = SecretStore(settings.state_dir() / "secrets.json").get(mailchimp_token_key("default"))
    assert stored["access_token"] and stored["dc"] == "us1"
    client = MailchimpResource(
        list_id=cfg.mailchimp_list_id, metadata_url=f"{sandbox.mailchimp_url}/oauth2/metadata"
    ).get_client()
    assert client.merge_fields(cfg.mailchimp_list_id)


def test_missing_credentials_are_a_clear_message(monkeypatch, capsys):
    monkeypatch.delenv("HUBSPOT_CLIENT_ID", raising=False)
    assert auth_cli.main(["hubspot", "--timeout", "1"]) == 2
    assert "HUBSPOT_CLIENT_ID is not set" in capsys.readouterr().err


def test_a_forged_callback_is_refused():
    port = free_ports()[0]

    def forged(url: str) -> None:
        requests.get(f"http://127.0.0.1:{port}/callback?code=abc&state=not-the-state", timeout=5)

    with pytest.raises(auth_cli.AuthError, match="state did not match"):
        auth_cli.wait_for_code(port, "the-real-state", forged, "http://unused", timeout=10)
