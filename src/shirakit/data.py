"""The packaged real models and data (``from shirakit.data import smollm2_dir``): the public path to
:mod:`shirakit.app.data`, where they live."""

from .app.data import *  # noqa: F401,F403
