"""Load a VLM checkpoint (HF id or local directory) with its processor, bound to its family.

Offline by default: nothing reaches the network unless ``allow_hub=True``. Weights are read only
from safetensors files, and ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmflow.adapters.decoder import DecoderMap
from vlmflow.adapters.family import ModelFamily
from vlmflow.adapters.pipeline import InputPipeline
from vlmflow.adapters.registry import family_for_architecture
from vlmflow.aliases import alias_names, resolve_model_name
from vlmflow.errors import ConfigError
from vlmflow.load_spec import LoadSpec, load_spec
from vlmflow.prompts import PromptTemplate, get_template
from vlmflow.settings_keywords import settings_keywords

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIDECAR = "vlmflow.json"  # optional per-checkpoint settings: prompt_template, image_mode
#: Weight files in pickle formats: loading one can run arbitrary code, so they are never read.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: How many evenly spaced blocks of each weight file the fingerprint hashes (plus its size).
_FINGERPRINT_BLOCKS = 64
_FINGERPRINT_BLOCK_BYTES = 64 * 1024


@dataclass
class LoadedModel:
    """A model ready for vlmflow: the HF model and processor, bound to its family's two parts.

    Attributes:
        model: the transformers model, in eval mode.
        processor: its HF processor.
        family: the model family (:class:`~vlmflow.adapters.family.ModelFamily`).
        inputs: the family's input pipeline bound to this model (prompt, processor, image layout).
        decoder: the family's decoder map bound to this model (layers, attention, rotary, pattern).
        template: the prompt template used to build prompts.
        options: family options (e.g. ``image_mode``) from the checkpoint sidecar and the caller.
        info: provenance recorded with every run (name, revision, dtype, device, ...).
    """

    model: nn.Module
    processor: Any
    family: ModelFamily
    inputs: InputPipeline
    decoder: DecoderMap
    template: PromptTemplate
    options: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def n_layers(self) -> int:
        return self.decoder.n_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end the greedy answer (:func:`stop_token_ids` of the model and its tokenizer)."""
        return stop_token_ids(self.model, self.tokenizer)


def stop_token_ids(model: nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """Every end-of-sequence id of the checkpoint's generation config, then the tokenizer's, once each.

    A generation config may list several (Llama-3-LLaVA-NeXT: ``<|eot_id|>`` and
    ``<|end_of_text|>``); the tokenizer knows only one. Generation stops on any of them, as the
    paper's code did. Empty when neither names one (then only the token budget ends an answer).

    >>> from types import SimpleNamespace
    >>> model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[128009, 128001]))
    >>> stop_token_ids(model, SimpleNamespace(eos_token_id=128001))
    (128009, 128001)
    """
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None)
    ids = list(found) if isinstance(found, list | tuple) else [found]
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def parse_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``"float32"|"bfloat16"|"float16"`` -> torch dtype; ``"auto"``: bfloat16 on CUDA, else float32.

    >>> parse_dtype("auto", torch.device("cpu"))
    torch.float32
    """
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


@settings_keywords(LoadSpec)
def load_model(spec: LoadSpec | str | Path, **fields: Any) -> LoadedModel:
    """Load a checkpoint through transformers and pick its family adapter.

    Args:
        spec: a :class:`~vlmflow.load_spec.LoadSpec`, or the model: a local directory or a Hugging
            Face model id (from the local cache unless ``allow_hub``), or a model alias
            (:mod:`vlmflow.aliases`; ``"organism"`` names the organism shipped with the package).
        fields: fields of the spec by name (listed below), set on ``spec``. The checkpoint's
            ``vlmflow.json`` gives the default template and family options.

    >>> from vlmflow.tiny.llava import build_tiny_llava
    >>> _ = build_tiny_llava(path="tiny-llava-doc")            # doctest: +SKIP
    >>> loaded = load_model("tiny-llava-doc", device="cpu")      # doctest: +SKIP
    >>> loaded.family.family                                    # doctest: +SKIP
    'llava'
    """
    from vlmflow.quiet import quiet_libraries

    spec = load_spec(spec, fields, "load_model")
    name_or_path = resolve_model_name(spec.name)
    check_model_path(name_or_path)
    torch_device = resolve_device(spec.device)
    torch_dtype = parse_dtype(spec.dtype, torch_device)
    with hub_access(spec.allow_hub), quiet_libraries():
        return _load(replace(spec, name=str(name_or_path)), torch_dtype, torch_device)


#: A Hugging Face model id: ``name`` or ``owner/name`` of letters, digits, ``-``, ``_`` and ``.``.
_HUB_ID = re.compile(r"^(?![-.])[\w.-]{1,96}(?<![-.])(/(?![-.])[\w.-]{1,96}(?<![-.]))?$")


def check_model_path(name: str) -> None:
    """Refuse a model name that can only mean a local folder when there is no such folder.

    A name that is not a Hugging Face id (``./tiyn``, ``/models/x``, ``a/b/c``), or whose first
    part is a folder here (``models/tiyn`` next to ``models/``), names a folder: when it does not
    exist the error says so (and which folder of that place comes close), instead of a hub error.

    >>> check_model_path("./no-such-checkpoint")
    Traceback (most recent call last):
    ...
    vlmflow.errors.ConfigError: no such directory: './no-such-checkpoint'
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ConfigError(f"model {name!r} is a file; a checkpoint is a folder (config.json, weights, processor files)")
    first = Path(name).parts[0] if Path(name).parts else ""
    if not _HUB_ID.match(name) or ("/" in name and Path(first).is_dir()):
        raise ConfigError(f"no such directory: {name!r}{_did_you_mean(path)}")


def _did_you_mean(path: Path, extra: Sequence[str] = ()) -> str:
    """`` (did you mean 'x'?)`` with the closest folder beside ``path`` (or name in ``extra``)."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        folders = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")] if parent.is_dir() else []
    except OSError:
        folders = []
    close = difflib.get_close_matches(path.name, [*folders, *extra], n=1, cutoff=0.6)
    if not close:
        return ""
    shown = close[0] if close[0] not in folders or parent == Path(".") else str(parent / close[0])
    return f" (did you mean {shown!r}?)"


@contextmanager
def hub_access(allowed: bool) -> Iterator[None]:
    """Inside the block, the Hugging Face hub libraries make no network request unless ``allowed``.

    ``local_files_only`` alone is not enough: huggingface_hub also fetches metadata of its own when it
    builds request headers for a hub id (even one served from the local cache). Its offline switch
    stops every request; it is set for the block and restored afterwards.

    >>> with hub_access(False):
    ...     from huggingface_hub import constants
    ...     constants.HF_HUB_OFFLINE
    True
    """
    if allowed:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _load(spec: LoadSpec, torch_dtype: torch.dtype, torch_device: torch.device) -> LoadedModel:
    """Load ``spec`` (its name resolved to a directory or hub id) as ``torch_dtype`` on ``torch_device``."""
    from transformers import AutoConfig

    source, revision, allow_hub, trust_remote_code = spec.name, spec.revision, spec.allow_hub, spec.trust_remote_code
    attn_implementation = spec.attn_implementation
    dtype = str(torch_dtype).removeprefix("torch.")
    local = Path(source).is_dir()
    common: dict[str, Any] = {
        "revision": revision,
        "local_files_only": not allow_hub,
        "trust_remote_code": trust_remote_code,
    }
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            hint = " (the checkpoint ships its own Python code; pass trust_remote_code=True / --trust-remote-code only if you trust it)"
        elif allow_hub or local:
            hint = ""
        else:
            hint = " (offline mode: pass allow_hub=True / --allow-hub to download it)"
            if not Path(source).exists():
                # The hub library's text speaks of connecting to the hub, which offline mode never tried.
                exc = OSError(
                    "no such directory, model alias or model in the Hugging Face cache"
                    + _did_you_mean(Path(source), alias_names() if "/" not in source else ())
                )
        raise ConfigError(f"cannot load model config from {source!r}{hint}: {exc}") from exc
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        raise ConfigError(f"model {source!r} has no 'architectures' in its config; cannot pick an adapter")
    family = family_for_architecture(architectures[0])
    sidecar = _read_sidecar(source, common)
    # Everything in the sidecar except the template name is a family option (e.g. image_mode).
    merged_options = {k: v for k, v in sidecar.items() if k != "prompt_template"}
    merged_options.update(spec.options)

    if local:
        check_safetensors(Path(source))
    log.info("loading %s (%s) as %s on %s", source, architectures[0], dtype, torch_device)
    try:
        model = family.model_class().from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            **common,
        )
    except OSError as exc:  # e.g. a hub checkpoint with pickle weights only
        raise ConfigError(
            f"cannot load the weights of {source!r}: {exc}. vlmflow reads weights only from .safetensors files"
        ) from exc
    model.to(torch_device)
    model.eval()
    processor = family.load_processor(source, **common)
    template_name = spec.template or sidecar.get("prompt_template") or family.default_template_for(config, processor)
    info = {
        "model": source,
        "family": family.family,
        "architecture": architectures[0],
        "revision": revision or getattr(config, "_commit_hash", None),
        "fingerprint": _fingerprint(source) if local else getattr(config, "_commit_hash", None),
        "dtype": dtype,
        "device": str(torch_device),
        "attn_implementation": attn_implementation,
        "prompt_template": template_name,
        "options": dict(merged_options),
    }
    return bind_model(model, processor, family, get_template(template_name), merged_options, info)


def bind_model(
    model: nn.Module,
    processor: Any,
    family: ModelFamily,
    template: PromptTemplate,
    options: Mapping[str, Any],
    info: Mapping[str, Any],
) -> LoadedModel:
    """A :class:`LoadedModel` of a model already in memory: its family's parts bound to it.

    Checks the family options and the attention kernel (a kernel that cannot take a knockout mask is
    refused). ``info`` gets the number of layers.

    >>> loaded = bind_model(model, processor, family_for_model(model), get_template("vicuna_v1"), {}, {})  # doctest: +SKIP
    """
    bound = family.bind(model, processor, template, options)
    return LoadedModel(
        model=model,
        processor=processor,
        family=family,
        inputs=bound.inputs,
        decoder=bound.decoder,
        template=template,
        options=dict(options),
        info={
            **info,
            "n_layers": bound.decoder.n_layers,
            "patch_rule": bound.inputs.patch_rule,
            "stop_token_ids": list(stop_token_ids(model, bound.inputs.tokenizer)),
        },
    )


def check_safetensors(directory: Path) -> None:
    """Raise :class:`ConfigError` unless ``directory`` holds ``.safetensors`` weights.

    Pickle weight files (``pytorch_model.bin``, ``*.pt``, ...) can run arbitrary code when loaded, so
    a checkpoint that has only those is refused, with the files named.

    >>> check_safetensors(Path("checkpoint-with-only-bin"))  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    vlmflow.errors.ConfigError: checkpoint 'checkpoint-with-only-bin' has weights only in pickle files (pytorch_model.bin) ...
    """
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    if any(name.endswith(".safetensors") for name in names):
        return
    pickled = [name for name in names if name.endswith(PICKLE_WEIGHT_SUFFIXES)]
    if pickled:
        raise ConfigError(
            f"checkpoint {str(directory)!r} has weights only in pickle files ({', '.join(pickled[:4])}), which can "
            "run arbitrary code when loaded; vlmflow reads weights only from .safetensors files. Convert it where "
            "you trust it: load it with transformers and save_pretrained() it again (safetensors is the default)"
        )
    raise ConfigError(f"checkpoint {str(directory)!r} has no .safetensors weight files (found: {', '.join(names[:8])})")


def _read_sidecar(source: str, common: Mapping[str, Any]) -> dict[str, Any]:
    path = Path(source) / SIDECAR
    if not path.is_file():
        try:
            from transformers.utils import cached_file

            found = cached_file(
                source,
                SIDECAR,
                revision=common.get("revision"),
                local_files_only=common.get("local_files_only", True),
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except (OSError, ValueError):
            found = None
        if not found:
            return {}
        path = Path(found)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path.name} of {source!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name} of {source!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _fingerprint(directory: str) -> str:
    """A short hash of a local checkpoint: its JSON files, and per weight file its size and
    :data:`_FINGERPRINT_BLOCKS` evenly spaced blocks of its bytes.

    Sizes alone cannot tell two trainings of one architecture apart (same shapes, same sizes); the
    sampled blocks can, while reading a few MiB instead of hashing many GiB at every start.
    """
    root = Path(directory)
    digest = hashlib.sha256()
    for name in sorted(p.name for p in root.iterdir() if p.is_file()):
        path = root / name
        if name.endswith(".json"):
            digest.update(name.encode() + path.read_bytes())
        elif name.endswith(".safetensors"):
            size = path.stat().st_size
            digest.update(f"{name}:{size}".encode())
            with path.open("rb") as handle:
                for i in range(_FINGERPRINT_BLOCKS):
                    handle.seek(size * i // _FINGERPRINT_BLOCKS)
                    digest.update(handle.read(_FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()[:16]
