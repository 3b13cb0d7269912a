"""The JSON types of the fields the converter reads from config.json, generation_config.json and adapter_config.json.

Checked once, before any family looks at a value: a list where a number belongs, ``null``, a number given as a string,
an object given as an array, or ``true`` where an integer belongs (``True`` is an ``int`` in Python) is refused with
one line naming the file and the field. Fields not listed here are either read with their own checks
(:meth:`chatglm.convert.family.Family.cfg_int` and friends) or never read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from chatglm.errors import InputError


def _is_int(value: Any) -> bool:
    return type(value) is int


def is_number(value: Any) -> bool:
    if type(value) not in (int, float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer of thousands of digits
        return False


def _is_str(value: Any) -> bool:
    return type(value) is str


def _is_str_list(value: Any) -> bool:
    return type(value) is list and all(type(v) is str for v in value)


def _is_token_id(value: Any) -> bool:
    return _is_int(value) and value >= -1  # -1: "none", as some configs write pad_token_id


def _is_token_ids(value: Any) -> bool:
    """A token id, or a non-empty list of them (eos_token_id of GLM-4 lists three)."""
    return _is_token_id(value) or (type(value) is list and bool(value) and all(_is_token_id(v) for v in value))


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def is_number_map(value: Any) -> bool:
    return type(value) is dict and all(is_number(v) for v in value.values())


# kind -> (test, what the error says the field must be)
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (_is_str, "a string"),
    "str?": (_or_null(_is_str), "a string or null"),
    "strs": (_is_str_list, "a list of strings"),
    "strs?": (_or_null(_is_str_list), "a list of strings or null"),
    "str|strs?": (_or_null(lambda v: _is_str(v) or _is_str_list(v)), "a string, a list of strings or null"),
    "bool": (lambda v: type(v) is bool, "true or false"),
    "bool|str": (lambda v: type(v) in (bool, str), "true, false or a string"),
    "int": (_is_int, "an integer"),
    "int?": (_or_null(_is_int), "an integer or null"),
    "number": (is_number, "a finite number"),
    "number?": (_or_null(is_number), "a finite number or null"),
    "ids?": (_or_null(_is_token_ids), "a token id (an integer >= -1), a list of them, or null"),
    "object?": (_or_null(lambda v: type(v) is dict), "an object or null"),
    "numbers-by-pattern?": (_or_null(is_number_map), "an object of module pattern -> number, or null"),
    "ints?": (_or_null(lambda v: _is_int(v) or (type(v) is list and all(_is_int(i) for i in v))),
              "an integer, a list of integers or null"),
}

# Fields every family may read, with their kinds. Hyperparameters proper are checked where they are read.
CONFIG_FIELDS: dict[str, str] = {
    "architectures": "strs?",
    "model_type": "str?",
    "torch_dtype": "str?",
    "bos_token_id": "ids?",
    "eos_token_id": "ids?",
    "pad_token_id": "ids?",
    "mask_token_id": "ids?",
    "gmask_token_id": "ids?",
    "rope_scaling": "object?",
    "rope_parameters": "object?",
    "quantization_bit": "int?",
    "pre_seq_len": "int?",
    "num_local_experts": "int?",
}

GENERATION_FIELDS: dict[str, str] = {
    "bos_token_id": "ids?",
    "eos_token_id": "ids?",
    "pad_token_id": "ids?",
    "max_length": "int?",
    "max_new_tokens": "int?",
    "do_sample": "bool",
    "temperature": "number?",
    "top_p": "number?",
    "top_k": "int?",
}

ADAPTER_FIELDS: dict[str, str] = {  # r and lora_alpha: lora._cfg_number
    "peft_type": "str",
    "target_modules": "str|strs?",
    "rank_pattern": "numbers-by-pattern?",
    "alpha_pattern": "numbers-by-pattern?",
    "use_rslora": "bool",
    "use_dora": "bool",
    "fan_in_fan_out": "bool",
    "bias": "str",
    "modules_to_save": "strs?",
    "base_model_name_or_path": "str?",
    "task_type": "str?",
    "lora_dropout": "number",
    "inference_mode": "bool",
    "layers_to_transform": "ints?",
    "init_lora_weights": "bool|str",
}


def check_types(data: dict, fields: dict[str, str], path: Path) -> None:
    """InputError naming ``path`` and the first present field whose JSON type is not its listed kind."""
    for key, kind in fields.items():
        if key not in data:
            continue
        test, what = KINDS[kind]
        if not test(data[key]):
            raise InputError(f"{key!r} must be {what}, got {shown(data[key])}", path)


def shown(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return "an integer of thousands of digits"
    return text if len(text) <= 60 else text[:57] + "..."
