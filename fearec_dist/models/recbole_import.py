"""Import a trained RecBole 1.2.x FEARec or SASRec checkpoint (spec recbole-state-dicts.md).

A full RecBole checkpoint pickles its ``Config`` object (and is saved with pickle protocol 4),
so ``torch.load`` (weights_only) refuses it, and ``weights_only=False`` would run whatever the
pickle says. Here the zip archive ``torch.save`` wrote is read with a restricted unpickler:
tensors, plain containers, torch dtypes and storages resolve; every other class or function the
pickle names becomes an inert stub that keeps the arguments and state the pickle hands it and
runs nothing. The hyper-parameters come from the stubbed Config's ``final_config_dict`` (plain
values), the weights from ``state_dict``. RecBole's ``item_encoder.layer_ramp.*`` keys (an alias
of FEARec's last block, spec fearec.md §10.12) are dropped; any other unknown or missing key is
an error that lists them.

RecBole numbers items by its own token order; pass RecBole's ``item_tokens`` (id -> token,
``dataset.field2id_token['item_id']``) and our ``vocab`` (id -> token, index 0 = padding) to
reorder the item table to our ids, or neither to keep RecBole's ids.

Example::

    model = load_recbole("saved/FEARec-Nov-23-2026_10-00-00.pth")  # eval mode
    scores = model.item_scores(model(item_seq, seq_len))
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from typing import IO, Any

import torch
from torch import nn

from fearec_dist.config import ConfigError
from fearec_dist.models.registry import build_model

# RecBole key -> our config field, per model (docs/recbole-keys.md is the readable table)
COMMON_KEYS = {
    "hidden_size": "hidden_size",
    "n_layers": "n_layers",
    "n_heads": "n_heads",
    "inner_size": "inner_size",
    "hidden_dropout_prob": "hidden_dropout",
    "attn_dropout_prob": "attn_dropout",
    "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
}
FEAREC_KEYS = COMMON_KEYS | {
    "global_ratio": "global_ratio",
    "topk_factor": "topk_factor",
    "dual_domain": "dual_domain",
    "std": "band_limit_time",
    "spatial_ratio": "spatial_ratio",
    "contrast": "contrast",
    "sim": "sim",
    "tau": "tau",
    "lmd": "lmd",
    "lmd_sem": "lmd_sem",
    "fredom": "freq_reg",
    "fredom_type": "freq_reg_pairs",
}
MODELS = {"FEARec": ("fearec", FEAREC_KEYS), "SASRec": ("sasrec", COMMON_KEYS)}
IGNORED_PREFIXES = ("item_encoder.layer_ramp.",)  # alias of the last FEA block (§10.12)


class RecBoleImportError(ValueError):
    """The checkpoint cannot be mapped onto our model; the message says which keys or values."""


class _Stub:
    """Inert stand-in for a class or function in a pickle: records what it is given, runs
    nothing. Calling it (pickle's REDUCE) or building it (NEWOBJ, BUILD) only stores values."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})
        else:
            self.__dict__["_stub_state"] = state


_STORAGES = {
    name
    for name in dir(torch)
    if name.endswith("Storage") and isinstance(getattr(torch, name), type)
}
_ALLOWED = {  # (module, name) a checkpoint of tensors and plain containers needs
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
    ("torch", "device"),
    *(("builtins", n) for n in ("set", "frozenset", "complex", "slice", "bytearray")),
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals, torch storage classes and dtypes; every other global
    (RecBole's Config, enums, ``builtins.exec``, ``os.system``, …) becomes a `_Stub` subclass.
    ``find_class`` is the only way a pickle reaches code, so nothing foreign runs."""

    def __init__(self, data: IO[bytes], archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(data)
        self.archive, self.prefix = archive, prefix
        self.stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and name in _STORAGES):
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        full = f"{module}.{name}"
        if full not in self.stubs:
            self.stubs[full] = type(name, (_Stub,), {"__module__": f"stub.{module}"})
        return self.stubs[full]

    def persistent_load(self, pid: Any) -> Any:
        """torch.save's storage records: ('storage', storage class, key, location, numel)."""
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        elif isinstance(storage_type, type) and storage_type.__name__ in _STORAGES:
            with warnings.catch_warnings():  # legacy storage classes warn on .dtype; torch.load
                warnings.simplefilter("ignore")  # reads the same attribute
                dtype = storage_type.dtype
        else:
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        untyped = (
            torch.frombuffer(raw, dtype=torch.uint8).untyped_storage()
            if raw
            else (torch.UntypedStorage(0))
        )
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def read_checkpoint(path: str | os.PathLike[str] | IO[bytes]) -> Any:
    """Reads a ``torch.save`` zip file with `_SafeUnpickler` (any pickle protocol; RecBole uses
    4, which torch's own weights-only unpickler does not read). Tensors land on the CPU."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            prefix = pkl[: -len("/data.pkl")]
            order = f"{prefix}/byteorder"
            if order in archive.namelist() and archive.read(order) != sys.byteorder.encode():
                raise RecBoleImportError(f"{path!r}: saved with a different byte order")
            with archive.open(pkl) as data:
                return _SafeUnpickler(data, archive, prefix).load()
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError) as err:
        raise RecBoleImportError(f"cannot read {path!r} as a torch.save zip file: {err}") from None


def _hyper_parameters(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    config = checkpoint.get("config")
    final = getattr(config, "final_config_dict", None)
    if final is None and isinstance(config, Mapping):
        final = config.get("final_config_dict", config)
    return dict(final or {})


def _model_params(recbole: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """RecBole's values under our names; RecBole's None/'None' means 'not set'."""
    params: dict[str, Any] = {}
    for theirs, ours in keys.items():
        value = recbole.get(theirs)
        if value is not None and value != "None":
            params[ours] = value
    if "contrast" in keys and "contrast" not in params:
        params["contrast"] = "none"  # absent from RecBole 1.2.1's yaml: plain CE (§10.1)
    if params.get("freq_reg") and "freq_reg_pairs" not in params:
        params["freq_reg"] = False  # fredom without fredom_type matches no branch in RecBole
    act = recbole.get("hidden_act", "gelu")
    if act != "gelu":
        raise RecBoleImportError(f"hidden_act={act!r}: only gelu is implemented")
    return params


def _reorder_items(
    table: torch.Tensor, item_tokens: Sequence[str], vocab: Sequence[str]
) -> torch.Tensor:
    """(V_recbole, D) rows in RecBole's id order -> (len(vocab), D) rows in ours; row 0 kept."""
    if len(item_tokens) != table.shape[0]:
        raise RecBoleImportError(
            f"item_tokens has {len(item_tokens)} entries, the item table {table.shape[0]} rows"
        )
    position = {str(tok): i for i, tok in enumerate(item_tokens)}
    missing = [str(tok) for tok in vocab[1:] if str(tok) not in position]
    if missing:
        raise RecBoleImportError(
            f"{len(missing)} of our items are not in the RecBole vocabulary: {missing[:10]}"
        )
    rows = torch.tensor([0] + [position[str(tok)] for tok in vocab[1:]])
    return table[rows]


def load_recbole(
    source: str | os.PathLike[str] | IO[bytes] | Mapping[str, Any],
    *,
    item_tokens: Sequence[str] | None = None,
    vocab: Sequence[str] | None = None,
    model: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Builds our FEARec/SASRec from a RecBole checkpoint; returns it in eval mode.

    Args:
        source: a RecBole checkpoint file (``Trainer._save_checkpoint``'s dict, or a file holding
            only a state dict), or such a dict already in memory.
        item_tokens: RecBole's id -> token list (index 0 = ``[PAD]``); with ``vocab``, the item
            table is reordered to our ids.
        vocab: our id -> token list (index 0 = padding).
        model: "FEARec" or "SASRec" when the source has no Config (a bare state dict).
        config: RecBole-named hyper-parameters that override (or, for a bare state dict,
            supply) the Config's ``final_config_dict``; missing keys take our defaults.

    Returns:
        The model in eval mode, ``n_items`` from the item table (or ``vocab``).

    Raises:
        RecBoleImportError: unreadable file, unsupported model, unknown/missing/misshapen keys.
    """
    if (item_tokens is None) != (vocab is None):
        raise RecBoleImportError("pass both item_tokens and vocab to reorder items, or neither")
    checkpoint = source if isinstance(source, Mapping) else read_checkpoint(source)
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping) or "item_embedding.weight" not in state:
        raise RecBoleImportError("no state dict with item_embedding.weight in the checkpoint")
    recbole = _hyper_parameters(checkpoint) if "state_dict" in checkpoint else {}
    recbole |= dict(config or {})
    name = model or recbole.get("model")
    if name not in MODELS:
        raise RecBoleImportError(f"model {name!r}: importable models are {', '.join(MODELS)}")
    ours, keys = MODELS[name]
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    table = state["item_embedding.weight"]
    if vocab is not None and item_tokens is not None:
        state["item_embedding.weight"] = table = _reorder_items(table, item_tokens, vocab)
    max_seq_len = recbole.get("MAX_ITEM_LIST_LENGTH") or state["position_embedding.weight"].shape[0]
    try:
        net = build_model(
            ours,
            n_items=table.shape[0] - 1,
            max_seq_len=int(max_seq_len),
            **_model_params(recbole, keys),
        )
    except ConfigError as err:
        raise RecBoleImportError(f"RecBole hyper-parameters rejected: {err}") from None
    expected = net.state_dict()
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        raise RecBoleImportError(f"state dict mismatch: unknown keys {unknown}, missing {missing}")
    wrong = [
        f"{k}: {tuple(v.shape)} vs ours {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise RecBoleImportError(f"shape mismatch: {wrong}")
    net.load_state_dict(state)
    return net.eval()
