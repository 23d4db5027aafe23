//! GGUF reader over a memory mapping. Every count, length, dimension product and offset is
//! checked against the file before use, so a truncated or hostile file is an error, never a
//! panic or an allocation the file does not justify. Tensor data is not copied: `tensor_data`
//! returns views into the mapping.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut};

use super::tensor_type::TensorType;
use super::value::{Value, ValueType};
use crate::error::{Error, Result, ResultExt};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are refused (they would only serve to exhaust the stack).
const MAX_ARRAY_NESTING: usize = 8;

/// A byte range of a shared, read-only mapping: how weights are held.
#[derive(Clone)]
pub struct ByteView {
    storage: Arc<Mmap>,
    offset: usize,
    len: usize,
}

impl ByteView {
    /// Bytes built in memory (merged or converted tensors), page-aligned like a mapping.
    pub fn from_vec(bytes: Vec<u8>) -> ByteView {
        let mut owned = MmapMut::map_anon(bytes.len().max(1)).expect("anonymous memory");
        owned[..bytes.len()].copy_from_slice(&bytes);
        ByteView {
            storage: Arc::new(owned.make_read_only().expect("read-only anonymous memory")),
            offset: 0,
            len: bytes.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `range` of this view, as a view of the same storage.
    pub fn slice(&self, range: std::ops::Range<usize>) -> ByteView {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "slice out of the view"
        );
        ByteView {
            storage: Arc::clone(&self.storage),
            offset: self.offset + range.start,
            len: range.len(),
        }
    }
}

impl Deref for ByteView {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }
}

impl std::fmt::Debug for ByteView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ByteView({} bytes at {})", self.len, self.offset)
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: TensorType,
    /// Row-major shape, outermost first (numpy order): a weight is `[n_out, n_in]`.
    pub shape: Vec<usize>,
    /// Absolute offset of the data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open GGUF file: metadata in file order, tensor infos, and the mapping.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    alignment: usize,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    storage: Arc<Mmap>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`. With `use_mmap` the file is mapped (pages shared with other
    /// processes, nothing read until used); without, it is read into anonymous memory.
    pub fn open(path: impl AsRef<Path>, use_mmap: bool) -> Result<GgufFile> {
        let path = path.as_ref();
        let storage = map_file(path, use_mmap)?;
        Self::parse(path.to_path_buf(), Arc::new(storage)).in_file(path)
    }

    /// Parses a GGUF held in memory (a download, a fuzzer's input). The bytes are copied once
    /// into page-aligned memory, as a mapping would hold them; `path()` is `<memory>`.
    pub fn from_bytes(bytes: &[u8]) -> Result<GgufFile> {
        let path = PathBuf::from("<memory>");
        if bytes.len() < 4 {
            return Err(Error::NotGguf {
                magic: bytes.to_vec(),
            });
        }
        let io_err = |e| Error::io(&path, e);
        let mut owned = MmapMut::map_anon(bytes.len()).map_err(io_err)?;
        owned.copy_from_slice(bytes);
        let storage = owned.make_read_only().map_err(io_err)?;
        Self::parse(path, Arc::new(storage))
    }

    fn parse(path: PathBuf, storage: Arc<Mmap>) -> Result<GgufFile> {
        let bytes: &[u8] = &storage;
        let mut cursor = Cursor { bytes, pos: 0 };
        let magic = cursor
            .take(4, "the magic bytes")
            .map_err(|_| Error::NotGguf {
                magic: bytes[..bytes.len().min(4)].to_vec(),
            })?;
        if magic != GGUF_MAGIC {
            return Err(Error::NotGguf {
                magic: magic.to_vec(),
            });
        }
        let version = cursor.u32("the version")?;
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedGgufVersion { version });
        }
        let n_tensors = cursor.u64("the tensor count")?;
        let n_kv = cursor.u64("the metadata count")?;
        // A key-value pair takes at least 12 bytes, a tensor info at least 24.
        let n_kv = cursor.count(n_kv, 12, "metadata entries")?;
        let n_tensors = cursor.count(n_tensors, 24, "tensor infos")?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut metadata_index = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = cursor.string("a metadata key")?;
            let type_id = cursor.u32("a value type")?;
            let value = cursor.value(type_id, &key, 0)?;
            if metadata_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(Error::malformed("GGUF", format!("duplicate key '{key}'")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let value = &metadata[i].1;
                let alignment = match value {
                    Value::U32(v) => *v as usize,
                    other => return Err(other.wrong_type("general.alignment", "u32")),
                };
                if !alignment.is_power_of_two() {
                    return Err(Error::malformed(
                        "GGUF",
                        format!("general.alignment {alignment} is not a power of two"),
                    ));
                }
                alignment
            }
        };

        let mut raw_infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            raw_infos.push(cursor.tensor_info()?);
        }
        // Tensor data starts at the next multiple of the alignment (a file without tensors
        // may end before it).
        let data_start = align_up(cursor.pos, alignment)
            .filter(|&start| start <= bytes.len() || n_tensors == 0)
            .ok_or_else(|| {
                Error::malformed(
                    "GGUF",
                    format!(
                        "file is truncated: it ends before the data of its {n_tensors} tensors"
                    ),
                )
            })?;

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for raw in raw_infos {
            let info = raw.validate(data_start, alignment, bytes.len())?;
            if tensor_index
                .insert(info.name.clone(), tensors.len())
                .is_some()
            {
                return Err(Error::malformed(
                    "GGUF",
                    format!("duplicate tensor name '{}'", info.name),
                ));
            }
            tensors.push(info);
        }
        check_no_overlap(&tensors)?;

        Ok(GgufFile {
            path,
            version,
            alignment,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
            storage,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A required key.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| Error::MissingKey {
            key: key.to_string(),
        })
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| v.as_str(key)).transpose()
    }

    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| v.to_usize(key)).transpose()
    }

    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        self.get(key).map(|v| v.to_f32(key)).transpose()
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor, in place.
    pub fn tensor_data(&self, info: &TensorInfo) -> ByteView {
        ByteView {
            storage: Arc::clone(&self.storage),
            offset: info.offset,
            len: info.n_bytes,
        }
    }
}

fn map_file(path: &Path, use_mmap: bool) -> Result<Mmap> {
    let io_err = |e| Error::io(path, e);
    let (file, len) = open_regular_file(path, "GGUF file")?;
    if len < 4 {
        let mut magic = Vec::with_capacity(4);
        file.take(4).read_to_end(&mut magic).map_err(io_err)?;
        return Err(Error::NotGguf { magic }.in_file(path));
    }
    if use_mmap {
        // SAFETY: the mapping is read-only; like every mmap-based reader (llama.cpp, candle,
        // safetensors) we rely on the file not being truncated while it is open.
        unsafe { Mmap::map(&file) }.map_err(io_err)
    } else {
        let len = usize::try_from(len).map_err(|_| {
            io_err(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                "file too large for this platform",
            ))
        })?;
        let mut owned = MmapMut::map_anon(len).map_err(io_err)?;
        (&file).read_exact(&mut owned).map_err(io_err)?;
        owned.make_read_only().map_err(io_err)
    }
}

/// Opens `path` for reading and returns it with its length. Anything but a regular file is
/// refused before it is opened: opening a FIFO blocks until a writer comes, and a device such
/// as `/dev/zero` reports a length of 0 but never ends.
pub(crate) fn open_regular_file(path: &Path, what: &str) -> Result<(File, u64)> {
    let io_err = |e| Error::io(path, e);
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if meta.is_dir() {
        return Err(io_err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            format!("is a directory, not a {what}"),
        )));
    }
    if !meta.is_file() {
        return Err(not_a_regular_file(path, what));
    }
    let file = File::open(path).map_err(io_err)?;
    // What was opened, not what was looked at: the path may have changed in between.
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(not_a_regular_file(path, what));
    }
    Ok((file, meta.len()))
}

pub(crate) fn not_a_regular_file(path: &Path, what: &str) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "not a regular file (a device, FIFO or socket?): {what}s are read from regular files only"
            ),
        ),
    )
}

fn align_up(pos: usize, alignment: usize) -> Option<usize> {
    pos.checked_add(alignment - 1).map(|p| p & !(alignment - 1))
}

fn check_no_overlap(tensors: &[TensorInfo]) -> Result<()> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        if pair[0].offset + pair[0].n_bytes > pair[1].offset {
            return Err(Error::malformed(
                "GGUF",
                format!(
                    "tensors '{}' and '{}' overlap in the file",
                    pair[0].name, pair[1].name
                ),
            ));
        }
    }
    Ok(())
}

/// A tensor info as read, before it is checked against the file.
struct RawTensorInfo {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    offset: u64,
}

impl RawTensorInfo {
    fn validate(self, data_start: usize, alignment: usize, file_len: usize) -> Result<TensorInfo> {
        let name = self.name;
        let bad = |reason: String| Error::malformed("GGUF", format!("tensor '{name}': {reason}"));
        let dtype =
            TensorType::from_id(self.type_id).ok_or_else(|| Error::UnsupportedTensorType {
                name: name.clone(),
                type_name: TensorType::describe_id(self.type_id),
            })?;
        if self.dims.contains(&0) {
            return Err(bad(format!("has a dimension of 0 (dims {:?})", self.dims)));
        }
        let mut n_elements: usize = 1;
        for &dim in &self.dims {
            n_elements = usize::try_from(dim)
                .ok()
                .and_then(|d| n_elements.checked_mul(d))
                .filter(|&n| n <= i64::MAX as usize)
                .ok_or_else(|| bad(format!("dimensions {:?} overflow", self.dims)))?;
        }
        let row = self.dims.first().copied().unwrap_or(1) as usize;
        let row_bytes = dtype.row_bytes(row).ok_or_else(|| {
            bad(format!(
                "row of {row} elements is not a multiple of the {dtype} block size {}",
                dtype.block_size()
            ))
        })?;
        let n_bytes = row_bytes
            .checked_mul(n_elements / row)
            .ok_or_else(|| bad(format!("dimensions {:?} overflow", self.dims)))?;
        if !self.offset.is_multiple_of(alignment as u64) {
            return Err(bad(format!(
                "offset {} is not a multiple of the alignment {alignment}",
                self.offset
            )));
        }
        let offset = usize::try_from(self.offset)
            .ok()
            .and_then(|o| o.checked_add(data_start))
            .filter(|o| o % dtype.alignment() == 0)
            .ok_or_else(|| bad(format!("offset {} is invalid", self.offset)))?;
        match offset.checked_add(n_bytes) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(bad(format!(
                    "data ({n_bytes} bytes at offset {offset}) runs past the end of the file ({file_len} bytes): truncated?"
                )))
            }
        }
        Ok(TensorInfo {
            shape: self.dims.iter().rev().map(|&d| d as usize).collect(),
            name,
            dtype,
            offset,
            n_bytes,
        })
    }
}

/// Little-endian reads with bounds checks that say what was being read.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::malformed(
                "GGUF",
                format!(
                    "file is truncated: reading {what} at byte {} needs {n} bytes, {} left",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items that each take at least `min_size` bytes: refused if the rest of the
    /// file cannot hold them, so no allocation exceeds what the file justifies.
    fn count(&mut self, count: u64, min_size: usize, what: &str) -> Result<usize> {
        match usize::try_from(count) {
            Ok(n)
                if n.checked_mul(min_size)
                    .is_some_and(|b| b <= self.remaining()) =>
            {
                Ok(n)
            }
            _ => Err(Error::malformed(
                "GGUF",
                format!(
                    "{count} {what} cannot fit in the {} bytes left at byte {}",
                    self.remaining(),
                    self.pos
                ),
            )),
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let len = self.count(len, 1, "string bytes")?;
        let pos = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::malformed("GGUF", format!("{what} at byte {pos} is not valid UTF-8"))
        })
    }

    fn value_type(&mut self, type_id: u32, key: &str) -> Result<ValueType> {
        ValueType::from_id(type_id).ok_or_else(|| {
            Error::malformed(
                "GGUF",
                format!("metadata '{key}' has unknown value type {type_id}"),
            )
        })
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<Value> {
        let what = format!("the value of '{key}'");
        Ok(match self.value_type(type_id, key)? {
            ValueType::U8 => Value::U8(self.array::<1>(&what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(&what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => Value::U32(self.u32(&what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => Value::U64(self.u64(&what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::malformed(
                        "GGUF",
                        format!("metadata '{key}' holds bool byte {b}"),
                    ))
                }
            },
            ValueType::String => Value::String(self.string(&what)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(Error::malformed(
                        "GGUF",
                        format!("metadata '{key}' nests arrays more than {MAX_ARRAY_NESTING} deep"),
                    ));
                }
                let item_id = self.u32(&what)?;
                let item_type = self.value_type(item_id, key)?;
                let count = self.u64(&what)?;
                let count = self.count(count, item_type.min_encoded_size(), "array items")?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(item_id, key, depth + 1)?);
                }
                Value::Array { item_type, items }
            }
        })
    }

    fn tensor_info(&mut self) -> Result<RawTensorInfo> {
        let name = self.string("a tensor name")?;
        let n_dims = self.u32("a tensor's dimension count")? as usize;
        if n_dims > MAX_DIMS {
            return Err(Error::malformed(
                "GGUF",
                format!("tensor '{name}' has {n_dims} dimensions (ggml allows at most {MAX_DIMS})"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(self.u64("a tensor dimension")?);
        }
        let type_id = self.u32("a tensor type")?;
        let offset = self.u64("a tensor offset")?;
        Ok(RawTensorInfo {
            name,
            dims,
            type_id,
            offset,
        })
    }
}
