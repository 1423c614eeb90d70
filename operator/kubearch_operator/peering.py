"""kopf peering settings, chosen at start-up (kept out of ``handlers.py`` so they are unit-tested).

Why this is its own function: the start-up handler used to set ``settings.peering.name`` from
``KUBEARCH_PEERING`` (default "kubearch") unconditionally, *after* kopf had applied the command
line's ``--peering=NAME``. The Helm chart passes its ``operator.peeringName`` that way, so any other
name was reset to "kubearch" and the operator waited for a peering object that did not exist.
"""

from __future__ import annotations

from collections.abc import Mapping

import kopf

#: The peering object's name when neither ``--peering`` nor ``KUBEARCH_PEERING`` names one.
DEFAULT_PEERING = "kubearch"


def configure_peering(settings: kopf.OperatorSettings, environ: Mapping[str, str]) -> None:
    """``--peering=NAME`` (kopf marks it ``mandatory``) wins; else ``KUBEARCH_PEERING``; else
    "kubearch". ``KUBEARCH_PEERING_LIFETIME`` bounds how long a crashed replica's record blocks
    its replacement (kopf pauses while a same-priority peer looks alive).

    The peering object is a ClusterKopfPeering with ``--all-namespaces`` and a KopfPeering in every
    watched namespace with ``--namespace`` (kopf's namespaced mode); the chart creates either.
    """
    if not settings.peering.mandatory:  # no --peering on the command line
        settings.peering.name = environ.get("KUBEARCH_PEERING", DEFAULT_PEERING)
    settings.peering.lifetime = int(environ.get("KUBEARCH_PEERING_LIFETIME", "60"))
