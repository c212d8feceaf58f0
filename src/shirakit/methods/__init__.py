"""One file per method; importing this package registers them all."""

from . import lora, miss, shira, vera  # noqa: F401
