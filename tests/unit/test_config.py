"""Config resolution: flags over variables, path-style for custom endpoints, credentials only in env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runctl.config import (
    DEFAULT_REGION,
    Credentials,
    S3Config,
    register_secret,
    resolve_config,
    scrub,
)
from runctl.exceptions import ConfigError, UsageError

FLAG = "http://flag.example:1"
S3_VAR = "http://aws-endpoint-url-s3.example:2"
GENERIC = "http://aws-endpoint-url.example:3"
LEGACY = "http://s3-endpoint-url.example:4"


@pytest.mark.parametrize(
    "flag, env, expected",
    [
        (FLAG, {"AWS_ENDPOINT_URL_S3": S3_VAR, "AWS_ENDPOINT_URL": GENERIC, "S3_ENDPOINT_URL": LEGACY}, FLAG),
        (None, {"AWS_ENDPOINT_URL_S3": S3_VAR, "AWS_ENDPOINT_URL": GENERIC, "S3_ENDPOINT_URL": LEGACY}, S3_VAR),
        (None, {"AWS_ENDPOINT_URL": GENERIC, "S3_ENDPOINT_URL": LEGACY}, GENERIC),
        (None, {"S3_ENDPOINT_URL": LEGACY}, LEGACY),
        (None, {"AWS_ENDPOINT_URL_S3": "", "AWS_ENDPOINT_URL": GENERIC}, GENERIC),
        (None, {}, None),
    ],
)
def test_endpoint_resolution_order(flag: str | None, env: dict[str, str], expected: str | None) -> None:
    assert resolve_config(endpoint_url=flag, env=env).endpoint_url == expected


def test_endpoint_is_tidied_and_checked() -> None:
    assert resolve_config(endpoint_url=" http://127.0.0.1:9000/ ", env={}).endpoint_url == "http://127.0.0.1:9000"
    with pytest.raises(ConfigError, match="'127.0.0.1:9000'") as info:
        resolve_config(endpoint_url="127.0.0.1:9000", env={})
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    with pytest.raises(ConfigError, match="ftp://x"):
        resolve_config(env={"AWS_ENDPOINT_URL": "ftp://x"})


@pytest.mark.parametrize(
    "url", ["http://u:SEKRET@127.0.0.1:9000", "https://SEKRET@s3.example.com", "http://u:SEKRET@h/p"]
)
def test_an_endpoint_with_a_password_is_refused_without_showing_it(url: str) -> None:
    # It would reach s5cmd's argv (ps) and error messages; S3 signs with keys, not the URL.
    with pytest.raises(ConfigError) as info:
        resolve_config(env={"AWS_ENDPOINT_URL_S3": url})
    assert "SEKRET" not in str(info.value) and "****@" in str(info.value)
    with pytest.raises(ConfigError):
        S3Config(endpoint_url=url)


@pytest.mark.parametrize(
    "flag, env, expected",
    [
        ("eu-west-1", {"AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "ap-south-1"}, "eu-west-1"),
        (None, {"AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "ap-south-1"}, "us-west-2"),
        (None, {"AWS_DEFAULT_REGION": "ap-south-1"}, "ap-south-1"),
        (None, {}, DEFAULT_REGION),
    ],
)
def test_region_resolution(flag: str | None, env: dict[str, str], expected: str) -> None:
    assert resolve_config(region=flag, env=env).region == expected


def test_profile_resolution() -> None:
    assert resolve_config(profile="flag", env={"AWS_PROFILE": "env"}).profile == "flag"
    # AWS_PROFILE is botocore's and s5cmd's to read: named there, a profile does not outrank
    # the environment's key pair (as for aws); an explicit one does.
    assert resolve_config(env={"AWS_PROFILE": "env"}).profile is None
    assert resolve_config(env={}).profile is None


def test_aws_profile_in_the_environment_leaves_the_environments_keys_first(tmp_path: Path) -> None:
    # `AWS_PROFILE=p aws s3 ls` with the keys in the environment and none in profile p works;
    # runctl passed p to botocore as if named with --profile, which skips the environment's
    # keys: NoCredentials on boto3, and for every directory marker on s5cmd.
    config = tmp_path / "config"
    config.write_text("[profile p]\nregion = eu-west-1\n")
    env = {
        "AWS_PROFILE": "p",
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_ACCESS_KEY_ID": "AKIDFROMENV",
        "AWS_SECRET_ACCESS_KEY": "secret-from-env",
    }
    probe = (
        "from runctl.config import resolve_config\n"
        "cfg = resolve_config()\n"
        "print(cfg.region, cfg.credentials.access_key, cfg.boto_client()._request_signer._credentials.access_key)\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run([sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["eu-west-1", "AKIDFROMENV", "AKIDFROMENV"]


def test_path_style_only_for_custom_endpoints() -> None:
    assert S3Config(endpoint_url="http://127.0.0.1:9000").path_style is True
    assert S3Config(endpoint_url="https://storage.googleapis.com").path_style is True
    assert S3Config().path_style is False
    client = S3Config(
        endpoint_url="http://127.0.0.1:9", static_credentials=Credentials("AKIDEXAMPLE", "secret-for-path-style")
    ).boto_client()
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.endpoint_url == "http://127.0.0.1:9"


def test_scrub_removes_registered_secrets() -> None:
    register_secret("s3cr3t-value-for-scrub")
    register_secret("abc")  # too short to register: would mangle ordinary text
    text = "auth failed for s3cr3t-value-for-scrub (abc)"
    assert scrub(text) == "auth failed for **** (abc)"
    register_secret(None)
    assert scrub("nothing to hide") == "nothing to hide"


def test_child_env_puts_credentials_in_env_only() -> None:
    creds = Credentials("AKIDCHILDENV", "child-env-secret-key", token="child-env-session-token")
    cfg = S3Config(endpoint_url="http://127.0.0.1:9000", region="eu-west-1", static_credentials=creds)
    base = {
        "PATH": "/bin",
        "AWS_ENDPOINT_URL_S3": "http://elsewhere",
        "AWS_ENDPOINT_URL": "http://elsewhere",
        "S3_ENDPOINT_URL": "http://elsewhere",
        "AWS_PROFILE": "stale",
    }
    env = cfg.child_env(base)
    assert env["AWS_ACCESS_KEY_ID"] == "AKIDCHILDENV"
    assert env["AWS_SECRET_ACCESS_KEY"] == "child-env-secret-key"
    assert env["AWS_SESSION_TOKEN"] == "child-env-session-token"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["PATH"] == "/bin"
    for gone in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_PROFILE"):
        assert gone not in env
    assert "AWS_ACCESS_KEY_ID" not in base, "the caller's mapping is not modified"
    # Once resolved, the secret and token are scrubbed from any text, and never in repr.
    assert scrub("key child-env-secret-key tok child-env-session-token") == "key **** tok ****"
    assert "child-env-secret-key" not in repr(cfg) and "child-env-secret-key" not in repr(creds)


def test_child_env_without_token_drops_stale_token() -> None:
    cfg = S3Config(static_credentials=Credentials("AKIDNOTOKEN", "no-token-secret"))
    env = cfg.child_env({"AWS_SESSION_TOKEN": "stale-token"})
    assert "AWS_SESSION_TOKEN" not in env


def test_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-the-env-chain")
    creds = S3Config().credentials
    assert creds is not None and creds.access_key == "AKIDFROMENV"
    assert scrub("x secret-from-the-env-chain") == "x ****"


def test_no_credentials_keeps_profile_for_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    cfg = S3Config()
    assert cfg.credentials is None
    env = S3Config(profile=None).child_env({})
    assert "AWS_ACCESS_KEY_ID" not in env


_NO_BOTOCORE_SCRIPT = """
import sys
from runctl.config import S3Config, scrub
creds = S3Config().credentials
assert creds is not None, "no credentials"
print(creds.access_key, creds.token, scrub("x env-secret-no-botocore"))
print("botocore" in sys.modules)
"""


def _run_resolution(env: dict[str, str]) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out = subprocess.run(
        [sys.executable, "-c", _NO_BOTOCORE_SCRIPT],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.split("\n")


def test_env_credentials_resolve_without_importing_botocore() -> None:
    lines = _run_resolution(
        {
            "AWS_ACCESS_KEY_ID": "AKIDNOBOTO",
            "AWS_SECRET_ACCESS_KEY": "env-secret-no-botocore",
            "AWS_SESSION_TOKEN": "env-token-no-botocore",
        }
    )
    assert lines[0] == "AKIDNOBOTO env-token-no-botocore x ****"
    assert lines[1] == "False"


def test_env_credentials_with_a_profile_still_use_botocore(tmp_path: Path) -> None:
    creds_file = tmp_path / "credentials"
    creds_file.write_text("[other]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = s3cret-profile\n")
    lines = _run_resolution(
        {
            "AWS_ACCESS_KEY_ID": "AKIDNOBOTO",
            "AWS_SECRET_ACCESS_KEY": "env-secret-no-botocore",
            "AWS_PROFILE": "other",
            "AWS_SHARED_CREDENTIALS_FILE": str(creds_file),
            "AWS_CONFIG_FILE": str(tmp_path / "config"),
        }
    )
    # AWS_PROFILE alone does not beat env keys in botocore's chain; what matters is the path taken.
    assert lines[1] == "True"


def test_partial_env_pair_falls_back_to_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDHALF")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    assert S3Config()._env_credentials() is None


def test_boto_client_signs_with_the_profile_and_needs_no_boto3(tmp_path: Path) -> None:
    # botocore alone builds the client (boto3 and s3transfer cost 0.04-0.06 s of CPU to import).
    creds_file = tmp_path / "credentials"
    creds_file.write_text("[other]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = s3cret-profile\n")
    probe = (
        "import json, sys\n"
        "from runctl.config import S3Config\n"
        "c = S3Config(profile='other', region='eu-west-1', endpoint_url='http://127.0.0.1:9').boto_client()\n"
        "key = c._request_signer._credentials.access_key\n"
        "print(json.dumps([key, c.meta.region_name, 'boto3' in sys.modules]))\n"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AWS_")
    } | {"AWS_SHARED_CREDENTIALS_FILE": str(creds_file), "AWS_CONFIG_FILE": str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '["AKIDPROFILE", "eu-west-1", false]'


def test_the_config_files_profile_gives_the_endpoint_and_region_as_aws_has_them(tmp_path: Path) -> None:
    # `endpoint_url` in ~/.aws/config (MinIO users' usual setup) was ignored by both backends.
    config = tmp_path / "config"
    config.write_text(
        "[default]\nregion = eu-west-1\nendpoint_url = http://default.example:1\n"
        "[profile minio]\nendpoint_url = http://minio.example:9000\nregion = eu-central-1\n"
        "[profile svc]\nendpoint_url = http://global.example:1\nservices = mine\n"
        "[services mine]\ns3 =\n  endpoint_url = http://s3-only.example:2\n"
        "[profile bare]\n"
        "[profile ignoring]\nendpoint_url = http://ignored.example:1\nignore_configured_endpoint_urls = true\n"
    )
    base = {"AWS_CONFIG_FILE": str(config)}

    def resolved(env: dict[str, str], **flags: str) -> tuple[str | None, str]:
        cfg = resolve_config(env=base | env, **flags)
        return cfg.endpoint_url, cfg.region

    assert resolved({}) == ("http://default.example:1", "eu-west-1")
    assert resolved({"AWS_PROFILE": "minio"}) == ("http://minio.example:9000", "eu-central-1")
    assert resolved({}, profile="minio") == ("http://minio.example:9000", "eu-central-1")
    assert resolved({}, profile="svc") == ("http://s3-only.example:2", DEFAULT_REGION)
    assert resolved({}, profile="bare") == (None, DEFAULT_REGION)
    assert resolved({}, profile="ignoring") == (None, DEFAULT_REGION)
    # Flags and variables win over the file; AWS_IGNORE_CONFIGURED_ENDPOINT_URLS drops both.
    assert resolved({"AWS_ENDPOINT_URL": GENERIC, "AWS_REGION": "ap-south-1"}, profile="minio") == (
        GENERIC,
        "ap-south-1",
    )
    assert resolved({}, profile="minio", endpoint_url=FLAG, region="us-west-2") == (FLAG, "us-west-2")
    ignore = {"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true", "AWS_ENDPOINT_URL": GENERIC}
    assert resolved(ignore, profile="minio") == (None, "eu-central-1")
    assert resolved(ignore, profile="minio", endpoint_url=FLAG)[0] == FLAG
    # A profile the file lacks, or a file that cannot be parsed, gives nothing from it.
    assert resolved({}, profile="nope") == (None, DEFAULT_REGION)
    config.write_text("not an ini file [\n")
    assert resolved({}) == (None, DEFAULT_REGION)


def test_temporary_credentials_are_read_anew_as_botocore_refreshes_them(tmp_path: Path) -> None:
    # The chain was resolved once and frozen: a role's or SSO's credentials, an hour long, went
    # to every s5cmd and the boto3 client of a day-long training run, which failed once they
    # expired (InvalidAccessKeyId), though boto3 and aws-cli refresh them.
    state = tmp_path / "key"
    state.write_text("AKIDFIRST")
    process = tmp_path / "creds.py"
    process.write_text(
        "import datetime, json, pathlib\n"
        "soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)\n"
        f"key = pathlib.Path({str(state)!r}).read_text()\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': key, 'SecretAccessKey': 'secret-' + key,\n"
        "                  'SessionToken': 'token-' + key, 'Expiration': soon.isoformat()}))\n"
    )
    config = tmp_path / "config"
    config.write_text(f"[profile rot]\ncredential_process = {sys.executable} {process}\n")
    probe = (
        "import pathlib, sys\n"
        "from runctl.config import resolve_config\n"
        "cfg = resolve_config(profile='rot')\n"
        "client = cfg.boto_client()\n"
        "def seen():\n"
        "    signer = client._request_signer._credentials.get_frozen_credentials()\n"
        "    return [cfg.credentials.access_key, cfg.child_env()['AWS_ACCESS_KEY_ID'], signer.access_key]\n"
        "print(*seen())\n"
        f"pathlib.Path({str(state)!r}).write_text('AKIDSECOND')  # the source rotates\n"
        "print(*seen())\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env = {**base, "AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["AKIDFIRST AKIDFIRST AKIDFIRST", "AKIDSECOND AKIDSECOND AKIDSECOND"]


def test_a_credential_refresh_that_fails_is_retried_not_a_usage_error(tmp_path: Path) -> None:
    # A ConfigError (a UsageError) from a refresh failed a checkpoint at its first attempt on
    # s5cmd, where boto3 retried it (diff review): a credential helper down for a second.
    process = tmp_path / "creds.py"
    ok = tmp_path / "ok"
    ok.write_text("")
    process.write_text(
        "import datetime, json, pathlib, sys\n"
        f"if not pathlib.Path({str(ok)!r}).exists():\n"
        "    sys.exit('the helper is down')\n"
        "soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': 'AKIDTEMP', 'SecretAccessKey': 'secret-temp',\n"
        "                  'SessionToken': 'token-temp', 'Expiration': soon.isoformat()}))\n"
    )
    config = tmp_path / "config"
    config.write_text(f"[profile rot]\ncredential_process = {sys.executable} {process}\n")
    probe = (
        "import pathlib\n"
        "from runctl.config import resolve_config\n"
        "from runctl.exceptions import TransferError, UsageError\n"
        "from runctl.retry import RetryPolicy\n"
        "cfg = resolve_config(profile='rot')\n"
        "print(cfg.credentials.access_key)\n"
        f"pathlib.Path({str(ok)!r}).unlink()\n"
        "try:\n"
        "    cfg.child_env()\n"
        "except TransferError as exc:\n"
        "    print(type(exc).__name__, isinstance(exc, UsageError), RetryPolicy().is_retryable(exc))\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env = {**base, "AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["AKIDTEMP", "TransferError False True"]


def test_a_region_nothing_configured_is_left_to_s5cmd_to_find(tmp_path: Path) -> None:
    """Pinned to the us-east-1 fallback, s5cmd failed on every bucket in another region (plain
    s5cmd finds a bucket's region when none is set; botocore follows S3's redirect)."""
    base = {"AWS_CONFIG_FILE": str(tmp_path / "none"), "PATH": "/bin"}
    guessed = resolve_config(env=base)
    assert guessed.region == DEFAULT_REGION and guessed.region_guessed
    env = guessed.child_env({**base, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    assert "AWS_REGION" not in env and "AWS_DEFAULT_REGION" not in env
    for configured in (resolve_config(env=base | {"AWS_DEFAULT_REGION": "eu-west-1"}), resolve_config(region="eu-west-1", env=base)):
        assert not configured.region_guessed
        assert configured.child_env(base)["AWS_REGION"] == "eu-west-1"


def test_a_profiles_ca_bundle_reaches_s5cmd_and_botocore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A named profile's ca_bundle was dropped (s5cmd's environment loses AWS_PROFILE once its
    credentials are resolved; botocore's session had no profile), and a stale AWS_PROFILE beside
    --profile raised ProfileNotFound on the boto3 path."""
    config = tmp_path / "config"
    config.write_text(f"[profile p]\nregion = eu-west-1\nca_bundle = {tmp_path / 'corp-ca.pem'}\n")
    creds = tmp_path / "credentials"
    creds.write_text("[p]\naws_access_key_id = AKIDP\naws_secret_access_key = SKP\n")
    base = {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(creds), "HOME": str(tmp_path)}
    for name, value in base.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    cfg = resolve_config(profile="p", env=base)
    assert cfg.ca_bundle == str(tmp_path / "corp-ca.pem")
    assert cfg.child_env(base)["AWS_CA_BUNDLE"] == str(tmp_path / "corp-ca.pem")
    assert resolve_config(profile="p", env=base | {"AWS_CA_BUNDLE": "/x.pem"}).ca_bundle is None  # the variable wins
    probe = (
        "import json\n"
        "from runctl.config import resolve_config\n"
        "c = resolve_config(profile='p', endpoint_url='https://127.0.0.1:9').boto_client()\n"
        "print(json.dumps([c._request_signer._credentials.access_key, c._endpoint.http_session._verify]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | base | {"AWS_PROFILE": "stale"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == json.dumps(["AKIDP", str(tmp_path / "corp-ca.pem")])


def test_aws_default_profile_names_the_profile_as_botocore_reads_it(tmp_path: Path) -> None:
    """Credentials came from AWS_DEFAULT_PROFILE's profile (botocore reads it) but its endpoint
    and region from [default]: its key id went to amazonaws.com (config pass)."""
    config = tmp_path / "config"
    config.write_text("[default]\nregion = us-west-2\n[profile p]\nendpoint_url = http://p.example:1\nregion = eu-central-1\n")
    cfg = resolve_config(env={"AWS_CONFIG_FILE": str(config), "AWS_DEFAULT_PROFILE": "p"})
    assert (cfg.endpoint_url, cfg.region) == ("http://p.example:1", "eu-central-1")
    both = {"AWS_CONFIG_FILE": str(config), "AWS_DEFAULT_PROFILE": "p", "AWS_PROFILE": "default"}
    assert resolve_config(env=both).region == "eu-central-1"  # botocore's order


def test_credentials_given_outright_need_no_profile_on_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3Config(static_credentials=..., profile="trainer") where no such profile exists: the
    boto3 path raised ProfileNotFound on every request once the session took the profile."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = S3Config(
        endpoint_url="http://127.0.0.1:9", profile="trainer", static_credentials=Credentials("AKID", "SK")
    ).boto_client()
    assert client._request_signer._credentials.access_key == "AKID"


def test_a_credential_process_that_fails_silently_is_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # botocore's message ends in a bare colon when the process prints nothing on stderr:
    # "cannot load AWS credentials: Error when retrieving credentials from custom-process:"
    # (config pass).
    config = tmp_path / "config"
    config.write_text("[profile cp]\ncredential_process = /bin/false\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as info:
        resolve_config(profile="cp").credentials  # noqa: B018 - resolved on access
    assert str(info.value).endswith("(it printed nothing on stderr)"), str(info.value)
    assert not str(info.value).rstrip().endswith(":")
