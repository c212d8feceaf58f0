"""shirakit adapters trained by TRL's trainers (``SFTTrainer``, ``DPOTrainer``; TRL 1.16).

    import shirakit
    from shirakit.integrations.trl import base_reference, check_model

    shirakit.inject(model, shirakit.ShiraConfig(r=32, target_modules="all-linear"))  # before the trainer
    SFTTrainer(model=check_model(model), args=SFTConfig(...), train_dataset=..., processing_class=tok).train()
    DPOTrainer(model=model, ref_model=base_reference(model), args=DPOConfig(...), ...).train()
    shirakit.save_adapter(model, "out/dpo")

TRL trains whatever parameters require gradients, so an injected model (base frozen, adapter trainable)
needs nothing for SFT. DPO needs a reference policy pi_ref in its loss

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

(Rafailov et al. 2023, "Direct Preference Optimization"). For a ``peft.PeftModel`` TRL takes pi_ref to be the
policy with its adapters disabled, but it recognises that case by ``isinstance(model, peft.PeftModel)``; for any
other model with ``ref_model=None`` it loads a second copy of the model from ``config._name_or_path``.
:func:`base_reference` is the same idea without peft: a module that owns no parameters and, when called, runs the
policy under :func:`shirakit.disable_adapters` and ``torch.no_grad()``. Pass it as ``ref_model``; TRL patches,
places and calls it like a model, and no weight is copied.

Both trainers compute log-probabilities from ``lm_head.weight`` directly (TRL's fused LM head), so an adapter on
the output head would be skipped: :func:`check_model` refuses that.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.layer import AdapterLinear
from ..core.state import adapter_layers
from ..model.control import disable_adapters


def check_model(model: nn.Module) -> nn.Module:
    """``model`` back if TRL's trainers can train its adapters, else a ValueError saying why.

    It must hold shirakit adapters, and none on the output head (TRL scores tokens with ``lm_head.weight``
    directly, so an adapter there would be neither used nor trained)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected the injected model (a torch.nn.Module); found {type(model).__name__}")
    if not adapter_layers(model):
        raise ValueError(
            "the model holds no shirakit adapters: inject one (shirakit.inject(model, config)) before handing the "
            "model to a TRL trainer")
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, AdapterLinear):
        name = next((n for n, m in model.named_modules() if m is head), "the output head")
        raise ValueError(
            f"{name!r} (the output head) holds an adapter, but TRL computes log-probabilities from its base weight "
            f"directly, so that adapter would not be trained; leave the output head out of target_modules")
    return model


class BaseReference(nn.Module):
    """The policy with its adapters disabled, as a module that owns nothing (see the module docstring).

    The policy is held outside ``nn.Module``'s registry, so this module has no parameters or buffers of its own:
    ``.to()``, ``.parameters()``, an accelerator's ``prepare`` and TRL's dropout switch see an empty module. A call
    runs ``self.forward`` (the policy's forward, or whatever TRL patches in its place, which reads
    :attr:`base_model` and :meth:`get_output_embeddings`) with the adapters disabled and without gradients."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_policy", policy)

    @property
    def policy(self) -> nn.Module:
        return self._policy

    @property
    def config(self):
        return self._policy.config

    @property
    def generation_config(self):
        return getattr(self._policy, "generation_config", None)

    @property
    def base_model(self) -> nn.Module:
        return self._policy.base_model

    def get_output_embeddings(self) -> nn.Module:
        return self._policy.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self._policy.get_input_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._policy(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), disable_adapters(self._policy):
            return super().__call__(*args, **kwargs)


def base_reference(model: nn.Module) -> BaseReference:
    """The reference model for ``DPOTrainer(ref_model=...)``: ``model`` with its adapters disabled, sharing
    every weight with it (no copy). ``model`` must already hold its adapters (:func:`check_model`)."""
    return BaseReference(check_model(model))
