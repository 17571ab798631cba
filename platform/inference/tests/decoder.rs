//! The tensor decoders against arbitrary input: they never panic, never accept data that does not
//! match the shape, and never allocate more than a small multiple of what they were given, whatever
//! the shape claims. A run is bounded (proptest's case count), so it belongs in every test run.

#![allow(clippy::unwrap_used)]

use std::alloc::System;

use plinth_inference::{Tensor, TensorData};
use proptest::prelude::*;
use serde_json::Value;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const DATATYPES: [&str; 7] = ["FP32", "FP16", "INT64", "INT32", "BOOL", "BYTES", "UINT8"];

/// Shapes an attacker would send: huge, negative, overflowing, zero next to huge, deep.
fn shapes() -> impl Strategy<Value = Vec<i64>> {
    let dimension = prop_oneof![
        0i64..8,
        Just(0),
        Just(1 << 31),
        Just(1 << 40),
        Just(i64::MAX),
        Just(-1),
        any::<i64>(),
    ];
    prop::collection::vec(dimension, 0..20)
}

fn json_data() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<f32>().prop_map(|x| Value::from(f64::from(x))),
        any::<bool>().prop_map(Value::from),
        "[a-z]{0,4}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 64, 8, |inner| {
        prop::collection::vec(inner, 0..8).prop_map(Value::Array)
    })
}

fn product(shape: &[i64]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(usize::try_from(*d).ok()?))
}

/// Bytes allocated by `decode`, beside its result.
fn measured<T>(decode: impl FnOnce() -> T) -> (T, usize) {
    let region = Region::new(GLOBAL);
    let out = decode();
    (out, region.change().bytes_allocated)
}

/// Generous for the decoded vector, its growth and an error message that prints the shape; nothing
/// near what an absurd shape would reserve.
fn allowance(input_bytes: usize, shape: &[i64]) -> usize {
    64 * input_bytes + 64 * shape.len() * 24 + (16 << 10)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    fn binary_decoding_is_bounded_by_its_input(
        datatype in prop::sample::select(&DATATYPES[..]),
        shape in shapes(),
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let (decoded, allocated) = measured(|| Tensor::from_binary("x", datatype, &shape, &bytes));
        prop_assert!(allocated <= allowance(bytes.len(), &shape), "{allocated} bytes for {} input bytes", bytes.len());
        if let Ok(tensor) = decoded {
            prop_assert_eq!(Some(tensor.data.len()), product(&shape));
            prop_assert_eq!(tensor.data.datatype().as_str(), datatype);
            if datatype != "BOOL" {
                // BOOL decodes any non-zero byte as true, so only its length survives the trip.
                prop_assert_eq!(tensor.data.to_binary(), bytes);
            }
        }
    }

    fn json_decoding_is_bounded_by_its_input(
        datatype in prop::sample::select(&DATATYPES[..]),
        shape in shapes(),
        data in json_data(),
    ) {
        let size = data.to_string().len();
        let (decoded, allocated) = measured(|| Tensor::from_json("x", datatype, &shape, &data));
        prop_assert!(allocated <= allowance(size, &shape), "{allocated} bytes for {size} input bytes");
        if let Ok(tensor) = decoded {
            prop_assert_eq!(Some(tensor.data.len()), product(&shape));
        }
    }

    fn well_formed_tensors_round_trip(
        values in prop::collection::vec(any::<i32>(), 1..64),
        // Any text but a NUL, which ONNX Runtime's strings cannot hold (refused, tested in `tensor`).
        strings in prop::collection::vec("[^\\x00]{0,6}", 1..16),
    ) {
        let shape = [1, i64::try_from(values.len()).unwrap()];
        let ints = TensorData::Int32(values);
        prop_assert_eq!(Tensor::from_binary("x", "INT32", &shape, &ints.to_binary()).unwrap().data, ints.clone());
        prop_assert_eq!(Tensor::from_json("x", "INT32", &shape, &ints.to_json()).unwrap().data, ints);
        let shape = [i64::try_from(strings.len()).unwrap()];
        let texts = TensorData::Bytes(strings);
        prop_assert_eq!(Tensor::from_binary("x", "BYTES", &shape, &texts.to_binary()).unwrap().data, texts.clone());
        prop_assert_eq!(Tensor::from_json("x", "BYTES", &shape, &texts.to_json()).unwrap().data, texts);
    }
}

/// One test, so that nothing else allocates while a decode is measured (the count is process-wide).
#[test]
fn decoders_are_bounded_by_their_input() {
    the_shapes_that_aborted_the_process_are_refused();
    binary_decoding_is_bounded_by_its_input();
    json_decoding_is_bounded_by_its_input();
    well_formed_tensors_round_trip();
}

/// The request that used to abort the process: terabytes reserved from the shape alone.
fn the_shapes_that_aborted_the_process_are_refused() {
    let empty = Value::Array(Vec::new());
    for datatype in &DATATYPES[..6] {
        for shape in [
            vec![1, 1 << 40],
            vec![0, 1 << 40],
            vec![1 << 31, 1 << 31, 1 << 31],
            vec![i64::MAX, 2],
        ] {
            let (json, allocated) = measured(|| Tensor::from_json("x", datatype, &shape, &empty));
            let err = json.unwrap_err().to_string();
            assert!(err.contains("elements"), "{datatype} {shape:?}: {err}");
            assert!(allocated < 4096, "{allocated}");
            let binary = Tensor::from_binary("x", datatype, &shape, &[])
                .unwrap_err()
                .to_string();
            assert!(binary.contains("elements"), "{datatype} {shape:?}: {binary}");
        }
    }
    let lying_bytes = [0xff, 0xff, 0xff, 0xff, b'a'];
    let err = Tensor::from_binary("x", "BYTES", &[1], &lying_bytes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("runs past"), "{err}");
}
