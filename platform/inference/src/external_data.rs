//! Finds tensors in an ONNX model that keep their data outside the model ("external data"). ONNX
//! Runtime would read such data from files beside the model, or, for its in-memory tag, from a raw
//! process address: an uploaded model must carry all of its data, so a tenant's model that refers to
//! any is refused before ONNX Runtime sees it.
//!
//! A walk over the protobuf wire format, through every place a `TensorProto` can sit (initializers,
//! sparse initializers, `Constant`-style attributes, subgraphs of `If`/`Loop`/`Scan`, functions).
//! Written here rather than generating the ONNX schema with a protobuf compiler: only these few field
//! numbers matter, and the walk allocates nothing.

/// What a message is, for the fields that lead to tensors.
#[derive(Clone, Copy)]
enum Message {
    Model,
    TrainingInfo,
    Function,
    Graph,
    Node,
    Attribute,
    SparseTensor,
    Tensor,
}

impl Message {
    /// The message a length-delimited field of this message holds, when it can lead to a tensor.
    fn child(self, field: u64) -> Option<Self> {
        use Message::{Attribute, Function, Graph, Model, Node, SparseTensor, Tensor, TrainingInfo};
        match (self, field) {
            (Model, 7) | (TrainingInfo, 1 | 2) | (Attribute, 6 | 11) => Some(Graph),
            (Model, 20) => Some(TrainingInfo),
            (Model, 25) => Some(Function),
            (Function, 7) | (Graph, 1) => Some(Node),
            (Graph, 5) | (Attribute, 5 | 10) | (SparseTensor, 1 | 2) => Some(Tensor),
            (Graph, 15) | (Attribute, 22 | 23) => Some(SparseTensor),
            (Node, 5) | (Function, 11) => Some(Attribute),
            _ => None,
        }
    }
}

/// Nesting deeper than this (subgraphs in subgraphs...) is refused rather than followed.
const MAX_DEPTH: usize = 64;

/// Whether the serialized model refers to external data anywhere.
///
/// # Errors
/// When the bytes are not a well-formed protobuf message (or nest past [`MAX_DEPTH`]).
pub(crate) fn refers_to_external_data(model: &[u8]) -> Result<bool, String> {
    walk(model, Message::Model, 0)
}

fn walk(mut bytes: &[u8], message: Message, depth: usize) -> Result<bool, String> {
    if depth > MAX_DEPTH {
        return Err(format!("the model nests graphs more than {MAX_DEPTH} deep"));
    }
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let (field, wire_type) = (key >> 3, key & 7);
        match wire_type {
            0 => {
                let value = varint(&mut bytes)?;
                // TensorProto.data_location = EXTERNAL (1).
                if matches!(message, Message::Tensor) && field == 14 && value == 1 {
                    return Ok(true);
                }
            }
            1 => bytes = bytes.get(8..).ok_or("truncated protobuf")?,
            5 => bytes = bytes.get(4..).ok_or("truncated protobuf")?,
            2 => {
                let length = usize::try_from(varint(&mut bytes)?).map_err(|_| "protobuf length overflows")?;
                let (inner, rest) = bytes.split_at_checked(length).ok_or("truncated protobuf")?;
                bytes = rest;
                // TensorProto.external_data: any entry names an outside location.
                if matches!(message, Message::Tensor) && field == 13 {
                    return Ok(true);
                }
                if let Some(child) = message.child(field)
                    && walk(inner, child, depth + 1)?
                {
                    return Ok(true);
                }
            }
            other => return Err(format!("unsupported protobuf wire type {other}")),
        }
    }
    Ok(false)
}

fn varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first().ok_or("truncated protobuf")?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("protobuf varint longer than 10 bytes".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint_bytes(mut value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    fn field(number: u64, body: &[u8]) -> Vec<u8> {
        let mut out = varint_bytes(number << 3 | 2);
        out.extend(varint_bytes(body.len() as u64));
        out.extend_from_slice(body);
        out
    }

    fn location_external() -> Vec<u8> {
        // data_location (14) = EXTERNAL (1)
        let mut tensor = varint_bytes(14 << 3);
        tensor.push(1);
        tensor
    }

    #[test]
    fn finds_external_data_wherever_a_tensor_can_be() {
        let tensor = location_external();
        let initializer = field(7, &field(5, &tensor));
        let in_subgraph = field(7, &field(1, &field(5, &field(6, &field(5, &tensor)))));
        let sparse = field(7, &field(15, &field(1, &tensor)));
        let named = field(7, &field(5, &field(13, &field(1, b"location"))));
        let in_function = field(25, &field(7, &field(5, &field(5, &tensor))));
        for model in [initializer, in_subgraph, sparse, named, in_function] {
            assert_eq!(refers_to_external_data(&model), Ok(true));
        }
    }

    #[test]
    fn plain_models_and_unrelated_fields_pass() {
        // A raw_data initializer (field 9), a node with a float attribute, a doc string.
        let tensor = field(9, &[0, 0, 128, 63]);
        let model = [
            field(7, &field(5, &tensor)),
            field(6, b"docs"),
            field(7, &field(1, &field(5, b""))),
        ]
        .concat();
        assert_eq!(refers_to_external_data(&model), Ok(false));
        // Field 14 outside a tensor means something else.
        let mut elsewhere = varint_bytes(14 << 3);
        elsewhere.push(1);
        assert_eq!(refers_to_external_data(&elsewhere), Ok(false));
    }

    #[test]
    fn malformed_bytes_are_errors_not_panics() {
        for bytes in [
            &[0x0a, 0x05, 1][..],
            &[0xff; 11][..],
            &[0x0b][..],
            &[0x09, 1, 2][..],
        ] {
            assert!(refers_to_external_data(bytes).is_err(), "{bytes:?}");
        }
        // A graph whose node's attribute holds a graph whose node's..., a hundred times over.
        let mut graph = field(5, &location_external());
        for _ in 0..100 {
            graph = field(1, &field(5, &field(6, &graph)));
        }
        assert!(refers_to_external_data(&field(7, &graph)).is_err());
    }
}
