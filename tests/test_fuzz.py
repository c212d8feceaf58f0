"""A seeded mutation fuzzer over saved adapters: every method, every layout, every way a file breaks.

The corpus is one saved adapter per case of the contract battery (tests/cases.py) on a tiny Llama,
the compact SHiRA layout, and a BERT classifier whose head rides along in modules_to_save. Each fuzz
case copies one of them and applies one to three mutations: bit flips, truncation, safetensors
header edits (dtype, shape, offsets, keys, metadata), tensor edits (dtype, shape, values, SHiRA
index corruption, keys), JSON type confusion in adapter_config.json, and file-system tricks
(symlinks, FIFOs, folders, empty files, pickles). Then ``load_adapter`` must either

- raise ValueError, TypeError or FileNotFoundError, from shirakit's own code (not an exception
  escaping torch or the standard library), naming the file it refused, with the model unchanged; or
- load correctly: finite adapter values equal to the file's, and ``unload`` restoring the base
  bit-exactly.

No case may hang (each has an alarm). CI runs 1,000 cases; ``-m slow`` runs 5,000 more seeds.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import struct
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

import shirakit
from shirakit.io.checkpoint import adapter_state_dict
from shirakit.io.folder import CONFIG_NAME, WEIGHTS_NAME
from tests.cases import CASES
from tests.models import tiny_bert, tiny_llama

SHIRAKIT_SRC = str(Path(shirakit.__file__).parent)
CLEAR_ERRORS = (ValueError, TypeError, FileNotFoundError)
CASE_SECONDS = 20  # a hang guard: real loads here take milliseconds


# ---- the corpus -----------------------------------------------------------------------------
@dataclass
class Base:
    model: torch.nn.Module
    snapshot: dict[str, torch.Tensor]
    probe: torch.Tensor = field(default_factory=lambda: torch.randint(1, 97, (1, 6), generator=torch.Generator()))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_corpus(root: Path) -> tuple[dict[str, Base], list[tuple[str, Path]]]:
    bases = {"llama": Base(tiny_llama(), {}), "bert": Base(tiny_bert(), {})}
    for base in bases.values():
        base.snapshot = _snapshot(base.model)
    entries = []
    targets = ["q_proj", "v_proj", "down_proj"]
    for case in CASES:
        model = tiny_llama()
        shirakit.inject(model, case.make(targets, False))
        directory = root / case.id
        shirakit.save_adapter(model, directory)
        entries.append(("llama", directory))
        if case.id.startswith("shira"):
            shirakit.save_adapter(model, root / f"{case.id}-compact", compact=True)
            entries.append(("llama", root / f"{case.id}-compact"))
    model = tiny_bert()
    shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS",
                                               init_lora_weights=False))
    shirakit.save_adapter(model, root / "bert-seqcls")
    entries.append(("bert", root / "bert-seqcls"))
    return bases, entries


# ---- mutations ----------------------------------------------------------------------------------
def _split(raw: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def bit_flips(rng, d: Path) -> None:
    raw = bytearray((d / WEIGHTS_NAME).read_bytes())
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(raw)) if rng.random() < 0.5 else rng.randrange(min(len(raw), 400))
        raw[i] ^= 1 << rng.randrange(8)
    (d / WEIGHTS_NAME).write_bytes(bytes(raw))


def truncate(rng, d: Path) -> None:
    path = d / rng.choice([WEIGHTS_NAME, WEIGHTS_NAME, CONFIG_NAME])
    raw = path.read_bytes()
    path.write_bytes(raw[: rng.randrange(len(raw))])


DTYPE_NAMES = ["F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "I8", "U8", "I16", "U16", "I32", "U32",
               "I64", "U64", "BOOL", "C64", "F4", "XYZ", 7]


def header_edit(rng, d: Path) -> None:
    header, data = _split((d / WEIGHTS_NAME).read_bytes())
    names = _tensor_names(header)
    name = rng.choice(names)
    entry = header[name]
    choice = rng.randrange(9)
    if choice == 0:
        entry["dtype"] = rng.choice(DTYPE_NAMES)
    elif choice == 1:
        entry["shape"] = rng.choice([[], [0], [-1], [2**40], list(reversed(entry["shape"])), entry["shape"] + [1],
                                     [entry["shape"][0] * 2] if entry["shape"] else [3], "x"])
    elif choice == 2:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start, end + 8], [start + 4, end + 4], [0, len(data) + 64],
                                            [start, start], [-8, end], [start]])
    elif choice == 3:
        del header[name]
    elif choice == 4:
        header[name.replace(".", "_", 1)] = header.pop(name)  # a key no layer has
    elif choice == 5:
        header["__metadata__"] = rng.choice([{"shirakit_format": "compact-v9"}, {"format": 3}, [], None,
                                             {"shirakit_config_sha256": "0" * 64}, {"shirakit_format": "compact-v1"}])
    elif choice == 6:
        other = rng.choice(names)
        entry["data_offsets"] = list(header[other]["data_offsets"])  # two tensors over the same bytes
    elif choice == 7:
        header[name] = rng.choice([[], "tensor", {"dtype": "F32"}, None])
    else:
        header["base_model.model.extra.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    (d / WEIGHTS_NAME).write_bytes(_join(header, data))


def _edit_tensors(d: Path, fn) -> None:
    raw = (d / WEIGHTS_NAME).read_bytes()
    header, _ = _split(raw)
    tensors = dict(load_bytes(raw))
    fn(tensors)
    metadata = header.get("__metadata__")
    (d / WEIGHTS_NAME).write_bytes(save_bytes(tensors, metadata=metadata))


def tensor_edit(rng, d: Path) -> None:
    def edit(tensors):
        name = rng.choice(sorted(tensors))
        t = tensors[name]
        choice = rng.randrange(8)
        if choice == 0:
            tensors[name] = t.to(rng.choice([torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                             torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]))
        elif choice == 1:
            tensors[name] = t.reshape(-1).contiguous() if t.dim() > 1 else t.reshape(1, -1).contiguous()
        elif choice == 2:
            tensors[name] = t[: max(0, t.shape[0] - rng.randint(1, 3))].contiguous() if t.dim() else t
        elif choice == 3 and t.is_floating_point() and t.numel():
            value = t.double()
            value.view(-1)[rng.randrange(value.numel())] = rng.choice([math.nan, math.inf, -math.inf, 1e300, 1e-320])
            tensors[name] = value if rng.random() < 0.5 else value.to(t.dtype)
        elif choice == 4 and not t.is_floating_point() and t.numel():
            corrupt = t.clone()
            flat = corrupt.view(-1)
            i = rng.randrange(flat.numel())
            flat[i] = rng.choice([-1, 2**31 - 1, 10_000, int(flat[(i + 1) % flat.numel()]), 0])
            tensors[name] = corrupt
        elif choice == 5:
            del tensors[name]
        elif choice == 6:
            tensors[name + "_extra"] = t.clone()
        else:
            tensors[name] = torch.zeros(rng.choice([(0,), (1,), (3, 5), (2, 2, 2)]), dtype=t.dtype)
    _edit_tensors(d, edit)


def _confused(rng):
    return rng.choice([
        ["x"], {"a": 1}, 7, -3, 0, True, False, "false", "true", "", None, 3.5, 1e308, 2**70, "NaN", [[[[]]]],
        "(.*.*)*z", "[", list(range(3)), {"__class__": "x"},
    ])


RAW_JSON_TRICKS = ["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "[" * 5000 + "]" * 5000, '"\\ud800"']


def json_confusion(rng, d: Path) -> None:
    path = d / CONFIG_NAME
    config = json.loads(path.read_text())
    key = rng.choice(sorted(config) + ["peft_type", "target_modules", "r", "new_field"])
    if rng.random() < 0.25:  # text JSON cannot build from Python values
        text = json.dumps({**config, key: "@@"}).replace('"@@"', rng.choice(RAW_JSON_TRICKS))
        path.write_text(text)
        return
    if rng.random() < 0.15:
        config.pop(key, None)
    else:
        config[key] = _confused(rng)
    path.write_text(json.dumps(config))


def filesystem(rng, d: Path) -> None:
    name = rng.choice([WEIGHTS_NAME, CONFIG_NAME])
    path = d / name
    other = d / (CONFIG_NAME if name == WEIGHTS_NAME else WEIGHTS_NAME)
    path.unlink()
    choice = rng.randrange(9)
    if choice == 0:
        os.mkfifo(path)
    elif choice == 1:
        os.symlink(other, path)
    elif choice == 2:
        os.symlink(d / "nowhere", path)
    elif choice == 3:
        os.symlink(path, path)  # a loop
    elif choice == 4:
        os.symlink("/dev/zero", path)
    elif choice == 5:
        path.mkdir()
    elif choice == 6:
        path.write_bytes(b"")
    elif choice == 7:  # a pickle where safetensors belongs (or a pickled .bin beside no safetensors)
        torch.save({"x": torch.zeros(2)}, path if name == WEIGHTS_NAME else d / "adapter_model.bin")
        if name == CONFIG_NAME:
            path.write_text("{}")
    else:
        shutil.copyfile(other, path)


MUTATIONS = [bit_flips, truncate, header_edit, header_edit, tensor_edit, tensor_edit, json_confusion,
             json_confusion, filesystem]


# ---- running one case -----------------------------------------------------------------------------
class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def _raised_in_shirakit(exc: BaseException) -> bool:
    """Was the first error of the chain raised by shirakit's own code (a check), not by torch & co?"""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(SHIRAKIT_SRC)


def _pairs(indices: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    flat = indices[0].long() * in_features + indices[1].long()
    order = torch.argsort(flat)
    return torch.stack([flat[order].double(), values[order].double()])


def _check_loaded(model, directory: Path) -> None:
    """A load that succeeded must hold the file's values (finite), as the adapter's dtype has them."""
    loaded = adapter_state_dict(model, "fuzz")
    for value in loaded.values():
        assert not value.is_floating_point() or bool(torch.isfinite(value).all())
    raw = (directory / WEIGHTS_NAME).read_bytes()
    header, _ = _split(raw)
    if (header.get("__metadata__") or {}).get("shirakit_format") == "compact-v1":
        return  # the compact layout is decoded and range-checked by the loader; values are checked above
    file_tensors = load_bytes(raw)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, shirakit.AdapterLinear)}
    for key, value in loaded.items():
        if key.endswith("shira_indices"):
            continue
        own = file_tensors[key].to(value.dtype)
        if key.endswith("shira_weight"):  # the loader sorts positions; compare (position, value) pairs
            prefix = key[: -len("shira_weight")]
            layer = layers[prefix[len("base_model.model.") : -1]]
            got = _pairs(loaded[prefix + "shira_indices"], value, layer.in_features)
            want = _pairs(file_tensors[prefix + "shira_indices"], own, layer.in_features)
            assert torch.equal(got, want), key
        else:
            assert torch.equal(own, value), key


def _unchanged(base: Base) -> bool:
    model = base.model
    if hasattr(model, "shirakit") or any(isinstance(m, shirakit.AdapterLinear) for m in model.modules()):
        return False
    state = model.state_dict()
    return state.keys() == base.snapshot.keys() and all(torch.equal(state[k], base.snapshot[k]) for k in state)


def run_case(seed: int, bases: dict[str, Base], entries, work: Path) -> str:
    """Mutate one corpus adapter with ``seed``; return the outcome: 'refused' or 'loaded'. Raise on failure."""
    rng = random.Random(seed)
    kind, source = rng.choice(entries)
    base = bases[kind]
    directory = work / f"case{seed}"
    shutil.copytree(source, directory)
    applied = [rng.choice(MUTATIONS) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    for mutation in applied:
        if not ((directory / WEIGHTS_NAME).is_file() and (directory / CONFIG_NAME).is_file()):
            break  # a FIFO, folder or dangling link now: nothing further to edit (a FIFO would block)
        try:  # a mutation may not apply to a file an earlier one already broke: then it is skipped
            mutation(rng, directory)
        except Exception:
            pass
    label = f"seed {seed}: {[m.__name__ for m in applied]} on {source.name}"
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shirakit.load_adapter(base.model, directory, "fuzz")
    except Hang:
        raise AssertionError(f"{label}: hung for {CASE_SECONDS} s") from None
    except CLEAR_ERRORS as exc:
        signal.alarm(0)
        assert _raised_in_shirakit(exc), f"{label}: an error escaped from outside shirakit: {exc!r}"
        assert str(directory) in str(exc), f"{label}: the error does not name the file: {exc}"
        assert _unchanged(base), f"{label}: a failed load changed the model"
        return "refused"
    except BaseException as exc:
        raise AssertionError(f"{label}: raw {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    try:
        _check_loaded(base.model, directory)
    except AssertionError as exc:
        raise AssertionError(f"{label}: loaded, but not what the file holds: {exc}") from None
    shirakit.unload(base.model)
    assert _unchanged(base), f"{label}: unload after a successful load did not restore the base"
    return "loaded"


def run_fuzz(seeds: range, root: Path) -> dict[str, int]:
    bases, entries = build_corpus(root / "corpus")
    counts = {"refused": 0, "loaded": 0}
    for seed in seeds:
        counts[run_case(seed, bases, entries, root)] += 1
        shutil.rmtree(root / f"case{seed}", ignore_errors=True)
    return counts


@pytest.mark.skipif(not hasattr(signal, "SIGALRM") or not hasattr(os, "mkfifo"), reason="POSIX only")
@pytest.mark.slow
def test_fuzz_1000_cases(tmp_path):
    counts = run_fuzz(range(1000), tmp_path)
    print(f"fuzz: {counts}")
    assert counts["refused"] + counts["loaded"] == 1000
    assert counts["refused"] > 500 and counts["loaded"] > 20  # the mutations both break and spare files


@pytest.mark.slow
def test_fuzz_more_seeds(tmp_path):
    counts = run_fuzz(range(1000, 6000), tmp_path)
    print(f"fuzz: {counts}")
