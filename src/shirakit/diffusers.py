"""Adapters on diffusers pipelines (``import shirakit.diffusers as sd``): the public path to
:mod:`shirakit.integrations.diffusers` (loading, saving, switching, fusing per component, diffusers / kohya LoRA
files) and :func:`train` (a style or subject adapter from a folder of images, :mod:`shirakit.app.diffusion`)."""

from .app.diffusion import train  # noqa: F401
from .integrations.diffusers import *  # noqa: F401,F403
from .integrations.diffusers import __all__ as _integration_names

__all__ = [*_integration_names, "train"]
