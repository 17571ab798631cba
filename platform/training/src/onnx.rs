//! Appends a trained head to a base embedding graph, giving one self-contained ONNX model: the base's
//! `sentence_embedding` [batch, dim] goes through `MatMul` + `Add` + `Softmax` to a new output
//! `probs` [batch, labels].
//!
//! Protobuf merges a repeated appearance of a message field into the first, concatenating repeated
//! fields: so the base model's bytes followed by one more `graph` field holding only the new nodes,
//! initializers and output are the base graph extended by them. That needs an encoder for a handful of
//! ONNX messages (below), not the schema compiled with a protobuf toolchain, and it leaves the base's
//! bytes as they are.

use crate::head::Head;

/// The output the head adds.
pub const PROBS: &str = "probs";
/// The base model's output the head reads.
pub const EMBEDDING: &str = "sentence_embedding";

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    varint(out, (field << 3) | wire_type);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn int_field(out: &mut Vec<u8>, field: u64, value: i64) {
    key(out, field, 0);
    #[expect(
        clippy::cast_sign_loss,
        reason = "protobuf encodes negative int64 as its two's complement"
    )]
    varint(out, value as u64);
}

/// `NodeProto`: inputs 1, outputs 2, op_type 4, attribute 5 (`AttributeProto`: name 1, i 3, type 20).
fn node(op: &str, inputs: &[&str], output: &str, int_attribute: Option<(&str, i64)>) -> Vec<u8> {
    let mut out = Vec::new();
    for input in inputs {
        bytes_field(&mut out, 1, input.as_bytes());
    }
    bytes_field(&mut out, 2, output.as_bytes());
    bytes_field(&mut out, 4, op.as_bytes());
    if let Some((name, value)) = int_attribute {
        let mut attribute = Vec::new();
        bytes_field(&mut attribute, 1, name.as_bytes());
        int_field(&mut attribute, 3, value);
        int_field(&mut attribute, 20, 2); // AttributeProto.INT
        bytes_field(&mut out, 5, &attribute);
    }
    out
}

/// `TensorProto` of floats: dims 1, data_type 2 (FLOAT = 1), name 8, raw_data 9 (little-endian).
fn float_tensor(name: &str, dims: &[usize], values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &d in dims {
        int_field(&mut out, 1, i64::try_from(d).unwrap_or(i64::MAX));
    }
    int_field(&mut out, 2, 1);
    bytes_field(&mut out, 8, name.as_bytes());
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    bytes_field(&mut out, 9, &raw);
    out
}

/// `ValueInfoProto` of a float tensor [batch, width]: name 1, type 2 → `TypeProto.tensor_type` 1 →
/// elem_type 1, shape 2 → dim 1 → dim_param 2 / dim_value 1.
fn float_matrix_info(name: &str, width: usize) -> Vec<u8> {
    let mut batch = Vec::new();
    bytes_field(&mut batch, 2, b"batch");
    let mut columns = Vec::new();
    int_field(&mut columns, 1, i64::try_from(width).unwrap_or(i64::MAX));
    let mut shape = Vec::new();
    bytes_field(&mut shape, 1, &batch);
    bytes_field(&mut shape, 1, &columns);
    let mut tensor = Vec::new();
    int_field(&mut tensor, 1, 1);
    bytes_field(&mut tensor, 2, &shape);
    let mut type_proto = Vec::new();
    bytes_field(&mut type_proto, 1, &tensor);
    let mut out = Vec::new();
    bytes_field(&mut out, 1, name.as_bytes());
    bytes_field(&mut out, 2, &type_proto);
    out
}

/// The base embedding model with `head` appended (see the module's documentation).
#[must_use]
pub fn with_head(base: &[u8], head: &Head) -> Vec<u8> {
    let (k, dim) = (head.labels.len(), head.dim);
    // MatMul wants [dim, labels]: the head's rows transposed.
    let mut transposed = vec![0.0_f32; dim * k];
    for label in 0..k {
        for d in 0..dim {
            transposed[d * k + label] = head.weight[label * dim + d];
        }
    }
    let mut graph = Vec::new();
    bytes_field(
        &mut graph,
        1,
        &node("MatMul", &[EMBEDDING, "head_weight"], "head_scores", None),
    );
    bytes_field(
        &mut graph,
        1,
        &node("Add", &["head_scores", "head_bias"], "head_logits", None),
    );
    bytes_field(
        &mut graph,
        1,
        &node("Softmax", &["head_logits"], PROBS, Some(("axis", 1))),
    );
    bytes_field(
        &mut graph,
        5,
        &float_tensor("head_weight", &[dim, k], &transposed),
    );
    bytes_field(&mut graph, 5, &float_tensor("head_bias", &[k], &head.bias));
    bytes_field(&mut graph, 12, &float_matrix_info(PROBS, k));
    let mut model = base.to_vec();
    bytes_field(&mut model, 7, &graph);
    model
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_the_protobuf_encoding() {
        let encode = |v: u64| {
            let mut out = Vec::new();
            varint(&mut out, v);
            out
        };
        assert_eq!(encode(1), [1]);
        assert_eq!(encode(300), [0xac, 0x02]);
        let mut negative = Vec::new();
        int_field(&mut negative, 1, -1);
        assert_eq!(negative.len(), 1 + 10);
    }

    #[test]
    fn the_head_is_one_more_graph_field_after_the_base() {
        let head = Head {
            labels: vec!["a".into(), "b".into()],
            dim: 2,
            weight: vec![1.0, 2.0, 3.0, 4.0],
            bias: vec![0.5, -0.5],
        };
        let base = b"\x08\x07".to_vec(); // ir_version 7
        let model = with_head(&base, &head);
        assert!(model.starts_with(&base));
        assert_eq!(model[base.len()], (7 << 3) | 2);
        // The transposed weights, little-endian, in order [w00, w10, w01, w11].
        let raw: Vec<u8> = [1.0_f32, 3.0, 2.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(model.windows(raw.len()).any(|w| w == raw.as_slice()));
    }
}
