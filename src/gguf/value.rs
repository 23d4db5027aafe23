//! GGUF metadata values: the twelve scalar types, strings and (nested) arrays.

use crate::error::{Error, Result};

/// The type tag stored before each metadata value (gguf.h `gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        use ValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// The fewest bytes one value of this type takes in a file: bounds an array's
    /// count by the bytes left, before anything is allocated for it.
    pub(crate) fn min_encoded_size(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Items all of type `item_type` (kept so an empty array writes back unchanged).
    Array {
        item_type: ValueType,
        items: Vec<Value>,
    },
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array { .. } => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    fn type_description(&self) -> String {
        match self {
            Value::Array { item_type, .. } => format!("array of {}", item_type.name()),
            other => other.value_type().name().to_string(),
        }
    }

    /// Any integer type that fits, as llama.cpp accepts e.g. u32 or i32 for counts.
    pub fn to_u64(&self, key: &str) -> Result<u64> {
        let v = match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        };
        v.ok_or_else(|| self.wrong_type(key, "non-negative integer"))
    }

    pub fn to_usize(&self, key: &str) -> Result<usize> {
        usize::try_from(self.to_u64(key)?).map_err(|_| self.wrong_type(key, "integer"))
    }

    pub fn to_i64(&self, key: &str) -> Result<i64> {
        match *self {
            Value::I8(v) => Ok(v as i64),
            Value::I16(v) => Ok(v as i64),
            Value::I32(v) => Ok(v as i64),
            Value::I64(v) => Ok(v),
            _ => i64::try_from(self.to_u64(key)?).map_err(|_| self.wrong_type(key, "integer")),
        }
    }

    pub fn to_f32(&self, key: &str) -> Result<f32> {
        match *self {
            Value::F32(v) => Ok(v),
            Value::F64(v) => Ok(v as f32),
            _ => Err(self.wrong_type(key, "float")),
        }
    }

    pub fn to_bool(&self, key: &str) -> Result<bool> {
        match *self {
            Value::Bool(v) => Ok(v),
            _ => Err(self.wrong_type(key, "bool")),
        }
    }

    pub fn as_str(&self, key: &str) -> Result<&str> {
        match self {
            Value::String(s) => Ok(s),
            _ => Err(self.wrong_type(key, "string")),
        }
    }

    pub fn as_array(&self, key: &str) -> Result<&[Value]> {
        match self {
            Value::Array { items, .. } => Ok(items),
            _ => Err(self.wrong_type(key, "array")),
        }
    }

    pub fn wrong_type(&self, key: &str, expected: &'static str) -> Error {
        Error::WrongValueType {
            key: key.to_string(),
            expected,
            got: self.type_description(),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}

impl From<f32> for Value {
    fn from(v: f32) -> Value {
        Value::F32(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::U32(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}
