"""How to load a model: one frozen :class:`LoadSpec`, declared once for the CLI, the API and configs.

The same object is what ``vlmflow.load_model`` takes, the model part of a run spec (its identity
fields name the run directory), and what a study config's model entry holds. Importing this module
imports no torch.

>>> spec = LoadSpec("llava-hf/llava-1.5-7b-hf", dtype="float16", image_mode="pad")
>>> spec.options
(('image_mode', 'pad'),)
>>> spec.identity()["options"]
{'image_mode': 'pad'}
>>> LoadSpec("llava-hf/llava-1.5-7b-hf", patch_rule="paper").options
(('patch_rule', 'paper'),)
>>> LoadSpec("m", attn_implementation="flash_attention_2")
Traceback (most recent call last):
...
vlmflow.settings.SettingError: attn_implementation: attention implementation 'flash_attention_2' cannot take a knockout mask (the kernel never sees it, so a knockout would silently do nothing); valid: eager, sdpa
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmflow.errors import ConfigError
from vlmflow.settings import Settings, build, setting
from vlmflow.settings_keywords import route_keywords

__all__ = ["DTYPE_CHOICES", "MASKABLE_ATTENTION", "PATCH_RULES", "LoadSpec", "load_spec"]

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
#: Rules deciding which image tokens are related to a box (:mod:`vlmflow.positions.patches`,
#: :mod:`vlmflow.positions.paper_rule`); the first is every family's default.
PATCH_RULES = ("overlap", "paper")
#: Family options with a field of their own: written into ``options`` when set, read from there when not.
OPTION_FIELDS = ("image_mode", "patch_rule")
#: Attention kernels that apply an explicit attention mask (others, such as flash-attention, never
#: see one, so a knockout would silently do nothing).
MASKABLE_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class LoadSpec(Settings):
    """How to load a model: checkpoint, precision, device, attention kernel, prompt and family options.

    Every field is declared once (:func:`vlmflow.settings.setting`): its CLI flag, API keyword, config
    key, help and whether it belongs to a run's identity come from here. Where the model runs
    (``device``) and the permissions (``allow_hub``, ``trust_remote_code``) do not change results,
    so they are not part of the identity. ``image_mode`` and ``patch_rule`` are family options: when
    set, each is written into ``options`` (part of the identity), over the same key there; when not,
    it is read from there. The patch rule changes the related/other groups, so a run records it; it
    belongs here because the input pipeline, bound at load, builds the image layout.
    """

    name: str = setting(
        key="model", flags=("--model", "-m"), keyword=False, help="HF model id or local checkpoint directory."
    )
    dtype: str = setting(
        "auto", choices=DTYPE_CHOICES, invalid="unknown dtype {value!r}", help="auto, float32, bfloat16 or float16."
    )
    device: str = setting("auto", identity=False, help="auto, cpu, cuda or cuda:N.")
    attn_implementation: str = setting(
        "sdpa",
        flags=("--attn",),
        config="attn",
        choices=MASKABLE_ATTENTION,
        invalid=(
            "attention implementation {value!r} cannot take a knockout mask (the kernel never sees it, so a "
            "knockout would silently do nothing)"
        ),
        help="Attention implementation: sdpa or eager.",
    )
    revision: str | None = setting(None, help="Hub revision of the model.")
    allow_hub: bool = setting(False, identity=False, help="Allow downloading the model from the Hugging Face hub.")
    # Not a config key: running code shipped with a checkpoint is for the person at the keyboard to allow,
    # not for a shared study file.
    trust_remote_code: bool = setting(
        False, identity=False, config=False, help="Allow Python code shipped with the checkpoint (config/processor) to run."
    )
    template: str | None = setting(None, help="Prompt template (default: the family's).")
    image_mode: str | None = setting(
        None,
        identity=False,  # recorded in ``options``
        help="Image preprocessing: LLaVA-1.5 pad (paper), resize or crop; LLaVA-NeXT anyres (paper) or nohd_nopad.",
    )
    patch_rule: str | None = setting(
        None,
        identity=False,  # recorded in ``options``
        choices=PATCH_RULES,
        invalid="unknown patch rule {value!r}",
        help=(
            "Which image tokens are related to a box: overlap (default: a patch showing a box pixel) or paper "
            "(the official code's: inclusive rectangle, bicubic resize, a patch holding an exactly red pixel; "
            "LLaVA-1.5 and LLaVA-NeXT)."
        ),
    )
    options: tuple[tuple[str, Any], ...] = setting(
        (),
        flags=None,
        config=False,
        encode=dict,
        help="Family options such as {'image_mode': 'pad'}; they override the checkpoint's vlmflow.json.",
    )

    def __post_init__(self) -> None:
        options = () if self.options is None else self.options
        if isinstance(options, Mapping):
            options = tuple(sorted(options.items()))
        elif not isinstance(options, tuple):
            options = tuple(options)
        if not all(isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) for pair in options):
            raise ConfigError(f"options must be a mapping of option names to values, got {self.options!r}")
        object.__setattr__(self, "options", options)
        super().__post_init__()
        # The family options users set most have fields of their own, kept in options too.
        given = dict(self.options)
        for name in OPTION_FIELDS:
            if getattr(self, name) is not None:
                given[name] = getattr(self, name)
            elif name in given:
                object.__setattr__(self, name, given[name])
        object.__setattr__(self, "options", tuple(sorted(given.items())))



def load_spec(model: LoadSpec | str | Path, keywords: Mapping[str, Any], function: str) -> LoadSpec:
    """``model`` as a :class:`LoadSpec`, with ``keywords`` (fields by name) set on it.

    ``function`` names the caller in the error for an unknown keyword.

    >>> load_spec("m", {"device": "cpu"}, "load_model").device
    'cpu'
    >>> load_spec(LoadSpec("m"), {"dtype": "float16"}, "load_model").dtype
    'float16'
    """
    (fields,) = route_keywords(function, keywords, LoadSpec)
    if isinstance(model, LoadSpec):
        return build(LoadSpec, fields, base=model) if fields else model
    if isinstance(model, str | Path):
        return build(LoadSpec, {"model": str(model), **fields})
    raise ConfigError(
        f"model must be a checkpoint path, a Hugging Face id, a LoadSpec or a model from vlmflow.load_model, "
        f"got {type(model).__name__}"
    )
