"""Endpoint, profile, region and credentials, resolved once and applied to both backends."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from runctl.exceptions import ConfigError

if TYPE_CHECKING:
    from botocore.client import BaseClient

#: Endpoint variables, most specific first (AWS_ENDPOINT_URL_S3 is the SDKs' service-specific one).
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
DEFAULT_REGION = "us-east-1"

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember a credential so that ``scrub`` removes it from any text."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def scrub(text: str) -> str:
    """Replace every known credential in ``text`` with ``****``.

    Example:
        >>> register_secret("hunter2-secret")
        >>> scrub("key=hunter2-secret")
        'key=****'
    """
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "****")
    return text


@dataclass(frozen=True)
class Credentials:
    """Static credentials handed to s5cmd (through its environment) and boto3 alike."""

    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class S3Config:
    """Where and as whom to talk to S3.

    ``endpoint_url`` is None for AWS itself; any other endpoint (GCS's interoperability
    endpoint, MinIO, rclone, moto) is addressed path-style.

    Example:
        >>> cfg = S3Config(endpoint_url="http://127.0.0.1:9000", region="us-east-1")
        >>> cfg.path_style
        True
    """

    endpoint_url: str | None = None
    profile: str | None = None
    region: str = DEFAULT_REGION
    #: Explicit credentials; None means the standard chain (env, profile, instance role).
    static_credentials: Credentials | None = field(default=None, repr=False)
    #: True when nothing configured ``region`` (it is the us-east-1 fallback): s5cmd is then
    #: left to find each bucket's region itself, as it does run bare, and botocore follows
    #: S3's redirect to it; pinned to us-east-1, s5cmd failed on every bucket elsewhere.
    region_guessed: bool = False
    #: The profile's ``ca_bundle`` (``AWS_CA_BUNDLE`` reaches s5cmd and botocore by itself).
    ca_bundle: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            _check_endpoint(self.endpoint_url)

    @property
    def path_style(self) -> bool:
        return self.endpoint_url is not None

    @property
    def credentials(self) -> Credentials | None:
        """Credentials from the standard chain; None when there are none.

        The chain is resolved once. Temporary credentials (a role, SSO, a credential process,
        an instance or container role) are read anew each time, as botocore refreshes them
        ahead of their expiry: each s5cmd started gets the current ones, and a training run
        outlives the hour or so its first ones last.
        """
        fixed, live = self._chain
        if live is None:
            return fixed
        try:
            frozen = live.get_frozen_credentials()
        except Exception as exc:  # noqa: BLE001 - botocore's refresh errors have no common base
            from runctl.exceptions import TransferError

            # Retried as any S3 request is (a credential helper or its network down briefly),
            # as boto3 and aws-cli retry it; not a usage error.
            raise TransferError(f"cannot refresh AWS credentials: {scrub(str(exc))}") from None
        creds = Credentials(frozen.access_key, frozen.secret_key, frozen.token)
        register_secret(creds.secret_key)
        register_secret(creds.token)
        return creds

    @cached_property
    def _chain(self) -> tuple[Credentials | None, Any]:
        """(credentials that do not change, botocore's refreshable credentials): one is None."""
        if self.static_credentials is not None:
            creds = self.static_credentials
        elif (from_env := self._env_credentials()) is not None:
            creds = from_env
        else:
            import botocore.session
            from botocore.exceptions import BotoCoreError

            try:
                session = botocore.session.Session(profile=self.profile)
                found = session.get_credentials()
            except BotoCoreError as exc:
                # A credential_process that failed silently ends botocore's text with ':'.
                said = str(exc).rstrip().rstrip(":") or type(exc).__name__
                if str(exc).rstrip().endswith(":"):
                    said += " (it printed nothing on stderr)"
                raise ConfigError(f"cannot load AWS credentials: {said}") from None
            if found is None:
                return None, None
            if hasattr(found, "refresh_needed"):  # botocore's RefreshableCredentials
                return None, found
            frozen = found.get_frozen_credentials()
            creds = Credentials(frozen.access_key, frozen.secret_key, frozen.token)
        register_secret(creds.secret_key)
        register_secret(creds.token)
        return creds, None

    def _env_credentials(self) -> Credentials | None:
        """The key pair in the environment, read without importing botocore (0.1 s saved per command).

        Used only when no profile is named (neither here nor in ``AWS_PROFILE``) and both keys
        are set: exactly the case where botocore's chain would pick the environment provider.
        Anything else (a profile, a partial pair, no keys) goes through botocore as before.
        """
        env = os.environ
        if self.profile or _env_profile(env) or env.get("AWS_CREDENTIAL_EXPIRATION"):
            return None  # expiring env credentials: botocore's refresh logic applies
        access_key = env.get("AWS_ACCESS_KEY_ID", "")
        secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
        if not (access_key and secret_key):
            return None
        token = env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None
        return Credentials(access_key, secret_key, token)

    def child_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a child process (s5cmd): credentials go here, never on its command line."""
        env = dict(os.environ if base is None else base)
        for var in ENDPOINT_VARS:
            env.pop(var, None)
        creds = self.credentials
        if creds is not None:
            env["AWS_ACCESS_KEY_ID"] = creds.access_key
            env["AWS_SECRET_ACCESS_KEY"] = creds.secret_key
            if creds.token:
                env["AWS_SESSION_TOKEN"] = creds.token
            else:
                env.pop("AWS_SESSION_TOKEN", None)
            # The resolved credentials win; a profile in the child would only confuse it. Nor
            # may it read the [default] profile in its place: its region and ca_bundle were
            # s5cmd's under `--profile work` (boto3 and aws-cli read only work's; config pass).
            # What runctl resolved from the profile reaches it below.
            env.pop("AWS_PROFILE", None)
            env.pop("AWS_DEFAULT_PROFILE", None)
            env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        elif self.profile:
            env["AWS_PROFILE"] = self.profile
        if self.ca_bundle and not env.get("AWS_CA_BUNDLE"):
            env["AWS_CA_BUNDLE"] = self.ca_bundle  # the profile's, which s5cmd no longer sees
        if self.region_guessed:
            env.pop("AWS_REGION", None)
            env.pop("AWS_DEFAULT_REGION", None)
        else:
            env["AWS_REGION"] = self.region
            env["AWS_DEFAULT_REGION"] = self.region
        return env

    def boto_client(self, **client_kwargs: Any) -> BaseClient:
        """A botocore S3 client with this endpoint, region, credentials and addressing style.

        Built on a botocore session, as boto3 builds its own: importing boto3 (and s3transfer,
        which it loads) as well cost 0.04-0.06 s of CPU per process and adds nothing runctl
        calls (its upload_file/download_file helpers; runctl drives s3transfer itself).

        Example:
            >>> S3Config(endpoint_url="http://127.0.0.1:9000").boto_client().meta.region_name  # doctest: +SKIP
            'us-east-1'
        """
        import botocore.session
        from botocore.config import Config as BotoConfig

        creds, live = self._chain
        # The profile's other settings (its ca_bundle) apply with credentials resolved from it;
        # without --profile, botocore reads AWS_PROFILE as the AWS CLI does. (profile=None here
        # lost the ca_bundle, and a stale AWS_PROFILE beside --profile raised ProfileNotFound.)
        session = botocore.session.Session(profile=self.profile)
        if (creds or live) and self.profile and self.profile not in session.available_profiles:
            # Credentials given outright need no profile: one missing from this machine's files
            # made every request raise ProfileNotFound (diff review).
            session = botocore.session.Session()
        # The endpoint is runctl's to resolve (resolve_config, which s5cmd follows too): botocore
        # would otherwise take one from the config file where this one is None (AWS itself).
        session.set_config_variable("ignore_configured_endpoint_urls", True)
        if creds is not None:
            session.set_credentials(creds.access_key, creds.secret_key, creds.token)
        elif live is not None:  # the client signs with them as botocore refreshes them
            from botocore.credentials import CredentialResolver

            session.register_component("credential_provider", CredentialResolver([_Held(live)]))
        boto_config = BotoConfig(
            # Where s5cmd goes direct, so does this client: on the default backend a directory's
            # files went straight to a loopback endpoint and its marker to the proxy, which
            # could not reach it: files landed, the checkpoint never completed (config pass).
            proxies={} if goes_direct(self.endpoint_url, os.environ) else None,
            s3={"addressing_style": "path" if self.path_style else "auto"},
            # aws-cli v2's: the uploader retries each checkpoint 5 times on top, and 5 here had
            # one that S3 refused throughout fail after 87-125 s, 30 PUTs (fault pass; now 32 s).
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=32,
            connect_timeout=10,
            read_timeout=60,
            # Newer botocore adds CRC checksums that some S3-compatible stores reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        bundles = [os.environ.get("AWS_CA_BUNDLE"), self.ca_bundle, os.environ.get("REQUESTS_CA_BUNDLE")]
        if any(b is not None and not b.strip() for b in bundles):
            # Set and empty (`docker run -e AWS_CA_BUNDLE=$AWS_CA_BUNDLE` on a host without
            # one) is unset to s5cmd; botocore refused it, so a directory's files landed through
            # s5cmd and its marker failed through botocore, 15 s of retries (config pass). The
            # first one set and not empty applies, as botocore orders them (an empty
            # REQUESTS_CA_BUNDLE once cancelled a good AWS_CA_BUNDLE; diff review).
            client_kwargs.setdefault("verify", next((b for b in bundles if b and b.strip()), True))
        return session.create_client(
            "s3",
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            config=boto_config,
            **client_kwargs,
        )


def goes_direct(endpoint_url: str | None, env: Mapping[str, str]) -> bool:
    """Whether s5cmd (Go's net/http) reaches ``endpoint_url`` without a proxy where botocore
    (urllib's rules) would take ``HTTPS_PROXY``/``HTTP_PROXY``: a loopback host, which Go never
    proxies, or an address in a CIDR range of ``NO_PROXY``, which urllib does not read.
    Host names are matched alike by both.

    Example:
        >>> goes_direct("http://127.0.0.1:9000", {}), goes_direct("http://10.1.2.3:9000", {"NO_PROXY": "10.0.0.0/8"})
        (True, True)
        >>> goes_direct("https://s3.example.com", {"NO_PROXY": "10.0.0.0/8"})
        False
    """
    import ipaddress  # here: the CLI's start-up does not need them
    from urllib.parse import urlsplit

    host = urlsplit(endpoint_url).hostname if endpoint_url else None
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.is_loopback:
        return True
    no_proxy = env.get("NO_PROXY") or env.get("no_proxy") or ""  # Go's order
    for entry in no_proxy.split(","):
        entry = entry.strip()
        if "/" not in entry:
            continue
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def _check_endpoint(endpoint_url: str) -> None:
    """An endpoint carrying ``user:password@`` would put the password in s5cmd's argv and in
    messages; S3 signs requests with access keys, so the URL has no use for it. One that cannot
    be parsed (``http://[::1``, a port that is not a number) is refused here too."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(endpoint_url)
        scheme, netloc = parts.scheme, parts.netloc
        parts.port  # noqa: B018 - parsed on access: a bad port raises here, not in botocore
    except ValueError as exc:
        raise ConfigError(f"invalid endpoint URL: {exc}") from None
    if "@" in netloc:
        host = netloc.rpartition("@")[2]
        raise ConfigError(
            f"invalid endpoint URL '{scheme}://****@{host}': it carries a user or password, which"
            " S3 does not use (credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            " or --profile)"
        )


def profile_settings(profile: str | None, env: Mapping[str, str]) -> dict[str, str]:
    """The AWS config file's settings for ``profile`` (else ``default``) that runctl uses.

    ``region``, ``ca_bundle``, ``endpoint_url`` (the profile's own, overridden by its ``services`` section's
    ``s3`` one, as the AWS SDKs have it) and ``ignore_configured_endpoint_urls``. The file is
    ``$AWS_CONFIG_FILE`` or ``~/.aws/config``; one that is missing or unreadable gives nothing
    (botocore names a broken one when it looks for credentials).

    Example:
        >>> profile_settings("nope", {"AWS_CONFIG_FILE": "/nonexistent"})
        {}
    """
    path = os.path.expanduser(env.get("AWS_CONFIG_FILE") or "~/.aws/config")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError):
        return {}
    import configparser  # only with a file to parse: 2 ms of start-up otherwise

    parser = configparser.RawConfigParser()
    try:
        parser.read_string(text, path)
    except configparser.Error:
        return {}
    name = profile or "default"
    section = name if name == "default" and parser.has_section("default") else f"profile {name}"
    if not parser.has_section(section):
        return {}
    found = {
        key: parser.get(section, key).strip()
        for key in ("region", "endpoint_url", "ignore_configured_endpoint_urls", "ca_bundle")
        if parser.has_option(section, key)
    }
    services = f"services {parser.get(section, 'services').strip()}" if parser.has_option(section, "services") else ""
    if services and parser.has_option(services, "s3"):
        # A nested block: "s3 =" then indented "endpoint_url = ..." lines.
        for line in parser.get(services, "s3").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "endpoint_url" and value.strip():
                found["endpoint_url"] = value.strip()
    return {key: value for key, value in found.items() if value}


def _env_profile(env: Mapping[str, str]) -> str | None:
    """The profile the environment names, as botocore and aws read it (AWS_DEFAULT_PROFILE first).

    Example:
        >>> _env_profile({"AWS_PROFILE": "a", "AWS_DEFAULT_PROFILE": "b"})
        'b'
    """
    return env.get("AWS_DEFAULT_PROFILE") or env.get("AWS_PROFILE") or None


def resolve_config(
    endpoint_url: str | None = None,
    profile: str | None = None,
    region: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> S3Config:
    """Resolve flags first, then the standard variables, then the AWS config file's profile.

    As the AWS CLI does: the endpoint from ``--endpoint-url``, ``AWS_ENDPOINT_URL_S3``,
    ``AWS_ENDPOINT_URL`` (and runctl's ``S3_ENDPOINT_URL``), then the profile's ``services``
    and ``endpoint_url``, all but the flag ignored under ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS``
    (or the profile's ``ignore_configured_endpoint_urls``); the region from ``--region``,
    ``AWS_REGION``, ``AWS_DEFAULT_REGION``, then the profile's ``region``, else us-east-1.

    Example:
        >>> resolve_config(env={"S3_ENDPOINT_URL": "http://127.0.0.1:9000"}).endpoint_url
        'http://127.0.0.1:9000'
    """
    env = os.environ if env is None else env
    # AWS_PROFILE is left to botocore and s5cmd to read, as the AWS CLI has it: named there, a
    # profile does not outrank the key pair in the environment; named with --profile, it does.
    settings: dict[str, str] | None = None

    def setting(key: str) -> str | None:
        nonlocal settings
        if settings is None:  # the file is read only when a flag or variable leaves a gap
            settings = profile_settings(profile or _env_profile(env), env)
        return settings.get(key)

    if endpoint_url is None:
        ignore = env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or setting("ignore_configured_endpoint_urls")
        if (ignore or "").strip().lower() != "true":
            endpoint_url = next((env[v] for v in ENDPOINT_VARS if env.get(v)), None)
            endpoint_url = endpoint_url or setting("endpoint_url")
    if endpoint_url is not None:
        endpoint_url = endpoint_url.strip().rstrip("/")
        if not endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(f"invalid endpoint URL {endpoint_url!r}: must start with http:// or https://")
    region = region or next((env[v] for v in REGION_VARS if env.get(v)), None) or setting("region")
    ca_bundle = None if env.get("AWS_CA_BUNDLE") else setting("ca_bundle")
    return S3Config(
        endpoint_url=endpoint_url,
        profile=profile,
        region=region or DEFAULT_REGION,
        region_guessed=not region,
        ca_bundle=os.path.expanduser(ca_bundle) if ca_bundle else None,
    )


class _Held:
    """A botocore credential provider that hands over credentials already resolved."""

    METHOD = "runctl"
    CANONICAL_NAME = "runctl"

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials

    def load(self) -> Any:
        return self._credentials
