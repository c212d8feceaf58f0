"""Fused SHiRA inside vLLM's workers: a ``worker_extension_cls`` whose methods the engine calls on
every worker with ``collective_rpc`` (the path RL frameworks use to update weights in place).

SHiRA (Bhardwaj et al., arXiv 2406.13175, §3.2) changes K = r(m+n) entries of a weight, so an
adapter is switched in by one scatter of ``W0[p] + s v`` and out by one scatter of the saved
``W0[p]``: two scatters per weight, no matmul, the base back bit for bit.

vLLM does not keep Hugging Face's modules: ``q_proj``, ``k_proj``, ``v_proj`` live as row blocks of
one ``qkv_proj`` weight, ``gate_proj`` and ``up_proj`` of one ``gate_up_proj`` (the model's
``packed_modules_mapping``), and under tensor parallelism each rank holds a block of rows (column-
parallel layers) or of columns (row-parallel layers), with key/value heads replicated when there are
fewer heads than ranks. Rather than re-deriving those rules, each rank asks vLLM's own weight loader
where an entry lands: it loads two probe matrices (each entry's row index, then its column index,
in float64: exact up to 2^53) into a scratch parameter of the layer's local shape, with the same
shard id the checkpoint loader uses. The probe gives, for that Hugging Face module, a map from its
rows and its columns to this rank's local rows and columns (-1: not on this rank); it is checked to
be a product map (every local entry of the module comes from exactly one (row, col)). An adapter's
positions then become local flat positions with two gathers.

On CPU, vLLM repacks each linear weight for oneDNN after loading and frees the plain weight
(``vllm/model_executor/layers/utils.py``, ``dispatch_cpu_unquantized_gemm(..., remove_weight=True)``);
the packed handle is a copy (writing the plain weight afterwards does not change its output), so there
is nothing to scatter into. A layer an adapter touches is therefore *unpacked* once: its weight is read
again from the checkpoint through the same loader and kept as a plain parameter (the scatters' target),
and after every switch the touched layers are packed again by vLLM's own dispatch
(``remove_weight=False``), so a fused adapter runs vLLM's own kernel, as the base does. Measured here
(SmolLM2-135M, fp32, 2 threads): packing a 960 x 576 ``qkv_proj`` costs 0.7-2.6 ms, so a switch of an
adapter on all 30 ``qkv_proj`` costs 20-80 ms once, while ``F.linear`` on the plain weight instead costs
~0.12 ms more per layer per decode step of 8 rows (0.27 vs 0.15 ms), every step. A traced graph would keep
calling the old packed handle, hence eager mode (``enforce_eager=True``). On GPUs vLLM keeps plain weights
and the scatters write them in place (no repacking).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import read_shira
from .rows import RowState


@dataclass
class _Write:
    """One weight's share of one adapter: local flat positions, the base values there, the merged values.
    A dense adapter (VeRA, MiSS) has ``positions=None``: ``saved`` is the whole base weight (shared by
    every dense adapter of that weight), ``merged`` the whole ``W0 + ΔW``."""

    weight: torch.nn.Parameter
    positions: torch.Tensor | None
    saved: torch.Tensor
    merged: torch.Tensor
    delta: torch.Tensor | None = None  # SHiRA's values (scale folded in, fp32), for per-row serving

    def write(self, values: torch.Tensor) -> None:
        if self.positions is None:
            self.weight.data.copy_(values)
        else:
            self.weight.data.view(-1).index_copy_(0, self.positions, values)


@dataclass
class _State:
    shapes: dict[str, tuple[int, int]]
    maps: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # hf -> (vllm, rows, cols)
    unpacked: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # vllm module -> plain weight
    packed: set[str] = field(default_factory=set)  # unpacked modules whose kernel is a packed copy (CPU)
    adapters: dict[str, dict[str, _Write]] = field(default_factory=dict)  # name -> vllm module -> write
    active: str | None = None
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)  # vllm module -> W0 (dense adapters)
    checkpoint: dict[str, Path] | None = None  # tensor name -> safetensors file
    rows: RowState = field(default_factory=RowState)  # per-row SHiRA (rows.py), CPU only


def _bytes(writes: dict[str, _Write]) -> int:
    """What an adapter keeps on this worker (a dense adapter's shared base copy not counted)."""
    own = [t for w in writes.values() for t in (w.positions, w.merged, None if w.positions is None else w.saved)
           if t is not None]
    return int(sum(t.numel() * t.element_size() for t in own))


def hf_linear_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of the Hugging Face model of ``hf_config`` -> (out, in), built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


class ShiraWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); every method is a ``collective_rpc``
    target and returns plain data (it crosses process boundaries). Names start with ``shira_`` so they
    cannot clash with the worker's own."""

    # ---- rpc targets ---------------------------------------------------------------------------
    def shira_load(self, name: str, path: str) -> dict:
        """Read a SHiRA folder and prepare its writes on this rank (nothing in the weights changes)."""
        state = self._shira_state()
        if name in state.adapters:
            raise ValueError(f"SHiRA adapter {name!r} is already loaded; unload it first")
        deltas = read_shira(path, state.shapes)
        per_weight: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for hf_name, delta in deltas.items():
            module_name, row_map, col_map = self._shira_map(hf_name)
            rows, cols = row_map[delta.rows], col_map[delta.cols]
            here = (rows >= 0) & (cols >= 0)  # the entries this rank holds
            weight = self._shira_weight(module_name)
            flat = rows[here] * weight.shape[1] + cols[here]
            per_weight.setdefault(module_name, []).append((flat, delta.values[here]))
        writes = {}
        for module_name, parts in per_weight.items():
            weight = state.unpacked[module_name]
            positions = torch.cat([p for p, _ in parts])
            values = torch.cat([v for _, v in parts])
            order = torch.argsort(positions)
            positions, values = positions[order], values[order]
            saved = self._shira_base_values(module_name, weight, positions)
            merged = (saved.float() + values.to(saved.device)).to(weight.dtype)  # as ShiraAdapter.merged_values
            writes[module_name] = _Write(weight, positions.to(weight.device), saved, merged, values)
        state.adapters[name] = writes
        self._shira_rows_relayout()
        return {"modules": len(deltas), "weights": len(writes), "rows": self.shira_rows_supported(),
                "values": int(sum(w.positions.numel() for w in writes.values())), "bytes": _bytes(writes)}

    def shira_load_dense(self, name: str, path: str) -> dict:
        """A dense adapter's per-module deltas (``dense.write_dense_deltas``' file) mapped onto this
        rank's weights; the switch writes ``W0 + ΔW`` whole (nothing in the weights changes now)."""
        from safetensors.torch import load_file

        state = self._shira_state()
        if name in state.adapters:
            raise ValueError(f"adapter {name!r} is already loaded; unload it first")
        per_weight: dict[str, torch.Tensor] = {}
        for hf_name, delta in load_file(path).items():
            if hf_name not in state.shapes or tuple(delta.shape) != state.shapes[hf_name]:
                raise ValueError(f"{path}: {hf_name} {tuple(delta.shape)} matches no linear module of the model")
            module_name, row_map, col_map = self._shira_map(hf_name)
            weight = self._shira_weight(module_name)
            rows, cols = torch.nonzero(row_map >= 0).flatten(), torch.nonzero(col_map >= 0).flatten()
            local = per_weight.setdefault(module_name, torch.zeros(weight.shape, dtype=torch.float32))
            local[row_map[rows][:, None], col_map[cols][None, :]] += delta[rows][:, cols]
        writes = {}
        for module_name, local in per_weight.items():
            weight = state.unpacked[module_name]
            base = self._shira_base_copy(module_name)
            merged = (base.float() + local.to(base.device)).to(weight.dtype)
            writes[module_name] = _Write(weight, None, base, merged)
        state.adapters[name] = writes
        self._shira_rows_relayout()
        return {"modules": len(per_weight), "weights": len(writes), "rows": self.shira_rows_supported(),
                "values": int(sum(w.merged.numel() for w in writes.values())), "bytes": _bytes(writes)}

    def shira_activate(self, name: str | None) -> str | None:
        """Make ``name`` (None: the base) the weights' content: restore the active adapter's saved
        values, scatter the new one's merged values. Two scatters per weight touched."""
        state = self._shira_state()
        if name is not None and name not in state.adapters:
            raise KeyError(f"SHiRA adapter {name!r} is not loaded on this worker")
        if name == state.active:
            return name
        touched = set()
        with torch.no_grad():
            if state.active is not None:
                for module_name, write in state.adapters[state.active].items():
                    write.write(write.saved)
                    touched.add(module_name)
            state.active = None
            if name is not None:
                for module_name, write in state.adapters[name].items():
                    write.write(write.merged)
                    touched.add(module_name)
                state.active = name
        self._shira_repack(touched)
        return state.active

    def shira_kernels_match(self) -> dict[str, bool]:
        """Each unpacked layer's kernel (vLLM's packed copy on CPU) against ``F.linear`` on its plain
        weight, on a random input (for tests: the packed copy follows every switch)."""
        state = self._shira_state()
        out = {}
        generator = torch.Generator().manual_seed(0)
        for module_name, weight in state.unpacked.items():
            module = self._shira_module(module_name)
            x = torch.randn(3, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
            bias = getattr(module, "bias", None)
            with torch.no_grad():
                got = module.quant_method.apply(module, x, bias)
                want = torch.nn.functional.linear(x, weight, bias)
            out[module_name] = bool(torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-4))
        return out

    def shira_unload(self, name: str) -> None:
        state = self._shira_state()
        if name not in state.adapters:
            raise KeyError(f"SHiRA adapter {name!r} is not loaded on this worker")
        if state.active == name:
            self.shira_activate(None)
        del state.adapters[name]
        self._shira_rows_relayout()
        in_use = {m for writes in state.adapters.values() for m, w in writes.items() if w.positions is None}
        for module_name in [m for m in state.base_copies if m not in in_use]:
            del state.base_copies[module_name]  # no dense adapter needs this W0 copy any more

    def shira_rows_supported(self) -> str | None:
        """None if this worker can serve SHiRA per row inside mixed batches (``rows.py``), else why not."""
        from .rows import supported

        return supported(self.model_runner, self.vllm_config.model_config.dtype)

    def shira_rows_calls(self) -> int:
        """Layer calls so far that added per-row SHiRA deltas (tests: the mixed path really ran)."""
        return self._shira_state().rows.calls

    def shira_active(self) -> str | None:
        return self._shira_state().active

    def shira_base_is_exact(self) -> dict[str, bool]:
        """Each unpacked weight compared bit for bit with the checkpoint read again through vLLM's
        loader (meaningful while no adapter is active)."""
        state = self._shira_state()
        out = {}
        for module_name, weight in state.unpacked.items():
            fresh = self._shira_read_base(module_name)
            out[module_name] = bool(torch.equal(fresh, weight.data.cpu()))
        return out

    def shira_digest(self) -> str:
        """sha256 of the unpacked weights' bytes (for tests: the base before and after switching)."""
        digest = hashlib.sha256()
        for module_name, weight in sorted(self._shira_state().unpacked.items()):
            digest.update(module_name.encode())
            digest.update(weight.data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ---- helpers -------------------------------------------------------------------------------
    def _shira_state(self) -> _State:
        state = getattr(self, "_shira_worker_state", None)
        if state is None:
            state = _State(shapes=hf_linear_shapes(self.vllm_config.model_config.hf_config))
            self._shira_worker_state = state
        return state

    def _shira_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def _shira_module(self, module_name: str) -> torch.nn.Module:
        """The linear layer itself: vLLM wraps each one in a *WithLoRA layer when LoRA is on (``base_layer``)."""
        module = self._shira_model().get_submodule(module_name)
        return getattr(module, "base_layer", module)

    def _shira_locate(self, hf_name: str) -> tuple[str, torch.nn.Module, object]:
        """(vLLM module name, module, loader shard id) holding Hugging Face module ``hf_name``."""
        from vllm.model_executor.layers.linear import LinearBase, QKVParallelLinear

        model = self._shira_model()
        parent, _, leaf = hf_name.rpartition(".")
        for packed, parts in (getattr(model, "packed_modules_mapping", None) or {}).items():
            if leaf in parts:
                module_name = f"{parent}.{packed}"
                module = self._shira_module(module_name)
                index = parts.index(leaf)
                shard = ("q", "k", "v")[index] if isinstance(module, QKVParallelLinear) else index
                return module_name, module, shard
        try:
            module = self._shira_module(hf_name)
        except AttributeError:
            raise ValueError(f"vLLM's {type(model).__name__} has no module for {hf_name!r}") from None
        if not isinstance(module, LinearBase):
            raise ValueError(f"{hf_name!r} is a {type(module).__name__} in vLLM, not a linear layer SHiRA can write")
        return hf_name, module, None

    @staticmethod
    def _shira_scratch(module, dtype, fill: float) -> torch.nn.Parameter:
        shape = (module.output_size_per_partition, module.input_size_per_partition)
        param = torch.nn.Parameter(torch.full(shape, fill, dtype=dtype), requires_grad=False)
        param.output_dim, param.input_dim = 0, 1  # what vLLM's loaders read (UnquantizedLinearMethod sets them)
        return param

    @staticmethod
    def _shira_call_loader(module, param, tensor, shard) -> None:
        if shard is None:
            module.weight_loader(param, tensor)
        else:
            module.weight_loader(param, tensor, shard)

    def _shira_map(self, hf_name: str) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(vLLM module, row map, col map): Hugging Face row/col -> this rank's local row/col, -1 if absent."""
        state = self._shira_state()
        if hf_name in state.maps:
            return state.maps[hf_name]
        module_name, module, shard = self._shira_locate(hf_name)
        m, n = state.shapes[hf_name]
        probes = []
        for index in (torch.arange(m, dtype=torch.float64).view(m, 1).expand(m, n),
                      torch.arange(n, dtype=torch.float64).view(1, n).expand(m, n)):
            scratch = self._shira_scratch(module, torch.float64, -1.0)
            self._shira_call_loader(module, scratch, index, shard)
            probes.append(scratch.data)
        rows_of, cols_of = probes
        hit = rows_of >= 0
        local_rows = torch.nonzero(hit.any(1)).flatten()
        local_cols = torch.nonzero(hit.any(0)).flatten()
        row_map = torch.full((m,), -1, dtype=torch.int64)
        col_map = torch.full((n,), -1, dtype=torch.int64)
        if local_rows.numel():
            block_rows = rows_of[local_rows][:, local_cols]
            block_cols = cols_of[local_rows][:, local_cols]
            hf_rows, hf_cols = block_rows[:, 0].long(), block_cols[0].long()
            product = int(hit.sum()) == local_rows.numel() * local_cols.numel() and \
                bool((block_rows == hf_rows[:, None].double()).all()) and \
                bool((block_cols == hf_cols[None, :].double()).all())
            if not product:
                raise ValueError(f"vLLM's loader for {module_name} (shard {shard!r}) does not place {hf_name} as "
                                 "a block of rows and columns; fused SHiRA cannot map its positions")
            row_map[hf_rows], col_map[hf_cols] = local_rows, local_cols
        state.maps[hf_name] = (module_name, row_map, col_map)
        return state.maps[hf_name]

    def _shira_checkpoint(self) -> dict[str, Path]:
        state = self._shira_state()
        if state.checkpoint is None:
            from safetensors import safe_open

            folder = Path(self.vllm_config.model_config.model)
            if not folder.is_dir():
                raise ValueError(f"fused SHiRA on CPU re-reads base weights from a local model folder; "
                                 f"{folder} is not one")
            index = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    index.update({key: file for key in handle.keys()})
            state.checkpoint = index
        return state.checkpoint

    def _shira_read_base(self, module_name: str) -> torch.Tensor:
        """The module's local weight read again from the checkpoint through vLLM's own loader."""
        from safetensors import safe_open

        model = self._shira_model()
        module = self._shira_module(module_name)
        parent, _, leaf = module_name.rpartition(".")
        parts = (getattr(model, "packed_modules_mapping", None) or {}).get(leaf)
        pieces = [f"{parent}.{p}" for p in parts] if parts else [module_name]
        dtype = self.vllm_config.model_config.dtype
        param = self._shira_scratch(module, dtype, 0.0)
        index = self._shira_checkpoint()
        for hf_name in pieces:
            key = f"{hf_name}.weight"
            if key not in index:
                raise ValueError(f"the model folder has no tensor {key!r} to unpack {module_name}")
            with safe_open(str(index[key]), framework="pt") as handle:
                tensor = handle.get_tensor(key)
            shard = None if not parts else self._shira_locate(hf_name)[2]
            self._shira_call_loader(module, param, tensor, shard)
        return param.data

    def _shira_weight(self, module_name: str) -> torch.nn.Parameter:
        """The plain weight of ``module_name`` the scatters write (unpacking it on CPU, once)."""
        state = self._shira_state()
        if module_name in state.unpacked:
            return state.unpacked[module_name]
        module = self._shira_module(module_name)
        weight = module.weight
        if weight.dim() != 2 or weight.shape != (module.output_size_per_partition, module.input_size_per_partition):
            if not hasattr(module, "cpu_linear"):
                raise ValueError(f"{module_name}: a {tuple(weight.shape)} weight ({type(module.quant_method).__name__})"
                                 " is not a plain matrix fused SHiRA can scatter into")
            base = self._shira_read_base(module_name)
            module.weight = torch.nn.Parameter(base, requires_grad=False)
            state.packed.add(module_name)  # its kernel is packed again from this plain weight after switches
            weight = module.weight
        state.unpacked[module_name] = weight
        return weight

    def _shira_repack(self, module_names) -> None:
        """vLLM's own CPU dispatch again for the unpacked layers among ``module_names`` (their packed
        kernels are copies of the weight: without this they would keep the old content). The plain weight
        stays (``remove_weight=False``): the next switch scatters into it."""
        state = self._shira_state()
        names = [m for m in module_names if m in state.packed]
        if not names:
            return
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        for module_name in names:
            module = self._shira_module(module_name)
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            if module_name in state.rows.layers:  # the dispatch bound a new kernel: wrap it again
                from .rows import wrap

                wrap(state.rows, module, module_name, self.model_runner)

    def _shira_rows_relayout(self) -> None:
        """Lay out every loaded adapter per module for per-row serving (SHiRA: its sparse values; VeRA,
        MiSS: their merged weights) and wrap the touched layers' CPU kernels (nothing to do where per-row
        serving cannot run: those workers serve adapters fused only)."""
        from . import rows

        if self.shira_rows_supported() is not None:
            return
        state = self._shira_state()
        per_module: dict[str, list] = {}
        dense: dict[str, list] = {}
        for name, writes in state.adapters.items():
            for module_name, write in writes.items():
                if write.delta is not None:
                    per_module.setdefault(module_name, []).append((name, write.positions, write.delta))
                elif write.positions is None:
                    dense.setdefault(module_name, []).append((name, write.merged))
        shapes = {m: tuple(state.unpacked[m].shape) for m in {*per_module, *dense}}
        rows.relayout(state.rows, per_module, shapes, self.vllm_config.model_config.dtype, dense)
        for module_name in shapes:
            rows.wrap(state.rows, self._shira_module(module_name), module_name, self.model_runner)

    def _shira_base_copy(self, module_name: str) -> torch.Tensor:
        """The whole base weight W0 of ``module_name`` (kept once, shared by the dense adapters)."""
        state = self._shira_state()
        if module_name not in state.base_copies:
            weight = state.unpacked[module_name]
            base = weight.data.clone()
            active = state.adapters[state.active].get(module_name) if state.active is not None else None
            if active is not None:  # the weight holds the active adapter: take its saved base values
                if active.positions is None:
                    base = active.saved
                else:
                    base.view(-1).index_copy_(0, active.positions, active.saved)
            state.base_copies[module_name] = base
        return state.base_copies[module_name]

    def _shira_base_values(self, module_name: str, weight, positions: torch.Tensor) -> torch.Tensor:
        """W0 at ``positions``: read from the weight, except where the active adapter has written
        (its saved values are the base there), so loading never needs a switch."""
        saved = weight.data.view(-1).index_select(0, positions.to(weight.device)).clone()
        state = self._shira_state()
        if module_name in state.base_copies:
            return state.base_copies[module_name].view(-1).index_select(0, positions.to(weight.device)).clone()
        if state.active is not None and module_name in state.adapters[state.active]:
            active = state.adapters[state.active][module_name]
            at = torch.searchsorted(active.positions, positions.to(active.positions.device))
            at = at.clamp(max=active.positions.numel() - 1)
            same = active.positions[at] == positions.to(active.positions.device)
            saved[same] = active.saved[at[same]]
        return saved

