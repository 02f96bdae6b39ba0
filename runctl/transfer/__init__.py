"""Transfer layer: one interface (``Transfer``), two backends (s5cmd default, boto3 fallback)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runctl.config import S3Config
    from runctl.transfer.base import Transfer


def get_transfer(
    config: S3Config,
    *,
    use_s5cmd: bool = True,
    s5cmd_path: str | None = None,
    stall_timeout: float | None = None,
) -> Transfer:
    """The backend for ``config``: s5cmd by default, boto3 when ``use_s5cmd=False``.

    ``s5cmd_path`` (or the ``RUNCTL_S5CMD`` variable) overrides where the binary is found;
    ``stall_timeout`` arms s5cmd's watchdog (seconds with no bytes moving before the child is killed).

    Example:
        >>> from runctl.config import resolve_config
        >>> get_transfer(resolve_config(), use_s5cmd=False).name
        'boto3'
    """
    if use_s5cmd:
        from runctl.transfer.s5cmd import S5cmdTransfer

        return S5cmdTransfer(config, binary=s5cmd_path, stall_timeout=stall_timeout)
    from runctl.transfer.boto import BotoTransfer

    return BotoTransfer(config)
