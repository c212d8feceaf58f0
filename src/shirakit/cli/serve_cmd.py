"""``shirakit serve``: registered here, built in :mod:`shirakit.serve` (its flags are added only
when the command runs or shows its help, since that module imports torch)."""

from __future__ import annotations


def _populate(parser) -> None:
    from ..serve.server import add_arguments
    from ..serve.server import main as serve_main

    add_arguments(parser)
    parser.set_defaults(func=serve_main)


def register(sub) -> None:
    sub.add_parser("serve", help="OpenAI-compatible server: one base model, many adapters (shirakit[serve])",
                   populate=_populate)
