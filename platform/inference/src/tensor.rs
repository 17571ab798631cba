//! Tensors as the Open Inference Protocol carries them, validated and converted to and from ort values.

use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};
use serde_json::Value;

use crate::InferenceError;

/// The protocol's datatypes that Plinth serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Fp32,
    Fp16,
    Int64,
    Int32,
    Bool,
    Bytes,
}

impl DataType {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fp32 => "FP32",
            Self::Fp16 => "FP16",
            Self::Int64 => "INT64",
            Self::Int32 => "INT32",
            Self::Bool => "BOOL",
            Self::Bytes => "BYTES",
        }
    }

    /// Parses a protocol datatype name.
    ///
    /// # Errors
    /// For names the protocol does not define or Plinth does not serve.
    pub fn parse(name: &str) -> Result<Self, InferenceError> {
        [
            Self::Fp32,
            Self::Fp16,
            Self::Int64,
            Self::Int32,
            Self::Bool,
            Self::Bytes,
        ]
        .into_iter()
        .find(|t| t.as_str() == name)
        .ok_or_else(|| InferenceError::InvalidInput(format!("unsupported datatype `{name}`")))
    }

    pub(crate) fn of(element: TensorElementType) -> Option<Self> {
        Some(match element {
            TensorElementType::Float32 => Self::Fp32,
            TensorElementType::Float16 => Self::Fp16,
            TensorElementType::Int64 => Self::Int64,
            TensorElementType::Int32 => Self::Int32,
            TensorElementType::Bool => Self::Bool,
            TensorElementType::String => Self::Bytes,
            _ => return None,
        })
    }

    /// The protocol name for an ONNX element type, or the ONNX name when the protocol has none here.
    pub(crate) fn name_of(value_type: &ValueType) -> String {
        match value_type {
            ValueType::Tensor { ty, .. } => {
                Self::of(*ty).map_or_else(|| format!("{ty:?}").to_uppercase(), |t| t.as_str().to_owned())
            }
            other => format!("{other:?}"),
        }
    }
}

/// Flat, row-major tensor contents.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Fp32(Vec<f32>),
    Fp16(Vec<half::f16>),
    Int64(Vec<i64>),
    Int32(Vec<i32>),
    Bool(Vec<bool>),
    Bytes(Vec<String>),
}

impl TensorData {
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Self::Fp32(v) => v.len(),
            Self::Fp16(v) => v.len(),
            Self::Int64(v) => v.len(),
            Self::Int32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::Bytes(v) => v.len(),
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[must_use]
    pub fn datatype(&self) -> DataType {
        match self {
            Self::Fp32(_) => DataType::Fp32,
            Self::Fp16(_) => DataType::Fp16,
            Self::Int64(_) => DataType::Int64,
            Self::Int32(_) => DataType::Int32,
            Self::Bool(_) => DataType::Bool,
            Self::Bytes(_) => DataType::Bytes,
        }
    }

    /// As the protocol's binary extension lays it out (see [`Tensor::from_binary`]).
    #[must_use]
    pub fn to_binary(&self) -> Vec<u8> {
        match self {
            Self::Fp32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::Fp16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::Int64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::Int32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::Bool(v) => v.iter().map(|x| u8::from(*x)).collect(),
            Self::Bytes(v) => v
                .iter()
                .flat_map(|s| {
                    u32::try_from(s.len())
                        .unwrap_or(u32::MAX)
                        .to_le_bytes()
                        .into_iter()
                        .chain(s.bytes())
                })
                .collect(),
        }
    }

    /// Appends `other`'s elements; `false`, appending nothing, when the datatypes differ.
    fn append(&mut self, other: &Self) -> bool {
        match (self, other) {
            (Self::Fp32(a), Self::Fp32(b)) => a.extend_from_slice(b),
            (Self::Fp16(a), Self::Fp16(b)) => a.extend_from_slice(b),
            (Self::Int64(a), Self::Int64(b)) => a.extend_from_slice(b),
            (Self::Int32(a), Self::Int32(b)) => a.extend_from_slice(b),
            (Self::Bool(a), Self::Bool(b)) => a.extend_from_slice(b),
            (Self::Bytes(a), Self::Bytes(b)) => a.extend_from_slice(b),
            _ => return false,
        }
        true
    }

    /// The elements from `at` on, taken out (as [`Vec::split_off`]).
    fn split_off(&mut self, at: usize) -> Self {
        match self {
            Self::Fp32(v) => Self::Fp32(v.split_off(at)),
            Self::Fp16(v) => Self::Fp16(v.split_off(at)),
            Self::Int64(v) => Self::Int64(v.split_off(at)),
            Self::Int32(v) => Self::Int32(v.split_off(at)),
            Self::Bool(v) => Self::Bool(v.split_off(at)),
            Self::Bytes(v) => Self::Bytes(v.split_off(at)),
        }
    }

    /// As protocol JSON: a flat array.
    #[must_use]
    pub fn to_json(&self) -> Value {
        match self {
            Self::Fp32(v) => v.iter().map(|x| Value::from(f64::from(*x))).collect(),
            Self::Fp16(v) => v.iter().map(|x| Value::from(f64::from(x.to_f32()))).collect(),
            Self::Int64(v) => v.iter().copied().map(Value::from).collect(),
            Self::Int32(v) => v.iter().copied().map(Value::from).collect(),
            Self::Bool(v) => v.iter().copied().map(Value::from).collect(),
            Self::Bytes(v) => v.iter().cloned().map(Value::from).collect(),
        }
    }
}

/// A named tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        other => out.push(other),
    }
}

fn invalid(name: &str, detail: &str) -> InferenceError {
    InferenceError::InvalidInput(format!("input `{name}`: {detail}"))
}

/// The most elements one tensor may have: as many as the largest inference body can carry (one byte
/// each, as binary BOOL). Larger shapes are refused before anything is allocated.
pub const MAX_ELEMENTS: usize = 16 << 20;
/// The most dimensions a tensor may have (ONNX Runtime's kernels handle far fewer in practice).
pub const MAX_RANK: usize = 16;

/// ONNX Runtime hands strings to the graph as C strings: one with a NUL in it cannot be passed, and
/// would fail the run as the model's fault rather than the caller's.
fn refuse_nul(name: &str, strings: &[String]) -> Result<(), InferenceError> {
    if strings.iter().any(|s| s.contains('\0')) {
        return Err(invalid(name, "BYTES elements may not contain a NUL character"));
    }
    Ok(())
}

/// The number of elements `shape` describes, checked: non-negative dimensions, a bounded rank, and
/// no dimension (and no product) above [`MAX_ELEMENTS`]. Dimensions are bounded one by one too, so a
/// zero elsewhere in the shape cannot smuggle an absurd dimension through to the runtime.
fn element_count(name: &str, shape: &[i64]) -> Result<usize, InferenceError> {
    if shape.len() > MAX_RANK {
        return Err(invalid(
            name,
            &format!(
                "shape has {} dimensions; at most {MAX_RANK} are served",
                shape.len()
            ),
        ));
    }
    let mut count = 1usize;
    for &dimension in shape {
        let dimension =
            usize::try_from(dimension).map_err(|_| invalid(name, "shape dimensions must be non-negative"))?;
        if dimension > MAX_ELEMENTS {
            return Err(invalid(
                name,
                &format!(
                    "a dimension of {dimension} is larger than the {MAX_ELEMENTS} elements a tensor may have"
                ),
            ));
        }
        count = count
            .checked_mul(dimension)
            .filter(|count| *count <= MAX_ELEMENTS)
            .ok_or_else(|| {
                invalid(
                    name,
                    &format!("shape {shape:?} has more than the {MAX_ELEMENTS} elements a tensor may have"),
                )
            })?;
    }
    Ok(count)
}

impl Tensor {
    /// The rows of `parts` in one tensor, in order: their first dimensions added up. `None` unless
    /// they share name, datatype and every other dimension.
    #[must_use]
    pub fn concat_rows(parts: &[&Self]) -> Option<Self> {
        let (first, rest) = parts.split_first()?;
        let mut joined = (*first).clone();
        for part in rest {
            let same_rows = part.name == joined.name
                && part.shape.len() == joined.shape.len()
                && part.shape.get(1..) == joined.shape.get(1..);
            let (Some(rows), Some(&more)) = (joined.shape.first_mut(), part.shape.first()) else {
                return None;
            };
            if !same_rows || !joined.data.append(&part.data) {
                return None;
            }
            *rows = rows.checked_add(more)?;
        }
        Some(joined)
    }

    /// This tensor cut into consecutive pieces of `rows` rows (first dimension) each. `None` unless
    /// they add up to its first dimension and its data holds whole rows.
    #[must_use]
    pub fn split_rows(mut self, rows: &[usize]) -> Option<Vec<Self>> {
        let total = usize::try_from(*self.shape.first()?).ok()?;
        if total == 0 || rows.iter().sum::<usize>() != total || !self.data.len().is_multiple_of(total) {
            return None;
        }
        let per_row = self.data.len() / total;
        let mut pieces = Vec::with_capacity(rows.len());
        let mut end = total;
        for &count in rows.iter().rev() {
            end -= count;
            let mut shape = self.shape.clone();
            shape[0] = i64::try_from(count).ok()?;
            pieces.push(Self {
                name: self.name.clone(),
                shape,
                data: self.data.split_off(end * per_row),
            });
        }
        pieces.reverse();
        Some(pieces)
    }

    /// Builds a tensor from protocol JSON, checking that the data holds exactly `product(shape)`
    /// elements of `datatype`.
    ///
    /// # Errors
    /// A clear [`InferenceError::InvalidInput`] naming the input.
    pub fn from_json(
        name: &str,
        datatype: &str,
        shape: &[i64],
        data: &Value,
    ) -> Result<Self, InferenceError> {
        let datatype = DataType::parse(datatype)
            .map_err(|_| invalid(name, &format!("unsupported datatype `{datatype}`")))?;
        let expected = element_count(name, shape)?;
        // Nothing is reserved from the shape: the data, already parsed, bounds what is allocated.
        let mut flat = Vec::new();
        flatten(data, &mut flat);
        if flat.len() != expected {
            return Err(invalid(
                name,
                &format!(
                    "shape {shape:?} needs {expected} elements, data has {}",
                    flat.len()
                ),
            ));
        }
        let wrong = |what: &str| {
            invalid(
                name,
                &format!("data must be {what} for datatype {}", datatype.as_str()),
            )
        };
        let data = match datatype {
            DataType::Fp32 => TensorData::Fp32(
                flat.iter()
                    .map(|v| v.as_f64().map(|x| x as f32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| wrong("numbers"))?,
            ),
            DataType::Fp16 => TensorData::Fp16(
                flat.iter()
                    .map(|v| v.as_f64().map(half::f16::from_f64))
                    .collect::<Option<_>>()
                    .ok_or_else(|| wrong("numbers"))?,
            ),
            DataType::Int64 => TensorData::Int64(
                flat.iter()
                    .map(|v| v.as_i64())
                    .collect::<Option<_>>()
                    .ok_or_else(|| wrong("integers"))?,
            ),
            DataType::Int32 => TensorData::Int32(
                flat.iter()
                    .map(|v| v.as_i64().and_then(|x| i32::try_from(x).ok()))
                    .collect::<Option<_>>()
                    .ok_or_else(|| wrong("32-bit integers"))?,
            ),
            DataType::Bool => TensorData::Bool(
                flat.iter()
                    .map(|v| v.as_bool())
                    .collect::<Option<_>>()
                    .ok_or_else(|| wrong("booleans"))?,
            ),
            DataType::Bytes => {
                let strings: Vec<String> = flat
                    .iter()
                    .map(|v| v.as_str().map(ToOwned::to_owned))
                    .collect::<Option<_>>()
                    .ok_or_else(|| wrong("strings"))?;
                refuse_nul(name, &strings)?;
                TensorData::Bytes(strings)
            }
        };
        Ok(Self {
            name: name.to_owned(),
            shape: shape.to_vec(),
            data,
        })
    }

    /// Decodes a tensor sent with the protocol's binary extension: little-endian values, or for BYTES
    /// each element as a 4-byte little-endian length and its bytes.
    ///
    /// # Errors
    /// When the bytes do not hold exactly `product(shape)` elements of `datatype`.
    pub fn from_binary(
        name: &str,
        datatype: &str,
        shape: &[i64],
        bytes: &[u8],
    ) -> Result<Self, InferenceError> {
        let datatype = DataType::parse(datatype)
            .map_err(|_| invalid(name, &format!("unsupported datatype `{datatype}`")))?;
        let count = element_count(name, shape)?;
        let sized = |width: usize| {
            // `count` is capped, so the product cannot overflow; checked all the same.
            let needed = count.checked_mul(width);
            if needed == Some(bytes.len()) {
                Ok(bytes.chunks_exact(width))
            } else {
                Err(invalid(
                    name,
                    &format!(
                        "shape {shape:?} needs {} bytes of {}, got {}",
                        needed.map_or_else(|| "too many".to_owned(), |n| n.to_string()),
                        datatype.as_str(),
                        bytes.len()
                    ),
                ))
            }
        };
        let data = match datatype {
            DataType::Fp32 => TensorData::Fp32(
                sized(4)?
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DataType::Fp16 => TensorData::Fp16(
                sized(2)?
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            DataType::Int64 => TensorData::Int64(
                sized(8)?
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            DataType::Int32 => TensorData::Int32(
                sized(4)?
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DataType::Bool => TensorData::Bool(sized(1)?.map(|c| c[0] != 0).collect()),
            DataType::Bytes => {
                // Each element takes at least its 4-byte length: the data bounds the count.
                let mut strings = Vec::with_capacity(count.min(bytes.len() / 4));
                let mut rest = bytes;
                while rest.len() >= 4 && strings.len() < count {
                    let (length, tail) = rest.split_at(4);
                    let len = u32::from_le_bytes([length[0], length[1], length[2], length[3]]);
                    let item = usize::try_from(len)
                        .ok()
                        .and_then(|len| tail.get(..len))
                        .ok_or_else(|| invalid(name, "a BYTES element runs past the data"))?;
                    strings.push(
                        std::str::from_utf8(item)
                            .map_err(|_| invalid(name, "BYTES elements must be UTF-8"))?
                            .to_owned(),
                    );
                    rest = &tail[item.len()..];
                }
                if !rest.is_empty() || strings.len() != count {
                    return Err(invalid(
                        name,
                        &format!("shape {shape:?} needs {count} BYTES elements"),
                    ));
                }
                refuse_nul(name, &strings)?;
                TensorData::Bytes(strings)
            }
        };
        Ok(Self {
            name: name.to_owned(),
            shape: shape.to_vec(),
            data,
        })
    }

    pub(crate) fn to_ort(&self) -> Result<DynValue, InferenceError> {
        let shape = self.shape.clone();
        Ok(match &self.data {
            TensorData::Fp32(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
            TensorData::Fp16(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
            TensorData::Int64(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
            TensorData::Int32(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
            TensorData::Bool(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
            TensorData::Bytes(v) => OrtTensor::from_string_array((shape, v.as_slice()))?.into_dyn(),
        })
    }

    /// How many elements an output of the runtime holds (0 for what is not a tensor).
    pub(crate) fn elements_of(value: &DynValue) -> usize {
        let ValueType::Tensor { shape, .. } = value.dtype() else {
            return 0;
        };
        shape
            .iter()
            .map(|&dimension| usize::try_from(dimension).unwrap_or(0))
            .fold(1_usize, usize::saturating_mul)
    }

    pub(crate) fn from_ort(name: &str, value: &DynValue) -> Result<Self, InferenceError> {
        let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
            return Err(InferenceError::Runtime(format!(
                "output `{name}` is not a tensor"
            )));
        };
        let shape: Vec<i64> = shape.iter().copied().collect();
        let data = match ty {
            TensorElementType::Float32 => TensorData::Fp32(value.try_extract_tensor::<f32>()?.1.to_vec()),
            TensorElementType::Float16 => {
                TensorData::Fp16(value.try_extract_tensor::<half::f16>()?.1.to_vec())
            }
            TensorElementType::Int64 => TensorData::Int64(value.try_extract_tensor::<i64>()?.1.to_vec()),
            TensorElementType::Int32 => TensorData::Int32(value.try_extract_tensor::<i32>()?.1.to_vec()),
            TensorElementType::Bool => TensorData::Bool(value.try_extract_tensor::<bool>()?.1.to_vec()),
            TensorElementType::String => TensorData::Bytes(value.try_extract_strings()?.1),
            other => {
                return Err(InferenceError::Runtime(format!(
                    "output `{name}` has unsupported type {other:?}"
                )));
            }
        };
        Ok(Self {
            name: name.to_owned(),
            shape,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nested_and_flat_data_are_accepted_when_the_shape_matches() {
        let nested = Tensor::from_json("x", "INT64", &[2, 2], &json!([[1, 2], [3, 4]])).unwrap();
        let flat = Tensor::from_json("x", "INT64", &[2, 2], &json!([1, 2, 3, 4])).unwrap();
        assert_eq!(nested, flat);
        assert_eq!(nested.data, TensorData::Int64(vec![1, 2, 3, 4]));
    }

    #[test]
    fn rows_of_several_calls_join_and_come_apart_as_they_were() {
        let ids =
            |shape: &[i64], data: serde_json::Value| Tensor::from_json("ids", "INT64", shape, &data).unwrap();
        let (one, two) = (
            ids(&[1, 3], json!([1, 2, 3])),
            ids(&[2, 3], json!([4, 5, 6, 7, 8, 9])),
        );
        let joined = Tensor::concat_rows(&[&one, &two]).expect("same rows");
        assert_eq!(joined.shape, [3, 3]);
        assert_eq!(joined.data, TensorData::Int64((1..=9).collect()));
        assert_eq!(joined.split_rows(&[1, 2]), Some(vec![one.clone(), two.clone()]));

        // Rows of another width, name or datatype do not join.
        assert_eq!(Tensor::concat_rows(&[&one, &ids(&[1, 2], json!([1, 2]))]), None);
        let mask = Tensor::from_json("mask", "INT64", &[1, 3], &json!([1, 1, 1])).unwrap();
        assert_eq!(Tensor::concat_rows(&[&one, &mask]), None);
        let floats = Tensor::from_json("ids", "FP32", &[1, 3], &json!([1, 2, 3])).unwrap();
        assert_eq!(Tensor::concat_rows(&[&one, &floats]), None);
        // An output without one row per input row (a first dimension that is not the batch's) does
        // not split.
        assert_eq!(two.clone().split_rows(&[1, 2]), None);
        assert_eq!(ids(&[3], json!([1, 2, 3])).split_rows(&[1, 1]), None);
        assert_eq!(Tensor::concat_rows(&[]), None);
    }

    #[test]
    fn binary_tensors_round_trip() {
        let ints = TensorData::Int64(vec![1, -2, 3]);
        let decoded = Tensor::from_binary("x", "INT64", &[3], &ints.to_binary()).unwrap();
        assert_eq!(decoded.data, ints);
        let strings = TensorData::Bytes(vec!["hé".into(), String::new()]);
        assert_eq!(
            Tensor::from_binary("s", "BYTES", &[2], &strings.to_binary())
                .unwrap()
                .data,
            strings
        );
        let err = Tensor::from_binary("x", "FP32", &[2], &[0; 7])
            .unwrap_err()
            .to_string();
        assert!(err.contains("8 bytes"), "{err}");
    }

    #[test]
    fn mismatches_are_named() {
        let err = Tensor::from_json("ids", "INT64", &[2, 3], &json!([1, 2, 3]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ids") && err.contains("6 elements"), "{err}");
        let err = Tensor::from_json("ids", "INT64", &[1], &json!(["a"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("integers"), "{err}");
        let err = Tensor::from_json("ids", "COMPLEX", &[1], &json!([1]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("COMPLEX"), "{err}");
        assert!(Tensor::from_json("x", "FP32", &[-1], &json!([])).is_err());
    }

    #[test]
    fn strings_with_a_nul_are_the_callers_mistake() {
        let err = Tensor::from_json("text", "BYTES", &[2], &json!(["fine", "a\0b"])).unwrap_err();
        assert!(matches!(err, InferenceError::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains("NUL"), "{err}");
        let mut bytes = Vec::new();
        for item in [&b"fine"[..], b"a\0b"] {
            bytes.extend_from_slice(&u32::try_from(item.len()).unwrap().to_le_bytes());
            bytes.extend_from_slice(item);
        }
        let err = Tensor::from_binary("text", "BYTES", &[2], &bytes).unwrap_err();
        assert!(err.to_string().contains("NUL"), "{err}");
        assert!(Tensor::from_json("text", "BYTES", &[2], &json!(["fine", "ab"])).is_ok());
    }
}
