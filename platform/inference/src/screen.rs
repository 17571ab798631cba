//! What an uploaded graph may not contain, found before ONNX Runtime sees it.
//!
//! - **External data**: tensors that keep their data outside the model. ONNX Runtime would read such
//!   data from files beside the model (another tenant's model) or, for its in-memory tag, from a raw
//!   process address: an uploaded model must carry all of its data.
//! - **Text** (`STRING` tensors): a string's characters live outside what a run allocates from the
//!   bounded arena (see `arena`), so `Expand` over one long string could still take any amount of
//!   memory. A tenant's graph may not take, hold or make text: no string inputs, outputs, declared
//!   values or tensors, no `Cast` (or `dtype`) to string, directly or through a function's attribute,
//!   and no attribute holding strings for an operator to emit (`value_string(s)`, the ML domain's
//!   `*_strings`, `default_string`). Text models get their tokens from the platform's tokenizer.
//!
//! - **Operators** that make text from numbers (`CastMap`), work on text, or keep what they make on
//!   the heap rather than in the arena, in maps (`ZipMap`, `DictVectorizer`, `Unique`): see
//!   [`REFUSED_OPERATORS`].
//! - **A `Loop` that collects outputs** from each iteration (an object per iteration on the heap,
//!   millions before the run's deadline); one that only carries values from one iteration to the next
//!   keeps nothing per iteration.
//! - **Sparse tensors**: ONNX Runtime makes them dense as it loads the graph, outside the arena, so a
//!   few bytes declaring a 65,536 x 65,536 one would take 16 GiB.
//! - **ONNX Runtime's own format** (a flatbuffer, which this walk does not read): tenants' sessions are
//!   also told to read ONNX only.
//!
//! Integer fields are compared as the runtime reads them: an `int32` field keeps the low 32 bits of
//! its varint, and ONNX Runtime narrows a `Cast`'s `to` to 32 bits, so `1 << 32 | 8` is a string too.
//!
//! A walk over the protobuf wire format, through every place a tensor or a type can sit (initializers,
//! attributes, inputs, outputs and value infos, subgraphs of `If`/`Loop`/`Scan`,
//! functions). Written here rather than generating the ONNX schema with a protobuf compiler: only these
//! few field numbers matter, and the walk allocates nothing.

/// Why a graph is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    ExternalData,
    Text,
    /// One of [`REFUSED_OPERATORS`].
    Operator(&'static str),
    /// ONNX Runtime's flatbuffer format.
    OrtFormat,
    /// A sparse tensor: the runtime makes it dense, zeros and all, as it loads the graph.
    Sparse,
    /// A `Loop` that collects outputs from each iteration: the runtime keeps an object per iteration
    /// on the heap, as many as the loop runs before its deadline.
    CollectingLoop,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ExternalData => write!(
                f,
                "the model refers to external data; an uploaded model must contain all its tensors"
            ),
            Self::Text => write!(
                f,
                "the model takes, holds or makes text (STRING tensors); an uploaded model works on numbers (a text model gets token ids from its tokenizer)"
            ),
            Self::Operator(operator) => {
                write!(
                    f,
                    "the model uses `{operator}`, which uploaded models may not: it makes or takes text, or keeps what it makes outside the memory a run may use"
                )?;
                if *operator == "ZipMap" {
                    write!(
                        f,
                        " (scikit-learn classifiers: convert with skl2onnx's options={{'zipmap': False}})"
                    )?;
                }
                Ok(())
            }
            Self::OrtFormat => write!(
                f,
                "not an ONNX model: ONNX Runtime's own format is not taken from uploads"
            ),
            Self::Sparse => write!(
                f,
                "the model holds sparse tensors, which ONNX Runtime makes dense as it loads them; store them dense"
            ),
            Self::CollectingLoop => write!(
                f,
                "the model has a Loop that collects an output from each iteration, which ONNX Runtime keeps outside the memory a run may use; carry the values instead"
            ),
        }
    }
}

/// Operators a tenant's graph may not use, whatever their domain: they make text from numbers
/// (`CastMap`), take or make text (the string operators, the `com.microsoft` `Tokenizer`), or build
/// on the heap what their inputs size, tens of bytes per element of a tensor the arena bounds: maps
/// (`ZipMap`, `DictVectorizer`, `Unique`), a tensor object per entry of a sequence (the sequence
/// operators: `SplitToSequence` of an empty tensor makes one per zero it is given), `RoiAlign`'s
/// table of sampling points for boxes as large as the caller sends.
pub(crate) const REFUSED_OPERATORS: [&str; 19] = [
    "CastMap",
    "ZipMap",
    "DictVectorizer",
    "Unique",
    "SplitToSequence",
    "ConcatFromSequence",
    "SequenceAt",
    "SequenceConstruct",
    "SequenceEmpty",
    "SequenceErase",
    "SequenceInsert",
    "SequenceLength",
    "SequenceMap",
    "RoiAlign",
    "StringConcat",
    "StringSplit",
    "StringNormalizer",
    "RegexFullMatch",
    "Tokenizer",
];

/// ONNX's `TensorProto.DataType.STRING`.
const STRING: u64 = 8;

/// What a message is, for the fields that lead to tensors and types.
#[derive(Clone, Copy)]
enum Message {
    Model,
    TrainingInfo,
    Function,
    Graph,
    Node,
    Attribute,
    Tensor,
    ValueInfo,
    Type,
    /// `TypeProto.Tensor` and `TypeProto.SparseTensor`: an element type (field 1) and a shape.
    TensorType,
    /// `TypeProto.Sequence` and `TypeProto.Optional`: a type (field 1).
    Wrapper,
    /// `TypeProto.Map`: a key type (field 1) and a value type (field 2).
    Map,
}

impl Message {
    /// The message a length-delimited field of this message holds, when it can lead to a tensor or
    /// a type.
    fn child(self, field: u64) -> Option<Self> {
        use Message::{
            Attribute, Function, Graph, Map, Model, Node, Tensor, TensorType, TrainingInfo, Type, ValueInfo,
            Wrapper,
        };
        match (self, field) {
            (Model, 7) | (TrainingInfo, 1 | 2) | (Attribute, 6 | 11) => Some(Graph),
            (Model, 20) => Some(TrainingInfo),
            (Model, 25) => Some(Function),
            (Function, 7) | (Graph, 1) => Some(Node),
            (Graph, 5) | (Attribute, 5 | 10) => Some(Tensor),
            (Node, 5) | (Function, 11) => Some(Attribute),
            (Graph, 11..=13) | (Function, 12) => Some(ValueInfo),
            (ValueInfo, 2) | (Attribute, 14 | 15) | (Wrapper, 1) | (Map, 2) => Some(Type),
            (Type, 1 | 8) => Some(TensorType),
            (Type, 4 | 9) => Some(Wrapper),
            (Type, 5) => Some(Map),
            _ => None,
        }
    }
}

/// Nesting deeper than this (subgraphs in subgraphs...) is refused rather than followed.
const MAX_DEPTH: usize = 64;

/// What the serialized model contains that a tenant's model may not (the first found), if anything.
///
/// # Errors
/// When the bytes are not a well-formed protobuf message (or nest past [`MAX_DEPTH`]).
pub(crate) fn screen(model: &[u8]) -> Result<Option<Refusal>, String> {
    // ONNX Runtime takes bytes whose file identifier (bytes 4 to 8) says "ORTM" for its own format.
    if model.get(4..8) == Some(b"ORTM".as_slice()) {
        return Ok(Some(Refusal::OrtFormat));
    }
    walk(model, Message::Model, 0)
}

/// A varint as an `int32` field (or ONNX Runtime's narrowed element type) reads it.
fn low_32_bits(value: u64) -> u64 {
    value & u64::from(u32::MAX)
}

/// An attribute's name and integer, as far as the walk has read it.
#[derive(Default)]
struct AttributeSeen<'a> {
    name: &'a [u8],
    int: Option<u64>,
    /// Its value is a function's attribute (`ref_attr_name`), given where the function is called.
    referenced: bool,
}

impl AttributeSeen<'_> {
    fn makes_text(&self) -> bool {
        let element_type = matches!(self.name, b"to" | b"dtype");
        (element_type && (self.int.map(low_32_bits) == Some(STRING) || self.referenced))
            || self.name.ends_with(b"_string")
            || self.name.ends_with(b"_strings")
    }
}

fn walk(mut bytes: &[u8], message: Message, depth: usize) -> Result<Option<Refusal>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("the model nests graphs more than {MAX_DEPTH} deep"));
    }
    let mut attribute = AttributeSeen::default();
    let mut operator: &[u8] = &[];
    // A node's inputs and outputs (NodeProto fields 1 and 2), counted.
    let (mut inputs, mut outputs) = (0_usize, 0_usize);
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let (field, wire_type) = (key >> 3, key & 7);
        match wire_type {
            0 => {
                let value = varint(&mut bytes)?;
                match (message, field) {
                    // TensorProto.data_location = EXTERNAL (1).
                    (Message::Tensor, 14) if low_32_bits(value) == 1 => {
                        return Ok(Some(Refusal::ExternalData));
                    }
                    // TensorProto.data_type, an element type, a map's key type.
                    (Message::Tensor, 2) | (Message::TensorType | Message::Map, 1)
                        if low_32_bits(value) == STRING =>
                    {
                        return Ok(Some(Refusal::Text));
                    }
                    (Message::Attribute, 3) => attribute.int = Some(value),
                    _ => {}
                }
            }
            1 => bytes = bytes.get(8..).ok_or("truncated protobuf")?,
            5 => bytes = bytes.get(4..).ok_or("truncated protobuf")?,
            2 => {
                let length = usize::try_from(varint(&mut bytes)?).map_err(|_| "protobuf length overflows")?;
                let (inner, rest) = bytes.split_at_checked(length).ok_or("truncated protobuf")?;
                bytes = rest;
                match (message, field) {
                    // TensorProto.external_data: any entry names an outside location.
                    (Message::Tensor, 13) => return Ok(Some(Refusal::ExternalData)),
                    // TensorProto.string_data.
                    (Message::Tensor, 6) => return Ok(Some(Refusal::Text)),
                    // Sparse initializers, a `Constant`'s sparse value, sparse tensors as attributes.
                    (Message::Graph, 15) | (Message::Attribute, 22 | 23) => {
                        return Ok(Some(Refusal::Sparse));
                    }
                    (Message::Attribute, 1) => attribute.name = inner,
                    // NodeProto.op_type, input, output.
                    (Message::Node, 4) => operator = inner,
                    (Message::Node, 1) => inputs += 1,
                    (Message::Node, 2) => outputs += 1,
                    (Message::Attribute, 21) => attribute.referenced = true,
                    _ => {}
                }
                if let Some(child) = message.child(field)
                    && let Some(refusal) = walk(inner, child, depth + 1)?
                {
                    return Ok(Some(refusal));
                }
            }
            other => return Err(format!("unsupported protobuf wire type {other}")),
        }
    }
    if matches!(message, Message::Attribute) && attribute.makes_text() {
        return Ok(Some(Refusal::Text));
    }
    if let Some(refused) = REFUSED_OPERATORS.iter().find(|name| name.as_bytes() == operator) {
        return Ok(Some(Refusal::Operator(refused)));
    }
    // A Loop's inputs are its trip count, its condition and the values it carries; its outputs are
    // the values it carries and then what it collects from each iteration.
    if operator == b"Loop" && outputs > inputs.saturating_sub(2) {
        return Ok(Some(Refusal::CollectingLoop));
    }
    Ok(None)
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
        let named = field(7, &field(5, &field(13, &field(1, b"location"))));
        let in_function = field(25, &field(7, &field(5, &field(5, &tensor))));
        for model in [initializer, in_subgraph, named, in_function] {
            assert_eq!(screen(&model), Ok(Some(Refusal::ExternalData)));
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
        assert_eq!(screen(&model), Ok(None));
        // Field 14 outside a tensor means something else.
        let mut elsewhere = varint_bytes(14 << 3);
        elsewhere.push(1);
        assert_eq!(screen(&elsewhere), Ok(None));
    }

    #[test]
    fn malformed_bytes_are_errors_not_panics() {
        for bytes in [
            &[0x0a, 0x05, 1][..],
            &[0xff; 11][..],
            &[0x0b][..],
            &[0x09, 1, 2][..],
        ] {
            assert!(screen(bytes).is_err(), "{bytes:?}");
        }
        // A graph whose node's attribute holds a graph whose node's..., a hundred times over.
        let mut graph = field(5, &location_external());
        for _ in 0..100 {
            graph = field(1, &field(5, &field(6, &graph)));
        }
        assert!(screen(&field(7, &graph)).is_err());
    }

    fn int_field(number: u64, value: u64) -> Vec<u8> {
        let mut out = varint_bytes(number << 3);
        out.extend(varint_bytes(value));
        out
    }

    /// A node in the main graph with `attribute`.
    fn node_with(attribute: &[u8]) -> Vec<u8> {
        field(7, &field(1, &field(5, attribute)))
    }

    #[test]
    fn finds_text_wherever_a_graph_can_take_hold_or_make_it() {
        let string_tensor = int_field(2, STRING);
        let string_type = field(1, &int_field(1, STRING));
        let cast = [field(1, b"to"), int_field(3, STRING)].concat();
        let cast_from_function = [field(1, b"to"), field(21, b"target")].concat();
        for model in [
            // An initializer, a constant's tensor, a tensor with string_data but no type.
            field(7, &field(5, &string_tensor)),
            node_with(&field(5, &string_tensor)),
            field(7, &field(5, &field(6, b"text"))),
            // An input, an output, a value info, a sequence of strings, a map with string keys.
            field(7, &field(11, &field(2, &string_type))),
            field(7, &field(12, &field(2, &string_type))),
            field(7, &field(13, &field(2, &string_type))),
            field(7, &field(11, &field(2, &field(4, &field(1, &string_type))))),
            field(7, &field(11, &field(2, &field(5, &int_field(1, STRING))))),
            // Cast to string (the attribute's fields in either order), a function's Cast to a type given
            // where it is called, SequenceEmpty of strings.
            node_with(&cast),
            node_with(&[int_field(3, STRING), field(1, b"to")].concat()),
            field(25, &field(7, &field(5, &cast_from_function))),
            node_with(&[field(1, b"dtype"), int_field(3, STRING)].concat()),
            // Strings for an operator to emit.
            node_with(&field(1, b"value_strings")),
            node_with(&field(1, b"classlabels_strings")),
            node_with(&field(1, b"default_string")),
            // In a subgraph.
            field(7, &field(1, &field(5, &field(6, &field(5, &string_tensor))))),
            // A string type in a varint past 32 bits, as the runtime reads it (its low 32 bits).
            field(7, &field(5, &int_field(2, 1 << 32 | STRING))),
            field(
                7,
                &field(11, &field(2, &field(1, &int_field(1, 1 << 32 | STRING)))),
            ),
            node_with(&[field(1, b"to"), int_field(3, 7 << 32 | STRING)].concat()),
        ] {
            assert_eq!(screen(&model), Ok(Some(Refusal::Text)), "{model:?}");
        }
    }

    #[test]
    fn operators_that_make_text_or_heap_maps_and_the_runtimes_own_format_are_refused() {
        // A ZipMap in the main graph; a CastMap inside a function; Unique in a subgraph.
        let zip_map = field(7, &field(1, &field(4, b"ZipMap")));
        assert_eq!(screen(&zip_map), Ok(Some(Refusal::Operator("ZipMap"))));
        let cast_map = field(25, &field(7, &field(4, b"CastMap")));
        assert_eq!(screen(&cast_map), Ok(Some(Refusal::Operator("CastMap"))));
        let unique = field(
            7,
            &field(1, &field(5, &field(6, &field(1, &field(4, b"Unique"))))),
        );
        assert_eq!(screen(&unique), Ok(Some(Refusal::Operator("Unique"))));
        // Bytes that read as a protobuf message (a varint, a fixed64 whose bytes hold "ORTM" where
        // the runtime looks for its format's identifier, a doc string) and as the runtime's format:
        // the walk alone finds nothing in them.
        let mut both = vec![0x08, 0x00, 0x09, 0x00];
        both.extend_from_slice(b"ORTM");
        both.extend_from_slice(&[0, 0, 0]);
        both.extend(field(6, b"the rest of a flatbuffer"));
        assert_eq!(walk(&both, Message::Model, 0), Ok(None));
        assert_eq!(screen(&both), Ok(Some(Refusal::OrtFormat)));
        // Unique's name as another operator's prefix, an ordinary operator: fine.
        for name in [&b"UniqueConsecutive"[..], b"MatMul", b"Cast"] {
            assert_eq!(screen(&field(7, &field(1, &field(4, name)))), Ok(None));
        }
    }

    #[test]
    fn sparse_tensors_are_refused_wherever_they_can_be() {
        let sparse = field(1, &int_field(2, 1));
        for model in [
            field(7, &field(15, &sparse)),
            node_with(&[field(1, b"sparse_value"), field(22, &sparse)].concat()),
            node_with(&field(23, &sparse)),
            field(7, &field(1, &field(5, &field(6, &field(15, &sparse))))),
        ] {
            assert_eq!(screen(&model), Ok(Some(Refusal::Sparse)), "{model:?}");
        }
        // A Loop (trip count, condition, one carried value) that collects a second output; one that
        // only carries its value passes.
        let names = |field_number: u64, count: usize| -> Vec<u8> {
            (0..count)
                .flat_map(|i| field(field_number, format!("v{i}").as_bytes()))
                .collect()
        };
        let collecting = [field(4, b"Loop"), names(1, 3), names(2, 2)].concat();
        assert_eq!(
            screen(&field(7, &field(1, &collecting))),
            Ok(Some(Refusal::CollectingLoop))
        );
        let carrying = [field(4, b"Loop"), names(1, 3), names(2, 1)].concat();
        assert_eq!(screen(&field(7, &field(1, &carrying))), Ok(None));
        for operator in ["SplitToSequence", "SequenceInsert", "RoiAlign"] {
            let model = field(7, &field(1, &field(4, operator.as_bytes())));
            assert_eq!(
                screen(&model),
                Ok(Some(Refusal::Operator(operator))),
                "{operator}"
            );
        }
    }

    #[test]
    fn numbers_and_ordinary_attributes_pass() {
        let float_type = field(1, &int_field(1, 1));
        for model in [
            field(7, &field(11, &field(2, &float_type))),
            field(7, &field(5, &int_field(2, 1))),
            // Cast to float; an axis of 8; string-valued attributes that configure an operator.
            node_with(&[field(1, b"to"), int_field(3, 1)].concat()),
            node_with(&[field(1, b"axis"), int_field(3, STRING)].concat()),
            node_with(&[field(1, b"mode"), field(4, b"constant")].concat()),
            node_with(&[field(1, b"activations"), field(9, b"Sigmoid")].concat()),
        ] {
            assert_eq!(screen(&model), Ok(None), "{model:?}");
        }
    }
}
