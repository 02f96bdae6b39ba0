"""``runctl s3 lifecycle show|set|clear``: lifecycle rules scoped to a prefix (thin layer over runctl.lifecycle)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer

from runctl.cli.options import (
    DryRunOpt,
    EndpointOpt,
    JsonOpt,
    ProfileOpt,
    QuietOpt,
    RegionOpt,
    Session,
    parse_s3url,
    session,
)
from runctl.cli.output import Output
from runctl.exceptions import UsageError
from runctl.s3url import S3URL

lifecycle_app = typer.Typer(
    name="lifecycle",
    help=(
        "Lifecycle rules for a prefix: expire, transition, abort abandoned multipart uploads.\n\n"
        "\b\nExamples:\n"
        "  runctl s3 lifecycle show s3://bucket/run-7/\n"
        "  runctl s3 lifecycle set s3://bucket/run-7/ --abort-incomplete-multipart-days 2"
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

S3UrlArg = Annotated[
    str,
    typer.Argument(
        metavar="S3URL",
        help="The prefix the rule is for, e.g. s3://bucket/run-7/.",
        show_default=False,
    ),
]


def _session(
    ctx: typer.Context,
    endpoint_url: str | None,
    profile: str | None,
    region: str | None,
    json_output: bool,
    quiet: bool,
) -> Session:
    return session(
        ctx,
        endpoint_url=endpoint_url,
        profile=profile,
        region=region,
        json_output=json_output,
        quiet=quiet,
    )


def _rules_table(
    out: Output, rules: Sequence[Mapping[str, Any]], prefix: S3URL, *, title: str
) -> None:
    from runctl.lifecycle import applies_to, describe_rule, rule_id, rule_prefix

    if not rules:
        out.line(f"{title}: no lifecycle rules")
        return
    ours = rule_id(prefix)
    rows = [
        (
            str(rule.get("ID") or "-") + (" *" if rule.get("ID") == ours else ""),
            rule.get("Status", "-"),
            rule_prefix(rule) or "(whole bucket)",
            "yes" if applies_to(rule, prefix) else "no",
            describe_rule(rule),
        )
        for rule in rules
    ]
    out.table(
        ("id", "status", "prefix", f"reaches {prefix.key or '/'}", "actions"),
        rows,
        title=title,
        styles=["bold" if rule.get("ID") == ours else None for rule in rules],
    )
    if any(rule.get("ID") == ours for rule in rules):
        out.info(f"* runctl's rule for {prefix}")


def _url(text: str) -> S3URL:
    return parse_s3url(text).as_prefix()


@lifecycle_app.command("show")
def show_rules(
    ctx: typer.Context,
    s3url: S3UrlArg,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show the bucket's lifecycle rules and which of them reach the prefix.

    \b
    Examples:
      runctl s3 lifecycle show s3://bucket/run-7/
      runctl s3 lifecycle show s3://bucket/run-7/ --json
    """
    from runctl.lifecycle import applies_to, get_rules, rule_id

    s = _session(ctx, endpoint_url, profile, region, json_output, quiet)
    prefix = _url(s3url)
    rules = get_rules(s.config().boto_client(), prefix.bucket)
    s.out.record(
        "lifecycle",
        bucket=prefix.bucket,
        prefix=prefix.key,
        rule_id=rule_id(prefix),
        rules=rules,
        reaching_prefix=[r.get("ID") for r in rules if applies_to(r, prefix)],
    )
    _rules_table(s.out, rules, prefix, title=f"Lifecycle rules of s3://{prefix.bucket}/")


@lifecycle_app.command("set")
def set_rules(
    ctx: typer.Context,
    s3url: S3UrlArg,
    expire_days: Annotated[
        int | None,
        typer.Option(
            "--expire-days",
            metavar="N",
            help="Delete objects under the prefix N days after they were written.",
            show_default=False,
        ),
    ] = None,
    abort_days: Annotated[
        int | None,
        typer.Option(
            "--abort-incomplete-multipart-days",
            metavar="N",
            help="Abort multipart uploads still unfinished N days after they started (their parts are billed).",
            show_default=False,
        ),
    ] = None,
    transition_days: Annotated[
        int | None,
        typer.Option(
            "--transition-days",
            metavar="N",
            help="Move objects to --storage-class N days after they were written.",
            show_default=False,
        ),
    ] = None,
    storage_class: Annotated[
        str | None,
        typer.Option(
            "--storage-class",
            metavar="CLASS",
            help="Target of --transition-days: STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING, GLACIER_IR, GLACIER, DEEP_ARCHIVE.",
            show_default=False,
        ),
    ] = None,
    yes_bucket_root: Annotated[
        bool,
        typer.Option(
            "--yes-bucket-root",
            help="Confirm --expire-days on a bucket root, which expires every object in the bucket.",
        ),
    ] = False,
    dry_run: DryRunOpt = False,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Set runctl's lifecycle rule for a prefix, keeping the bucket's other rules.

    The rule (ID runctl-<prefix>) is scoped to the prefix; rules for other prefixes stay as they are,
    and running set again replaces only this rule. --dry-run prints the resulting configuration.
    --expire-days on a bucket root (s3://bucket/) needs --yes-bucket-root, as cleanup does there.

    \b
    Examples:
      runctl s3 lifecycle set s3://bucket/run-7/ --abort-incomplete-multipart-days 2
      runctl s3 lifecycle set s3://bucket/run-7/ --expire-days 90 --transition-days 30 --storage-class GLACIER_IR
      runctl s3 lifecycle set s3://bucket/run-7/ --expire-days 30 --dry-run
    """
    from runctl.lifecycle import LifecycleSpec, set_rule

    s = _session(ctx, endpoint_url, profile, region, json_output, quiet)
    prefix = _url(s3url)
    spec = LifecycleSpec(
        expire_days, abort_days, transition_days, storage_class
    )  # UsageError before any request
    if prefix.is_bucket and expire_days is not None and not dry_run and not yes_bucket_root:
        raise UsageError(
            f"S3URL {prefix} is a bucket root: --expire-days would expire every object in the bucket; "
            "add --yes-bucket-root to confirm, or give a prefix"
        )
    change = set_rule(s.config().boto_client(), prefix, spec, dry_run=dry_run)
    _report(
        s.out, change, prefix, dry_run, f"rule {change.rule_id} for {prefix}: {spec.describe()}"
    )


@lifecycle_app.command("clear")
def clear_rules(
    ctx: typer.Context,
    s3url: S3UrlArg,
    dry_run: DryRunOpt = False,
    endpoint_url: EndpointOpt = None,
    profile: ProfileOpt = None,
    region: RegionOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove runctl's lifecycle rule for a prefix (other rules stay).

    \b
    Examples:
      runctl s3 lifecycle clear s3://bucket/run-7/
      runctl s3 lifecycle clear s3://bucket/run-7/ --dry-run
    """
    from runctl.lifecycle import clear_rule

    s = _session(ctx, endpoint_url, profile, region, json_output, quiet)
    prefix = _url(s3url)
    change = clear_rule(s.config().boto_client(), prefix, dry_run=dry_run)
    what = (
        f"rule {change.rule_id} removed"
        if change.changed
        else f"no rule {change.rule_id} to remove"
    )
    _report(s.out, change, prefix, dry_run, what)


def _report(out: Output, change: Any, prefix: S3URL, dry_run: bool, what: str) -> None:
    out.record("lifecycle_change", **change.to_json(), dry_run=dry_run)
    if not out.human:
        return
    if dry_run:
        out.line(f"dry run, nothing written: {what}")
        out.line("resulting configuration:")
        out.line(json.dumps({"Rules": list(change.after)}, indent=2, default=str))
    elif not change.changed:
        out.info(f"unchanged: {what}")
    else:
        out.info(f"done: {what}")
    if not out.quiet:
        title = f"Lifecycle rules of s3://{prefix.bucket}/"
        _rules_table(out, change.after, prefix, title=f"{title} once written (dry run)" if dry_run else title)


def register(s3_app: typer.Typer) -> None:
    """Add ``runctl s3 lifecycle show|set|clear`` to the ``runctl s3`` Typer app.

    Example:
        >>> app = typer.Typer()
        >>> register(app)
    """
    s3_app.add_typer(lifecycle_app, name="lifecycle")
