"""``python -m kubearch_operator [kopf run options]``: the operator with production defaults.

Equivalent to ``kopf run -m kubearch_operator.handlers`` plus ``--all-namespaces`` (unless a
``--namespace``/``-n`` is given) and a liveness endpoint on :8080/healthz (unless ``--liveness``
is given). Every other option goes to kopf unchanged (``--standalone``, ``--peering`` ...).
"""

from __future__ import annotations

import sys

from kopf.cli import main as kopf_main


def build_args(argv: list[str]) -> list[str]:
    args = ["run", "-m", "kubearch_operator.handlers", *argv]
    if not any(a in ("-A", "--all-namespaces") or a.startswith(("-n", "--namespace")) for a in argv):
        args.append("--all-namespaces")
    if not any(a.startswith("--liveness") for a in argv):
        args.append("--liveness=http://0.0.0.0:8080/healthz")
    return args


def main() -> None:
    kopf_main(args=build_args(sys.argv[1:]), prog_name="kubearch-operator")


if __name__ == "__main__":
    main()
