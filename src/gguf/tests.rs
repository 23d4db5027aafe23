//! Reader/writer round trips and one test per way a file can be broken, on crafted bytes.

use super::*;
use crate::error::Error;

fn write_to_vec(writer: &GgufWriter) -> Vec<u8> {
    let mut out = Vec::new();
    writer.write_to(&mut out).unwrap();
    out
}

/// Two Q8_0 blocks: a tensor whose bytes are not its values.
fn q8_bytes() -> Vec<u8> {
    (0..68).map(|i| (i * 37 % 256) as u8).collect()
}

/// An F32 tensor's values, from its little-endian bytes.
fn f32_values(file: &GgufFile, info: &TensorInfo) -> Vec<f32> {
    assert_eq!(info.dtype, TensorType::F32);
    file.tensor_data(info)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn open_bytes(bytes: &[u8]) -> crate::Result<GgufFile> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    std::fs::write(&path, bytes).unwrap();
    GgufFile::open(&path, true)
}

fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama");
    w.set("general.alignment", Value::U32(64));
    w.set("a.u8", Value::U8(7));
    w.set("a.i8", Value::I8(-7));
    w.set("a.u16", Value::U16(65535));
    w.set("a.i16", Value::I16(-300));
    w.set("a.i32", Value::I32(-70000));
    w.set("a.u64", Value::U64(1 << 40));
    w.set("a.i64", Value::I64(-(1 << 40)));
    w.set("a.f64", Value::F64(0.125));
    w.set("a.bool", true);
    w.set(
        "a.strings",
        Value::Array {
            item_type: ValueType::String,
            items: vec!["x".into(), "".into(), "ü".into()],
        },
    );
    w.set(
        "a.nested",
        Value::Array {
            item_type: ValueType::Array,
            items: vec![Value::Array {
                item_type: ValueType::I32,
                items: vec![Value::I32(1), Value::I32(2)],
            }],
        },
    );
    w.add_f32("t.f32", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        .unwrap();
    w.add_tensor(
        "t.q8",
        TensorType::Q8_0,
        &[1, 64],
        TensorBytes::Owned(q8_bytes()),
    )
    .unwrap();
    w
}

#[test]
fn round_trip_keeps_every_value_and_tensor() {
    let writer = sample();
    let file = open_bytes(&write_to_vec(&writer)).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 64);
    for (key, value) in writer.metadata() {
        assert_eq!(file.get(key), Some(value), "{key}");
    }
    let t = file.tensor("t.f32").unwrap();
    assert_eq!(t.shape, vec![2, 3]);
    assert_eq!(t.offset % 64, 0);
    assert_eq!(f32_values(&file, t), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let q = file.tensor("t.q8").unwrap();
    assert_eq!((q.dtype, q.n_bytes), (TensorType::Q8_0, 68));
    assert_eq!(&file.tensor_data(q)[..], &q8_bytes()[..]);
    assert_eq!(
        file.tensors()
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["t.f32", "t.q8"]
    );
}

#[test]
fn without_mmap_gives_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    sample().write(&path).unwrap();
    let mapped = GgufFile::open(&path, true).unwrap();
    let owned = GgufFile::open(&path, false).unwrap();
    let (a, b) = (
        mapped.tensor("t.f32").unwrap(),
        owned.tensor("t.f32").unwrap(),
    );
    assert_eq!(f32_values(&mapped, a), f32_values(&owned, b));
}

fn malformed_reason(bytes: &[u8]) -> String {
    match open_bytes(bytes) {
        Err(e) => e.root().to_string(),
        Ok(_) => panic!("a broken file opened"),
    }
}

/// A header by hand: (n_tensors, n_kv) then raw bytes.
fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

fn string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s.as_bytes());
    b
}

fn tensor_info(name: &str, dims: &[u64], type_id: u32, offset: u64) -> Vec<u8> {
    let mut b = string(name);
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(type_id.to_le_bytes());
    b.extend(offset.to_le_bytes());
    b
}

/// One tensor info then enough zeroed data.
fn one_tensor(dims: &[u64], type_id: u32, offset: u64, data_len: usize) -> Vec<u8> {
    let mut b = header(3, 1, 0);
    b.extend(tensor_info("w", dims, type_id, offset));
    b.resize(b.len().div_ceil(32) * 32 + data_len, 0);
    b
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = write_to_vec(&sample());
    let file = open_bytes(&bytes).unwrap();
    let data_end = file
        .tensors()
        .iter()
        .map(|t| t.offset + t.n_bytes)
        .max()
        .unwrap();
    // Only the final padding may be cut.
    for len in 0..data_end {
        assert!(
            open_bytes(&bytes[..len]).is_err(),
            "truncated at {len} opened"
        );
    }
}

#[test]
fn bad_headers_say_what_is_wrong() {
    assert!(matches!(
        open_bytes(b"GGML\x03\0\0\0").unwrap_err().root(),
        Error::NotGguf { .. }
    ));
    assert!(matches!(
        open_bytes(&header(1, 0, 0)).unwrap_err().root(),
        Error::UnsupportedGgufVersion { version: 1 }
    ));
    assert!(malformed_reason(&header(3, u64::MAX, 0)).contains("cannot fit"));
    assert!(malformed_reason(&header(3, 0, 1 << 40)).contains("cannot fit"));
}

#[test]
fn hostile_metadata_is_refused_before_allocating() {
    let mut huge_string = header(3, 0, 1);
    huge_string.extend(string("k"));
    huge_string.extend(8u32.to_le_bytes());
    huge_string.extend(u64::MAX.to_le_bytes());
    assert!(malformed_reason(&huge_string).contains("cannot fit"));

    let mut huge_array = header(3, 0, 1);
    huge_array.extend(string("k"));
    huge_array.extend(9u32.to_le_bytes());
    huge_array.extend(4u32.to_le_bytes());
    huge_array.extend((1u64 << 62).to_le_bytes());
    assert!(malformed_reason(&huge_array).contains("cannot fit"));

    let mut unknown_type = header(3, 0, 1);
    unknown_type.extend(string("k"));
    unknown_type.extend(99u32.to_le_bytes());
    unknown_type.extend([0u8; 16]);
    assert!(malformed_reason(&unknown_type).contains("unknown value type 99"));

    let mut deep = header(3, 0, 1);
    deep.extend(string("k"));
    deep.extend(9u32.to_le_bytes());
    for _ in 0..20 {
        deep.extend(9u32.to_le_bytes());
        deep.extend(1u64.to_le_bytes());
    }
    deep.extend([0u8; 64]);
    assert!(malformed_reason(&deep).contains("nests arrays"));

    let mut bad_utf8 = header(3, 0, 1);
    bad_utf8.extend(8u64.to_le_bytes());
    bad_utf8.extend([0xff; 8]);
    assert!(malformed_reason(&bad_utf8).contains("UTF-8"));

    let mut duplicate = header(3, 0, 2);
    for _ in 0..2 {
        duplicate.extend(string("k"));
        duplicate.extend(4u32.to_le_bytes());
        duplicate.extend(1u32.to_le_bytes());
    }
    assert!(malformed_reason(&duplicate).contains("duplicate key"));
}

#[test]
fn hostile_tensor_infos_are_refused() {
    assert!(matches!(
        open_bytes(&one_tensor(&[32], 34, 0, 64)).unwrap_err().root(),
        Error::UnsupportedTensorType { type_name, .. } if type_name == "tq1_0"
    ));
    assert!(matches!(
        open_bytes(&one_tensor(&[32], 1234, 0, 64)).unwrap_err().root(),
        Error::UnsupportedTensorType { type_name, .. } if type_name == "unknown type id 1234"
    ));
    assert!(malformed_reason(&one_tensor(&[1, 1, 1, 1, 1], 0, 0, 64)).contains("5 dimensions"));
    assert!(malformed_reason(&one_tensor(&[4, 0], 0, 0, 64)).contains("dimension of 0"));
    assert!(
        malformed_reason(&one_tensor(&[1 << 32, 1 << 32, 1 << 32], 0, 0, 64)).contains("overflow")
    );
    assert!(malformed_reason(&one_tensor(&[16], 0, 1 << 20, 64)).contains("past the end"));
    assert!(malformed_reason(&one_tensor(&[16], 0, 4, 128)).contains("alignment"));
    assert!(malformed_reason(&one_tensor(&[48], 8, 0, 128)).contains("block size"));
    assert!(malformed_reason(&one_tensor(&[16], 0, u64::MAX - 31, 64)).contains("invalid"));

    let mut overlapping = header(3, 2, 0);
    overlapping.extend(tensor_info("a", &[16], 0, 0));
    overlapping.extend(tensor_info("b", &[16], 0, 32));
    overlapping.resize(overlapping.len().div_ceil(32) * 32 + 128, 0);
    assert!(malformed_reason(&overlapping).contains("overlap"));

    let mut duplicate = header(3, 2, 0);
    duplicate.extend(tensor_info("a", &[8], 0, 0));
    duplicate.extend(tensor_info("a", &[8], 0, 32));
    duplicate.resize(duplicate.len().div_ceil(32) * 32 + 128, 0);
    assert!(malformed_reason(&duplicate).contains("duplicate tensor name"));
}

#[test]
fn a_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    match GgufFile::open(dir.path(), true) {
        Err(Error::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::IsADirectory)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn from_bytes_reads_what_open_reads() {
    let bytes = write_to_vec(&sample());
    let (opened, parsed) = (
        open_bytes(&bytes).unwrap(),
        GgufFile::from_bytes(&bytes).unwrap(),
    );
    assert_eq!(parsed.metadata(), opened.metadata());
    let t = parsed.tensor("t.f32").unwrap();
    assert_eq!(f32_values(&parsed, t), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert!(matches!(
        GgufFile::from_bytes(b"GG").unwrap_err(),
        Error::NotGguf { magic } if magic == b"GG"
    ));
}

/// A device or FIFO is refused before it is read: `/dev/zero` has a length of 0 and no end,
/// opening a FIFO blocks until a writer comes.
#[cfg(unix)]
#[test]
fn anything_but_a_regular_file_is_refused_before_reading() {
    for path in ["/dev/zero", "/dev/null"] {
        for use_mmap in [true, false] {
            match GgufFile::open(path, use_mmap) {
                Err(Error::Io { source, .. }) => {
                    assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput);
                    assert!(
                        source.to_string().contains("not a regular file"),
                        "{source}"
                    );
                }
                other => panic!("{path}: {other:?}"),
            }
        }
    }
}
