"""Hostile input: a corpus of malformed GGUF and SafeTensors files made from the fixtures, and a
batch runner that opens them in a child process, so that a crash (abort, segfault) or a hang
fails a test instead of killing pytest, under an address-space limit that turns an allocation
the file does not justify into a failure.

Files are written with `struct` (no `gguf` package): a malformed file is one that no writer
would produce. Run as a script, this module is the child: `python hostile.py CASES.json`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# The child's address-space limit: far above what the tiny fixtures need (about 300 MiB),
# far below what a length or count read from a hostile file would ask for.
ADDRESS_SPACE_LIMIT = 2 << 30
# The largest resident set the child may reach over the whole corpus.
MAX_RSS_BYTES = 512 << 20

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FORMATS = {
    U8: "<B",
    I8: "<b",
    U16: "<H",
    I16: "<h",
    U32: "<I",
    I32: "<i",
    F32: "<f",
    BOOL: "<?",
    U64: "<Q",
    I64: "<q",
    F64: "<d",
}
# ggml tensor type ids used below.
GGML_Q4_0, GGML_TQ1_0 = 2, 34


# --- GGUF, byte by byte ---------------------------------------------------------------------


@dataclass
class Kv:
    key: str
    type_id: int
    raw: bytes  # the encoded value, after the type id
    start: int = 0  # where the entry (its key) starts in the source file


@dataclass
class TensorInfo:
    name: str
    dims: list  # ggml order: innermost first
    type_id: int
    offset: int  # relative to the start of the data section
    start: int = 0  # where the info starts in the source file


@dataclass
class Gguf:
    """A GGUF file split into its sections; `encode` writes it back, whatever the fields say."""

    version: int = 3
    kvs: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    data: bytes = b""  # the data section, from the first aligned byte after the infos
    alignment: int = 32
    # Positions in the source file, for truncations.
    magic_end: int = 4
    header_end: int = 24
    infos_end: int = 0
    data_start: int = 0
    file_len: int = 0

    def copy(self) -> Gguf:
        return copy.deepcopy(self)

    def kv(self, key: str) -> Kv:
        return next(kv for kv in self.kvs if kv.key == key)

    def set(self, key: str, type_id: int, value) -> Gguf:
        """Sets (or adds) a scalar or string value."""
        raw = encode_value(type_id, value)
        for kv in self.kvs:
            if kv.key == key:
                kv.type_id, kv.raw = type_id, raw
                return self
        self.kvs.append(Kv(key, type_id, raw))
        return self

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name)

    def tensor_bytes(self, name: str) -> bytes:
        """The stored bytes of a tensor (up to the next tensor's offset)."""
        info = self.tensor(name)
        ends = sorted(t.offset for t in self.tensors if t.offset > info.offset)
        return self.data[info.offset : ends[0] if ends else len(self.data)]

    def replace_data(self, blobs: dict) -> Gguf:
        """Lays the data section out again with `blobs` (name -> bytes) in file order."""
        old = {t.name: self.tensor_bytes(t.name) for t in self.tensors}
        old.update(blobs)
        data = bytearray()
        for t in self.tensors:
            t.offset = len(data)
            data += old[t.name]
            data += b"\0" * (-len(data) % self.alignment)
        self.data = bytes(data)
        return self

    def encode(self, *, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
        out = bytearray(b"GGUF")
        out += struct.pack(
            "<IQQ", self.version, _or(n_tensors, len(self.tensors)), _or(n_kv, len(self.kvs))
        )
        for kv in self.kvs:
            out += encode_string(kv.key) + struct.pack("<I", kv.type_id) + kv.raw
        for t in self.tensors:
            out += encode_string(t.name) + struct.pack("<I", len(t.dims))
            out += b"".join(struct.pack("<Q", d) for d in t.dims)
            out += struct.pack("<IQ", t.type_id, t.offset)
        out += b"\0" * (-len(out) % self.alignment)
        return bytes(out + self.data)


def _or(value, default):
    return default if value is None else value


def encode_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def encode_value(type_id: int, value) -> bytes:
    if type_id == STRING:
        return encode_string(value)
    return struct.pack(SCALAR_FORMATS[type_id], value)


def encode_array(item_type: int, items: list) -> bytes:
    return struct.pack("<IQ", item_type, len(items)) + b"".join(
        encode_value(item_type, v) for v in items
    )


def _skip_value(data: bytes, pos: int, type_id: int) -> int:
    if type_id == STRING:
        (n,) = struct.unpack_from("<Q", data, pos)
        return pos + 8 + n
    if type_id == ARRAY:
        item_type, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        for _ in range(count):
            pos = _skip_value(data, pos, item_type)
        return pos
    return pos + struct.calcsize(SCALAR_FORMATS[type_id])


def _read_string(data: bytes, pos: int) -> tuple:
    (n,) = struct.unpack_from("<Q", data, pos)
    return data[pos + 8 : pos + 8 + n].decode(), pos + 8 + n


def parse_gguf(path: Path) -> Gguf:
    """Splits a well-formed GGUF (a fixture) into sections, remembering where each starts."""
    data = Path(path).read_bytes()
    assert data[:4] == b"GGUF", path
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    g = Gguf(version=version, file_len=len(data))
    pos = 24
    for _ in range(n_kv):
        start = pos
        key, pos = _read_string(data, pos)
        (type_id,) = struct.unpack_from("<I", data, pos)
        end = _skip_value(data, pos + 4, type_id)
        g.kvs.append(Kv(key, type_id, data[pos + 4 : end], start))
        pos = end
    for kv in g.kvs:
        if kv.key == "general.alignment":
            (g.alignment,) = struct.unpack("<I", kv.raw)
    for _ in range(n_tensors):
        start = pos
        name, pos = _read_string(data, pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = list(struct.unpack_from(f"<{n_dims}Q", data, pos + 4))
        pos += 4 + 8 * n_dims
        type_id, offset = struct.unpack_from("<IQ", data, pos)
        pos += 12
        g.tensors.append(TensorInfo(name, dims, type_id, offset, start))
    g.infos_end = pos
    g.data_start = pos + (-pos % g.alignment)
    g.data = data[g.data_start :]
    return g


# --- SafeTensors, byte by byte --------------------------------------------------------------


def encode_safetensors(header, data: bytes, *, header_len: int | None = None) -> bytes:
    """`header` is a dict (dumped as JSON) or raw bytes; `header_len` overrides the length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", _or(header_len, len(raw))) + raw + data


def parse_safetensors(path: Path) -> tuple:
    data = Path(path).read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8 : 8 + n]), data[8 + n :]


# --- cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    """Open `path` as `open` ("model", "model-nommap" or "lora" for `model`) and expect `error`
    with a message matching `match`, or `error=None` for a file that must open."""

    name: str
    open: str
    path: str
    error: str | None
    match: str = ""
    model: str | None = None

    def to_json(self) -> dict:
        return self.__dict__


class Corpus:
    """Writes each case's file into `folder` and collects the cases."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cases: list = []

    def file(self, name: str, content: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(content)
        return path

    def add(self, name, open_as, path, error, match="", model=None) -> None:
        self.cases.append(Case(name, open_as, str(path), error, match, model and str(model)))

    def __len__(self) -> int:
        return len(self.cases)


# Truncated files say so: "file is truncated" (a cut field), "cannot fit in the N bytes left"
# (a count or length the rest cannot hold) or "runs past the end of the file" (tensor data).
TRUNCATED = r"truncated|cannot fit in the \d+ bytes left|past the end of the file"


def truncation_points(g: Gguf) -> dict:
    """Lengths that cut the file inside each section: header fields, every metadata entry,
    every tensor info, the padding before the data, and every tensor's data."""
    points = {f"header-{n}": n for n in (0, 1, 3, 4, 6, 8, 12, 16, 20, 23)}
    for i, kv in enumerate(g.kvs):
        points[f"kv{i}-start"] = kv.start
        points[f"kv{i}-key"] = kv.start + 9
        end = (
            g.kvs[i + 1].start
            if i + 1 < len(g.kvs)
            else (g.tensors[0].start if g.tensors else g.infos_end)
        )
        points[f"kv{i}-value"] = end - 1
    for i, t in enumerate(g.tensors):
        points[f"info{i}-start"] = t.start
        points[f"info{i}-name"] = t.start + 9
        end = g.tensors[i + 1].start if i + 1 < len(g.tensors) else g.infos_end
        points[f"info{i}-offset"] = end - 4
    if g.data_start > g.infos_end:
        points["padding"] = g.infos_end + 1
    for i, t in enumerate(g.tensors):
        points[f"data{i}-start"] = g.data_start + t.offset
        points[f"data{i}-middle"] = g.data_start + t.offset + 7
    last = max(g.tensors, key=lambda t: t.offset)
    points["data-last-byte"] = g.data_start + last.offset + len(g.tensor_bytes(last.name)) - 1
    return {k: v for k, v in points.items() if v < g.file_len}


def gguf_structure_cases(corpus: Corpus, src: Path, prefix: str, opens: list, model=None) -> None:
    """Every way the GGUF container can be broken, made from `src`, opened each way in `opens`."""
    g = parse_gguf(src)
    raw = Path(src).read_bytes()
    files: list = []  # (name, bytes, error, match)

    def bad(name, content, match, error="ValueError"):
        files.append((name, content, error, match))

    for name, length in truncation_points(g).items():
        match = "not a GGUF file" if length < 4 else TRUNCATED
        bad(f"truncated-{name}", raw[:length], match)

    for magic in (b"GGML", b"FUGG", b"\0\0\0\0", b"gguf"):
        bad(f"magic-{magic.hex()}", magic + raw[4:], r"not a GGUF file \(magic bytes")
    for version in (0, 1, 4, 0xFFFFFFFF):
        v = g.copy()
        v.version = version
        bad(f"version-{version}", v.encode(), f"GGUF version {version} is not supported")

    for count in (len(g.tensors) + 1, 1 << 40, (1 << 63) + 5, (1 << 64) - 1):
        bad(f"tensor-count-{count}", g.encode(n_tensors=count), TRUNCATED + "|cannot fit|malformed")
    for count in (len(g.kvs) + 1, 1 << 40, (1 << 64) - 1):
        bad(f"kv-count-{count}", g.encode(n_kv=count), TRUNCATED + "|cannot fit|malformed")

    # Lengths: a key, a string value, a tensor name, arrays of every width.
    key_len = bytearray(raw)
    struct.pack_into("<Q", key_len, g.kvs[0].start, (1 << 64) - 1)
    bad("key-length-huge", bytes(key_len), r"cannot fit")
    for length in (1 << 40, (1 << 64) - 1, len(raw)):
        s = g.copy()
        s.kvs[0] = Kv(s.kvs[0].key, STRING, struct.pack("<Q", length) + b"llama")
        bad(f"string-length-{length}", s.encode(), "cannot fit")
    name_len = bytearray(raw)
    struct.pack_into("<Q", name_len, g.tensors[0].start, (1 << 63) + 1)
    bad("tensor-name-length-huge", bytes(name_len), "cannot fit")
    for item_type in (U8, U32, U64, STRING, ARRAY):
        for count in (1 << 32, (1 << 64) - 1):
            a = g.copy()
            a.kvs.append(
                Kv("hostile.array", ARRAY, struct.pack("<IQ", item_type, count) + b"\0" * 64)
            )
            bad(f"array-{item_type}-count-{count}", a.encode(), r"\d+ array items cannot fit")
    nested = g.copy()
    nested.kvs.append(Kv("hostile.nested", ARRAY, struct.pack("<IQ", ARRAY, 1) * 40 + b"\0" * 64))
    bad("array-nesting", nested.encode(), "nests arrays more than 8 deep")

    for type_id in (13, 99, 0xFFFFFFFF):
        u = g.copy()
        u.kvs.append(Kv("hostile.value", type_id, b"\0" * 16))
        bad(f"value-type-{type_id}", u.encode(), f"unknown value type {type_id}")
        u = g.copy()
        u.kvs.append(Kv("hostile.array", ARRAY, struct.pack("<IQ", type_id, 2) + b"\0" * 16))
        bad(f"array-item-type-{type_id}", u.encode(), f"unknown value type {type_id}")
    b = g.copy()
    b.kvs.append(Kv("hostile.bool", BOOL, b"\x02"))
    bad("bool-byte-2", b.encode(), "holds bool byte 2")
    utf = g.copy()
    utf.kvs.append(Kv("hostile.string", STRING, struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc"))
    bad("string-not-utf8", utf.encode(), "not valid UTF-8")
    dup = g.copy()
    dup.kvs.append(copy.copy(dup.kvs[0]))
    bad("duplicate-key", dup.encode(), f"duplicate key '{g.kvs[0].key}'")
    for value, type_id, match in (
        (0, U32, "general.alignment 0 is not a power of two"),
        (24, U32, "general.alignment 24 is not a power of two"),
        (32, U64, "'general.alignment' has type u64, expected u32"),
    ):
        a = g.copy().set("general.alignment", type_id, value)
        bad(f"alignment-{value}-{type_id}", a.encode(), match)

    first = g.tensors[0].name
    for type_id, match in (
        (99, rf"tensor '{re.escape(first)}' has type unknown type id 99"),
        (0xFFFFFFFF, "unknown type id 4294967295"),
        (GGML_TQ1_0, "has type tq1_0, which lugh does not support"),
    ):
        t = g.copy()
        t.tensors[0].type_id = type_id
        bad(f"tensor-type-{type_id}", t.encode(), match)
    for n_dims in (5, 0xFFFF):
        t = g.copy()
        t.tensors[0].dims = [1] * n_dims
        bad(
            f"tensor-dims-{n_dims}",
            t.encode(),
            rf"has {n_dims} dimensions \(ggml allows at most 4\)",
        )
    huge_dims = bytearray(raw)
    struct.pack_into("<I", huge_dims, g.tensors[0].start + 8 + len(first.encode()), 0xFFFFFFFF)
    bad("tensor-dims-u32-max", bytes(huge_dims), "4294967295 dimensions")
    for dims, match in (
        ([0], "has a dimension of 0"),
        (g.tensors[0].dims[:-1] + [0], "has a dimension of 0"),
        ([1 << 32, 1 << 32, 1 << 32], r"dimensions \[.*\] overflow"),
        ([(1 << 64) - 1, 2], "overflow"),
        ([1 << 62, 2], "overflow"),
        ([256, 1 << 50], "runs past the end of the file"),
        (g.tensors[0].dims[:-1] + [g.tensors[0].dims[-1] + 1], "past the end|overlap"),
    ):
        t = g.copy()
        t.tensors[0].dims = dims
        bad(f"tensor-shape-{'x'.join(map(str, dims))}", t.encode(), match)
    data_len = len(g.data)
    for offset, match in (
        (data_len, "runs past the end of the file"),
        (data_len - g.alignment, "runs past the end of the file"),
        (1 << 40, "runs past the end of the file"),
        ((1 << 64) - g.alignment, "is invalid|past the end"),
        (g.tensors[0].offset + 1, "is not a multiple of the alignment"),
        (g.tensors[0].offset + 4, "is not a multiple of the alignment"),
    ):
        t = g.copy()
        t.tensors[-1].offset = offset
        bad(f"tensor-offset-{offset}", t.encode(), match)
    o = g.copy()
    o.tensors[1].offset = o.tensors[0].offset
    bad("tensors-overlap-same-offset", o.encode(), "overlap in the file|duplicate")
    o = g.copy()
    o.tensors[1].offset = o.tensors[0].offset + g.alignment
    bad("tensors-overlap-shifted", o.encode(), "overlap in the file")
    d = g.copy()
    d.tensors[1].name = d.tensors[0].name
    bad("tensor-duplicate-name", d.encode(), f"duplicate tensor name '{re.escape(first)}'")

    for i, (name, content, error, match) in enumerate(files):
        path = corpus.file(f"{prefix}-{i:03d}-{name}.gguf", content)
        for how in opens:
            corpus.add(f"{prefix}/{name}/{how}", how, path, error, match, model)
    for how in opens:
        folder = corpus.folder / f"{prefix}-dir.gguf"
        folder.mkdir(exist_ok=True)
        if how == "lora":  # a directory is a PEFT adapter
            error, match = (
                "FileNotFoundError",
                "no adapter_model.safetensors in this PEFT directory",
            )
        else:
            error, match = "IsADirectoryError", "is a directory, not a GGUF file"
        corpus.add(f"{prefix}/directory/{how}", how, folder, error, match, model)
        corpus.add(
            f"{prefix}/missing/{how}",
            how,
            corpus.folder / "missing.gguf",
            "FileNotFoundError",
            "missing.gguf",
            model,
        )
        corpus.add(
            f"{prefix}/dev-null/{how}", how, "/dev/null", "OSError", "not a regular file", model
        )
        corpus.add(
            f"{prefix}/dev-zero/{how}", how, "/dev/zero", "OSError", "not a regular file", model
        )
        fifo = corpus.folder / f"{prefix}-fifo.gguf"
        if not fifo.exists():
            os.mkfifo(fifo)
        corpus.add(f"{prefix}/fifo/{how}", how, fifo, "OSError", "not a regular file", model)


def model_cases(corpus: Corpus, src: Path) -> None:
    """A well-formed container whose hyper-parameters or weights do not make a model."""
    g = parse_gguf(src)
    arch = g.kv("general.architecture").raw[8:].decode()
    files: list = []

    def bad(name, m: Gguf, match):
        files.append((name, m.encode(), match))

    def setting(key, type_id, value, match):
        bad(f"{key}={value}", g.copy().set(f"{arch}.{key}", type_id, value), match)

    # Counts that would size allocations: refused by the tensors they promise.
    setting("block_count", U64, 1 << 40, "tensor 'blk.2.attn_q.weight' not found")
    setting("block_count", U64, (1 << 64) - 1, "tensor 'blk.2.attn_q.weight' not found")
    setting(
        "embedding_length", U64, 1 << 40, r"tensor 'blk.0.attn_q.weight' has shape \[256, 256\]"
    )
    setting("embedding_length", U32, 0, "embedding_length is 0")
    setting("feed_forward_length", U64, (1 << 64) - 1, "tensor 'blk.0.ffn_gate.weight' has shape")
    setting("attention.head_count", U32, 0, "head_count is 0")
    setting("attention.head_count_kv", U32, 0, "head_count_kv is 0")
    setting("attention.head_count_kv", U32, 3, "cannot be grouped over 3 key/value heads")
    setting("attention.head_count", U64, 1 << 62, "overflow|cannot be grouped")
    setting("attention.key_length", U64, (1 << 62) + 64, "key_length.*overflow")
    setting("attention.key_length", U32, 0, "key_length is 0")
    setting("attention.value_length", U32, 32, "value length '32 != key length 64'")
    setting("rope.dimension_count", U32, 65, "65 rotated dimensions do not fit heads of 64")
    setting("rope.dimension_count", U64, 1 << 40, "rotated dimensions do not fit")
    setting("context_length", I32, -1, "'llama.context_length' has type i32, expected non-negative")
    setting("attention.layer_norm_rms_epsilon", STRING, "tiny", "has type string, expected float")
    setting("rope.scaling.type", STRING, "yarn", "RoPE scaling 'yarn' is not supported")
    bad(
        "arch-gpt2",
        g.copy().set("general.architecture", STRING, "gpt2"),
        "architecture 'gpt2' is not supported",
    )
    bad(
        "arch-u32",
        g.copy().set("general.architecture", U32, 7),
        "'general.architecture' has type u32",
    )
    per_layer = g.copy()
    per_layer.kv(f"{arch}.block_count").type_id = ARRAY
    per_layer.kv(f"{arch}.block_count").raw = encode_array(U32, [2, 2])
    bad("block_count-array", per_layer, "per-layer value of 'llama.block_count' is not supported")
    missing = g.copy()
    missing.kvs = [kv for kv in missing.kvs if kv.key != f"{arch}.embedding_length"]
    bad("missing-embedding_length", missing, "missing metadata key 'llama.embedding_length'")
    no_embd = g.copy()
    no_embd.tensors = [t for t in no_embd.tensors if t.name != "token_embd.weight"]
    bad("missing-token_embd", no_embd, "tensor 'token_embd.weight' not found")
    transposed = g.copy()
    transposed.tensor("blk.1.attn_k.weight").dims = [128, 256]
    bad(
        "transposed-attn_k",
        transposed,
        r"tensor 'blk.1.attn_k.weight' has shape \[256, 128\], expected \[128, 256\]",
    )
    norm = g.copy()
    norm.tensor("blk.0.attn_norm.weight").dims = [128, 2]
    bad("norm-as-matrix", norm, r"'blk.0.attn_norm.weight' has shape \[2, 128\], expected \[256\]")

    # head_dim * n_head that wraps around to the real width: the q/k/v weights fit, attention
    # would read 2^62 values per head.
    wrap = g.copy().set(f"{arch}.attention.head_count_kv", U32, 4)
    wide = (1 << 62) + 64
    wrap.set(f"{arch}.attention.key_length", U64, wide).set(
        f"{arch}.attention.value_length", U64, wide
    )
    blobs = {}
    for t in wrap.tensors:
        if t.name.endswith(("attn_k.weight", "attn_v.weight")):
            t.dims = [256, 256]
            blobs[t.name] = wrap.tensor_bytes(
                t.name.replace("attn_k", "attn_q").replace("attn_v", "attn_q")
            )
    bad("head_dim-wraps", wrap.replace_data(blobs), "key_length.*overflow")

    for i, (name, content, match) in enumerate(files):
        path = corpus.file(f"model-{i:03d}-{name}.gguf", content)
        corpus.add(f"model/{name}", "model", path, "ValueError", match)


def adapter_cases(corpus: Corpus, fixtures: Path) -> None:
    """llama.cpp adapters that do not fit the model, or are not LoRA adapters."""
    llama = fixtures / "tiny-llama"
    model = llama / "base-q4_0.gguf"
    g = parse_gguf(llama / "lora-qv.gguf")
    files: list = []

    def bad(name, a: Gguf, match):
        files.append((name, a.encode(), match))

    def reshaped(name, tensor, dims, match):
        a = g.copy()
        a.tensor(tensor).dims = dims
        blobs = {
            tensor: a.tensor_bytes(tensor)[: 4 * _product(dims)].ljust(4 * _product(dims), b"\0")
        }
        bad(name, a.replace_data(blobs), match)

    fits = r"does not fit: lora_a \[\d+, \d+\] and lora_b \[\d+, \d+\], expected \[rank, 256\]"
    reshaped("a-transposed", "blk.0.attn_q.weight.lora_a", [8, 256], fits)
    reshaped("a-narrow", "blk.0.attn_q.weight.lora_a", [128, 8], fits)
    reshaped("b-other-rank", "blk.1.attn_v.weight.lora_b", [4, 128], fits)
    reshaped("b-wide", "blk.1.attn_v.weight.lora_b", [8, 256], fits)
    reshaped(
        "a-1d", "blk.0.attn_q.weight.lora_a", [2048], r"has shape \[2048\], expected 2 dimensions"
    )
    reshaped(
        "a-3d", "blk.0.attn_q.weight.lora_a", [256, 4, 2], r"has shape \[2, 4, 256\], expected 2"
    )
    for old, new, match in (
        ("blk.1.", "blk.7.", "'blk.7.attn_q.weight' has no base tensor in the model"),
        ("blk.1.", "blk.99999999999999999999.", "has no base tensor in the model"),
        (
            "blk.1.attn_v",
            "blk.1.attn_norm",
            "LoRA target 'blk.1.attn_norm.weight' is not supported",
        ),
        ("blk.1.attn_q", "token_embd", "LoRA target 'token_embd.weight' is not supported"),
        (
            "blk.1.attn_q.weight.lora_a",
            "blk.1.attn_q.weight.lora_c",
            "neither a lora_a nor a lora_b",
        ),
    ):
        a = g.copy()
        for t in a.tensors:
            t.name = t.name.replace(old, new)
        bad(f"renamed-{new.strip('.')}", a, match)
    half = g.copy()
    half.tensors = [t for t in half.tensors if t.name != "blk.0.attn_v.weight.lora_b"]
    bad("a-without-b", half, "'blk.0.attn_v.weight' has lora_a but no lora_b")
    empty = g.copy()
    empty.tensors, empty.data = [], b""
    bad("no-tensors", empty, "adapter has no LoRA tensor pairs")
    quant = g.copy()
    quant.tensor("blk.0.attn_q.weight.lora_a").type_id = GGML_Q4_0
    bad("a-q4_0", quant, r"has type q4_0 \(adapter tensors may be f32, f16, bf16 or q8_0\)")
    bad(
        "type-model",
        g.copy().set("general.type", STRING, "model"),
        "not an adapter: general.type is 'model'",
    )
    no_type = g.copy()
    no_type.kvs = [kv for kv in no_type.kvs if kv.key != "adapter.type"]
    bad("no-adapter-type", no_type, "not a LoRA adapter: adapter.type is missing")
    bad(
        "alpha-string",
        g.copy().set("adapter.lora.alpha", STRING, "16"),
        "'adapter.lora.alpha' has type string",
    )
    bad(
        "arch-qwen2",
        g.copy().set("general.architecture", STRING, "qwen2"),
        "architecture 'qwen2' does not match the model's 'llama'",
    )

    for i, (name, content, match) in enumerate(files):
        path = corpus.file(f"adapter-{i:03d}-{name}.gguf", content)
        corpus.add(f"adapter/{name}", "lora", path, "ValueError", match, model)
    # Adapters of another model: another architecture, another feed-forward width.
    demo = fixtures / "models" / "lugh-demo-4m-q8_0.gguf"
    for path, on, match in (
        (
            fixtures / "tiny-qwen2" / "lora-qv.gguf",
            model,
            "adapter architecture 'qwen2' does not match",
        ),
        (
            llama / "lora-all.gguf",
            demo,
            r"'blk.0.ffn_down.weight' does not fit.*another base model",
        ),
        (
            llama / "lora-all-peft",
            demo,
            r"'blk.0.ffn_down.weight' does not fit.*another base model",
        ),
    ):
        corpus.add(f"adapter/other-model/{path.name}", "lora", path, "ValueError", match, on)


def _product(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def safetensors_cases(corpus: Corpus, peft_dir: Path, model: Path) -> None:
    """PEFT adapters broken at the SafeTensors level, in their names and shapes, and in their
    config; each opened as a directory and as a file."""
    header, data = parse_safetensors(peft_dir / "adapter_model.safetensors")
    config = (peft_dir / "adapter_config.json").read_bytes()
    meta = header.pop("__metadata__", None)
    names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    q_a = next(n for n in names if "layers.0.self_attn.q_proj.lora_A" in n)
    q_b = q_a.replace("lora_A", "lora_B")
    files: list = []  # (name, weights bytes, config bytes, error, match)

    def bad(name, content, match, error="ValueError", cfg=config):
        files.append((name, content, cfg, error, match))

    def edited(change) -> bytes:
        h = copy.deepcopy(header)
        change(h)
        if meta is not None:
            h["__metadata__"] = meta
        return encode_safetensors(h, data)

    raw = encode_safetensors({**header, "__metadata__": meta} if meta else header, data)
    st = "malformed SafeTensors: "
    for length in ((1 << 64) - 1, 1 << 40, 100_000_001, len(raw)):
        bad(f"header-length-{length}", struct.pack("<Q", length) + raw[8:], st)
    bad("header-length-0", encode_safetensors(b"", data), st)
    for cut in (0, 4, 7, 9, 100, len(raw) - 1):
        bad(f"truncated-{cut}", raw[:cut], st)
    for what, h in (
        ("garbage", b"this is not json"),
        ("binary", b"\xff\xfe\x00\x01" * 4),
        ("array", b"[1, 2, 3]"),
        ("null", b"null"),
        ("open-brace", b"{"),
        ("nested", b"[" * 100_000 + b"]" * 100_000),
    ):
        bad(f"header-{what}", encode_safetensors(h, data), st)

    def offsets(value):
        return lambda h: h[q_a].__setitem__("data_offsets", value)

    end = header[q_a]["data_offsets"][1]
    for label, value in (
        ("past-end", [0, 10**12]),
        ("reversed", [end, 0]),
        ("gap", [4, end]),
        ("huge", [0, (1 << 64) - 1]),
        ("negative", [-8, end]),
    ):
        bad(f"offsets-{label}", edited(offsets(value)), st)
    for dtype, match in (
        ("Q4", st),
        ("I32", r"has type I32 \(PEFT tensors may be F32, F16, BF16 or F64\)"),
        ("U32", r"has type U32 \(PEFT tensors may be F32, F16, BF16 or F64\)"),
        ("F64", st + "invalid shape, data type, or offset"),
        ("BOOL", st + "invalid shape, data type, or offset"),
    ):
        bad(f"dtype-{dtype}", edited(lambda h, d=dtype: h[q_a].__setitem__("dtype", d)), match)
    shape = header[q_a]["shape"]
    for label, value in (
        ("short", [shape[0], shape[1] - 1]),
        ("long", [shape[0] + 1, shape[1]]),
        ("overflow", [1 << 40, 1 << 40, 1 << 40]),
        ("huge", [(1 << 64) - 1, 2]),
        ("negative", [-1, shape[1]]),
    ):
        bad(f"shape-{label}", edited(lambda h, v=value: h[q_a].__setitem__("shape", v)), st)
    dup = raw[8 : 8 + struct.unpack_from("<Q", raw)[0]].rstrip(b" ")
    # JSON keeps the last of two equal keys: the first one's bytes are then nobody's.
    dup = dup[:-1] + b',"' + q_a.encode() + b'":' + json.dumps(header[q_b]).encode() + b"}"
    bad("duplicate-name", encode_safetensors(dup, data), st + "invalid offset for tensor")

    # Valid SafeTensors, wrong adapters.
    def one_tensor(name, shape, dtype="F32"):
        size = {"F32": 4, "F16": 2}[dtype] * _product(shape)
        return {name: {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}}, b"\0" * size

    def lone(label, name, shape, match, dtype="F32"):
        h, d = one_tensor(name, shape, dtype)
        bad(label, encode_safetensors(h, d), match)

    prefix = "base_model.model.model.layers.0.self_attn."
    lone("a-without-b", prefix + "q_proj.lora_A.weight", [8, 256], "has lora_a but no lora_b")
    lone(
        "a-3d",
        prefix + "q_proj.lora_A.weight",
        [8, 4, 64],
        r"has shape \[8, 4, 64\], expected 2 dim",
    )
    lone("base-weight", prefix + "q_proj.weight", [256, 256], "is not a lora_A or lora_B weight")
    lone("lm-head", "base_model.model.lm_head.lora_A.weight", [8, 256], "lm_head target")
    lone(
        "embedding",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        [8, 1000],
        "embedding target",
    )
    huge_layer = prefix.replace("0", "99999999999999999999") + "q_proj.lora_A.weight"
    lone("layer-huge", huge_layer, [8, 256], "is not supported")
    rotary = prefix + "rotary_emb.lora_A.weight"
    lone("rotary", rotary, [8, 256], "'model.layers.0.self_attn.rotary_emb' is not supported")

    def pair(a_shape, b_shape, proj="q_proj", layer=0):
        h, d = {}, b""
        for half, shp in (("A", a_shape), ("B", b_shape)):
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{half}.weight"
            size = 4 * _product(shp)
            h[name] = {"dtype": "F32", "shape": shp, "data_offsets": [len(d), len(d) + size]}
            d += b"\0" * size
        return encode_safetensors(h, d)

    fits = r"adapter pair for 'blk\.\d+\.attn_\w\.weight' does not fit"
    bad("pair-rank-mismatch", pair([8, 256], [256, 4]), fits)
    bad("pair-narrow-a", pair([8, 128], [256, 8]), fits)
    bad("pair-rank-0", pair([0, 256], [256, 0]), "rank >= 1")
    bad("pair-b-not-heads", pair([8, 256], [255, 8]), "255 rows, which do not split into 4 heads")
    bad(
        "pair-layer-7",
        pair([8, 256], [256, 8], layer=7),
        "'blk.7.attn_q.weight' has no base tensor",
    )

    # Configs.
    for label, cfg, match in (
        ("not-json", b"{'r': 8}", "invalid JSON"),
        ("array", b"[]", "adapter_config.json: not a JSON object"),
        ("deep", b"[" * 100_000, "invalid JSON.*recursion limit"),
        ("alpha-string", b'{"lora_alpha": "16"}', "'lora_alpha' is not a number"),
        ("pattern-regex", b'{"alpha_pattern": {"q_proj(": 4}}', r"alpha_pattern key 'q_proj\('"),
        ("pattern-huge", b'{"alpha_pattern": {"(a{1000}){1000}": 4}}', "alpha_pattern key"),
        ("pattern-list", b'{"alpha_pattern": [4]}', "alpha_pattern is not an object"),
        ("use_dora", b'{"use_dora": true}', "PEFT option 'use_dora' is not supported"),
        ("loha", b'{"peft_type": "LOHA"}', "PEFT type 'LOHA' is not supported"),
    ):
        bad(f"config-{label}", raw, match, cfg=cfg)

    for i, (name, weights, cfg, error, match) in enumerate(files):
        folder = corpus.folder / f"peft-{i:03d}-{name}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(weights)
        (folder / "adapter_config.json").write_bytes(cfg)
        corpus.add(f"peft/{name}/dir", "lora", folder, error, match, model)
        corpus.add(
            f"peft/{name}/file", "lora", folder / "adapter_model.safetensors", error, match, model
        )

    # Files that are not where, or what, they should be.
    def folder_with(name, weights=None, cfg=None):
        folder = corpus.folder / f"peft-{name}"
        folder.mkdir()
        for file, content in (("adapter_model.safetensors", weights), ("adapter_config.json", cfg)):
            if isinstance(content, bytes):
                (folder / file).write_bytes(content)
            elif content == "dir":
                (folder / file).mkdir()
            elif content is not None:
                (folder / file).symlink_to(content)
        return folder

    empty = folder_with("empty")
    corpus.add(
        "peft/no-weights/dir",
        "lora",
        empty,
        "FileNotFoundError",
        "no adapter_model.safetensors in this PEFT directory",
        model,
    )
    pickled = folder_with("pickled")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    corpus.add(
        "peft/pickled/dir", "lora", pickled, "FileNotFoundError", "found adapter_model.bin", model
    )
    weights_dir = folder_with("weights-dir", weights="dir", cfg=config)
    corpus.add(
        "peft/weights-is-dir/dir",
        "lora",
        weights_dir,
        "IsADirectoryError",
        "adapter_model.safetensors",
        model,
    )
    config_dir = folder_with("config-dir", weights=raw, cfg="dir")
    corpus.add(
        "peft/config-is-dir/dir",
        "lora",
        config_dir,
        "IsADirectoryError",
        "adapter_config.json",
        model,
    )
    zero_weights = folder_with("weights-dev-zero", weights="/dev/zero", cfg=config)
    corpus.add(
        "peft/weights-dev-zero/dir", "lora", zero_weights, "OSError", "not a regular file", model
    )
    zero_config = folder_with("config-dev-zero", weights=raw, cfg="/dev/zero")
    corpus.add(
        "peft/config-dev-zero/dir", "lora", zero_config, "OSError", "not a regular file", model
    )
    fifo = folder_with("config-fifo", weights=raw)
    os.mkfifo(fifo / "adapter_config.json")
    corpus.add("peft/config-fifo/dir", "lora", fifo, "OSError", "not a regular file", model)
    fifo = folder_with("weights-fifo", cfg=config)
    os.mkfifo(fifo / "adapter_model.safetensors")
    corpus.add("peft/weights-fifo/dir", "lora", fifo, "OSError", "not a regular file", model)


# --- the child ------------------------------------------------------------------------------


def run_batch(cases: list, folder: Path, timeout: float = 120.0) -> dict:
    """Opens every case in one child process; returns {name: result}. A child that dies or
    hangs fails with the case it was on."""
    cases_file = Path(folder) / "cases.json"
    cases_file.write_text(json.dumps([c.to_json() for c in cases]))
    command = [sys.executable, "-X", "faulthandler", __file__, str(cases_file)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, returncode = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout, stderr, returncode = _text(e.stdout), _text(e.stderr), f"timeout ({timeout} s)"
    results, started = {}, None
    summary = {}
    for line in stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        elif "case" in record:
            results[record["case"]] = record
            started = None
        else:
            summary = record
    assert returncode == 0 and started is None, (
        f"the child ended with {returncode} on case {started!r}:\n{stderr[-3000:]}"
    )
    assert summary.get("max_rss", 0) < MAX_RSS_BYTES, f"peak RSS {summary} exceeds {MAX_RSS_BYTES}"
    return results


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def check_results(cases: list, results: dict) -> None:
    """Every case raised the expected exception with the expected message (or opened)."""
    failures = []
    for case in cases:
        got = results.get(case.name)
        if got is None:
            failures.append(f"{case.name}: no result")
        elif case.error is None:
            if got["error"] is not None:
                failures.append(
                    f"{case.name}: expected to open, got {got['error']}: {got['message']}"
                )
        elif got["error"] != case.error or not re.search(case.match, got["message"]):
            failures.append(
                f"{case.name}: expected {case.error} matching {case.match!r}, "
                f"got {got['error']}: {got['message']}"
            )
        elif not any(part in got["message"] for part in _names(case.path)):
            failures.append(f"{case.name}: the message does not name the file: {got['message']}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def _names(path: str) -> tuple:
    """The file, or for a file inside a PEFT directory the directory, that a message names."""
    p = Path(path)
    return (p.name, p.parent.name) if p.name == "adapter_model.safetensors" else (p.name,)


def _child(cases_file: str) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    import lugh

    models: dict = {}
    for case in json.loads(Path(cases_file).read_text()):
        print(json.dumps({"start": case["name"]}), flush=True)
        try:
            if case["open"] == "model":
                lugh.Model(case["path"])
            elif case["open"] == "model-nommap":
                lugh.Model(case["path"], use_mmap=False)
            elif case["open"] == "lora":
                if case["model"] not in models:
                    models[case["model"]] = lugh.Model(case["model"])
                lugh.LoRA(case["path"], models[case["model"]])
            # The harness's own checks: what a crash, a hang and an absurd allocation look like.
            elif case["open"] == "abort":
                os.abort()
            elif case["open"] == "hang":
                time.sleep(3600)
            elif case["open"] == "allocate":
                bytearray(ADDRESS_SPACE_LIMIT)
            else:
                raise AssertionError(f"unknown way to open: {case['open']}")
            error, message = None, ""
        except BaseException as e:  # a PanicException is a BaseException
            error, message = type(e).__name__, str(e)
        print(json.dumps({"case": case["name"], "error": error, "message": message}), flush=True)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"max_rss": max_rss}), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])
