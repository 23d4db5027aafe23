"""Hand-made GGUF files for error tests: copies of fixtures with metadata or tensors changed,
written with llama.cpp's own `gguf` package."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

import gguf

# (name, array) -> None to drop the tensor, or a (name, array) to write instead.
TensorEdit = Callable[[str, np.ndarray], Optional[tuple]]


def rewrite(
    src: Path,
    dst: Path,
    *,
    arch: str | None = None,
    set_kv: dict | None = None,
    drop_kv: tuple = (),
    edit: TensorEdit = lambda name, array: (name, array),
    extra: tuple = (),
) -> Path:
    """Copies `src` to `dst` with metadata set or dropped and tensors edited or added."""
    reader = gguf.GGUFReader(src)
    fields = reader.fields
    writer = gguf.GGUFWriter(dst, arch or fields["general.architecture"].contents())
    set_kv = dict(set_kv or {})
    for key, field in fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_kv:
            continue
        if key in set_kv:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for key, (value, vtype) in set_kv.items():
        writer.add_key_value(key, value, vtype)
    for tensor in reader.tensors:
        result = edit(tensor.name, np.array(tensor.data))
        if result is not None:
            writer.add_tensor(result[0], result[1])
    for name, array in extra:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def only(name: str, change: Callable[[np.ndarray], np.ndarray]) -> TensorEdit:
    """Changes tensor `name`, keeps the others."""
    return lambda n, a: (n, change(a) if n == name else a)


def dropped(name: str) -> TensorEdit:
    """Drops tensor `name`."""
    return lambda n, a: None if n == name else (n, a)


def renamed(old: str, new: str) -> TensorEdit:
    """Replaces `old` by `new` in every tensor name."""
    return lambda n, a: (n.replace(old, new), a)


STRING = gguf.GGUFValueType.STRING
FLOAT32 = gguf.GGUFValueType.FLOAT32
