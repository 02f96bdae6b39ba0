"""runctl: get training checkpoints safely and quickly into S3.

The public API is loaded lazily so that ``import runctl`` (and ``runctl --help``) stay fast
and never import boto3 or a training framework.

Example:
    >>> from runctl import S3URL
    >>> S3URL.parse("s3://bucket/run-7/").is_prefix
    True
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from runctl._version import __version__

# In a clone, `integrations/` sits beside this directory (the wheel puts it inside). Run from
# the clone's root after `pip install .`, Python imports this directory, not the installed
# package, and `runctl demo` or a train.py there found no runctl.integrations (packaging
# pass). A finder placed last (after an editable install's own) takes it from beside.
_here = os.path.dirname(os.path.abspath(__file__))
_beside = os.path.join(os.path.dirname(_here), "integrations")


class _IntegrationsBeside:
    """Finds ``runctl.integrations`` in the clone's ``integrations/``, when nothing else does."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> Any:
        if name != "runctl.integrations":
            return None
        from importlib.util import spec_from_file_location

        return spec_from_file_location(
            name, os.path.join(_beside, "__init__.py"), submodule_search_locations=[_beside]
        )


if not os.path.isdir(os.path.join(_here, "integrations")) and os.path.isfile(
    os.path.join(_beside, "__init__.py")
):
    import sys

    sys.meta_path.append(_IntegrationsBeside)

_LAZY = {
    "S3URL": "runctl.s3url",
    "S3Config": "runctl.config",
    "resolve_config": "runctl.config",
    "get_transfer": "runctl.transfer",
    "CheckpointUploader": "runctl.uploader",
    "latest_checkpoint": "runctl.uploader",
    "RetryPolicy": "runctl.retry",
    "RunctlError": "runctl.exceptions",
    "UploadError": "runctl.exceptions",
    "S3URLError": "runctl.exceptions",
    "TransferError": "runctl.exceptions",
}

__all__ = [
    "CheckpointUploader",
    "RetryPolicy",
    "RunctlError",
    "S3Config",
    "S3URL",
    "S3URLError",
    "TransferError",
    "UploadError",
    "__version__",
    "get_transfer",
    "latest_checkpoint",
    "resolve_config",
]

if TYPE_CHECKING:
    from runctl.config import S3Config, resolve_config
    from runctl.exceptions import RunctlError, S3URLError, TransferError, UploadError
    from runctl.retry import RetryPolicy
    from runctl.s3url import S3URL
    from runctl.transfer import get_transfer
    from runctl.uploader import CheckpointUploader, latest_checkpoint


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'runctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
