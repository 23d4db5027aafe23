//! The tensor types lugh reads, with ggml's ids and block layouts (ggml.h `ggml_type`).

/// A ggml tensor type that lugh can compute with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    IQ4NL,
    IQ4XS,
    IQ2XXS,
    IQ2XS,
    IQ2S,
    IQ3XXS,
    IQ3S,
    IQ1S,
    IQ1M,
}

/// (type, ggml id, name, elements per block, bytes per block)
const TABLE: [(TensorType, u32, &str, usize, usize); 22] = [
    (TensorType::F32, 0, "f32", 1, 4),
    (TensorType::F16, 1, "f16", 1, 2),
    (TensorType::Q4_0, 2, "q4_0", 32, 18),
    (TensorType::Q4_1, 3, "q4_1", 32, 20),
    (TensorType::Q5_0, 6, "q5_0", 32, 22),
    (TensorType::Q5_1, 7, "q5_1", 32, 24),
    (TensorType::Q8_0, 8, "q8_0", 32, 34),
    (TensorType::Q2K, 10, "q2_k", 256, 84),
    (TensorType::Q3K, 11, "q3_k", 256, 110),
    (TensorType::Q4K, 12, "q4_k", 256, 144),
    (TensorType::Q5K, 13, "q5_k", 256, 176),
    (TensorType::Q6K, 14, "q6_k", 256, 210),
    (TensorType::IQ4NL, 20, "iq4_nl", 32, 18),
    (TensorType::IQ4XS, 23, "iq4_xs", 256, 136),
    (TensorType::IQ2XXS, 16, "iq2_xxs", 256, 66),
    (TensorType::IQ2XS, 17, "iq2_xs", 256, 74),
    (TensorType::IQ3XXS, 18, "iq3_xxs", 256, 98),
    (TensorType::IQ1S, 19, "iq1_s", 256, 50),
    (TensorType::IQ3S, 21, "iq3_s", 256, 110),
    (TensorType::IQ2S, 22, "iq2_s", 256, 82),
    (TensorType::IQ1M, 29, "iq1_m", 256, 56),
    (TensorType::BF16, 30, "bf16", 1, 2),
];

/// Names of ggml types that exist but that lugh does not compute with, for error messages.
fn unsupported_name(id: u32) -> Option<&'static str> {
    Some(match id {
        9 => "q8_1",
        15 => "q8_k",
        24 => "i8",
        25 => "i16",
        26 => "i32",
        27 => "i64",
        28 => "f64",
        34 => "tq1_0",
        35 => "tq2_0",
        39 => "mxfp4",
        _ => return None,
    })
}

impl TensorType {
    fn row(self) -> &'static (TensorType, u32, &'static str, usize, usize) {
        TABLE
            .iter()
            .find(|row| row.0 == self)
            .expect("every TensorType has a table row")
    }

    pub fn from_id(id: u32) -> Option<TensorType> {
        TABLE.iter().find(|row| row.1 == id).map(|row| row.0)
    }

    /// "q4_k" for a known type, "type 99" for an id ggml does not define.
    pub fn describe_id(id: u32) -> String {
        match Self::from_id(id).map(|t| t.name()).or(unsupported_name(id)) {
            Some(name) => name.to_string(),
            None => format!("unknown type id {id}"),
        }
    }

    pub fn from_name(name: &str) -> Option<TensorType> {
        TABLE
            .iter()
            .find(|row| row.2.eq_ignore_ascii_case(name))
            .map(|row| row.0)
    }

    pub fn id(self) -> u32 {
        self.row().1
    }

    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block (1 for float types).
    pub fn block_size(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().4
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of one row of `n` elements; None if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }

    /// The alignment the block struct needs when read in place (its widest field).
    pub fn alignment(self) -> usize {
        match self {
            TensorType::F32 => 4,
            _ => 2,
        }
    }
}

impl std::fmt::Display for TensorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for row in TABLE {
            assert_eq!(TensorType::from_id(row.1), Some(row.0));
            assert_eq!(TensorType::from_name(row.2), Some(row.0));
        }
        assert_eq!(TensorType::describe_id(23), "iq4_xs");
        assert_eq!(TensorType::describe_id(21), "iq3_s");
        assert_eq!(TensorType::describe_id(34), "tq1_0");
        assert_eq!(TensorType::describe_id(999), "unknown type id 999");
    }

    #[test]
    fn row_bytes_counts_whole_blocks() {
        assert_eq!(TensorType::Q4K.row_bytes(512), Some(288));
        assert_eq!(TensorType::Q8_0.row_bytes(64), Some(68));
        assert_eq!(TensorType::Q8_0.row_bytes(48), None);
        assert_eq!(TensorType::F16.row_bytes(3), Some(6));
    }
}
