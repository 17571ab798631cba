"""Builds the two built-in models from all-MiniLM-L6-v2 (int8 ONNX) and the committed sentiment head.

- minilm-embed.onnx: the base model + mask-aware mean pooling + L2 normalisation.
  Output `sentence_embedding` [batch, 384].
- sentiment.onnx: the same, plus the head (MatMul + Add + Softmax).
  Outputs `sentence_embedding` [batch, 384] and `probs` [batch, 3] (negative, neutral, positive).

The base model stores its weights as int8 but multiplies in float: each weight matrix is cast and
scaled, which ONNX Runtime folds into float32 matrices when it loads the model. On a CPU these two
multiply in integers instead (`integer_matmuls`): each token is quantized to 8 bits, the weights to
7, a quarter of the weight bytes per run and 1.6-2.4x faster. ONNX
Runtime's CUDA provider has no kernels for that, so `*.gpu.onnx` keep the float products for GPUs.
The CPU graphs also transpose each layer's keys in one node (`transposed_keys`).

Usage: python assemble.py BASE.onnx HEAD.json OUT_DIR
The output is byte-for-byte reproducible from the same inputs.
"""

import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def pooled(base):
    graph = base.graph
    hidden = graph.output[0].name
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["pool_mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pool_mask_f", "pool_axis_last"], ["pool_mask_e"]),
        helper.make_node("Mul", [hidden, "pool_mask_e"], ["pool_masked"]),
        helper.make_node("ReduceSum", ["pool_masked", "pool_axis_seq"], ["pool_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["pool_mask_e", "pool_axis_seq"], ["pool_count_raw"], keepdims=0),
        helper.make_node("Max", ["pool_count_raw", "pool_epsilon"], ["pool_count"]),
        helper.make_node("Div", ["pool_sum", "pool_count"], ["pool_mean"]),
        helper.make_node("LpNormalization", ["pool_mean"], ["sentence_embedding"], axis=1, p=2),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "pool_axis_last"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "pool_axis_seq"),
        numpy_helper.from_array(np.array([1e-9], dtype=np.float32), "pool_epsilon"),
    ]
    model = onnx.ModelProto()
    model.CopyFrom(base)
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)
    del model.graph.output[:]
    model.graph.output.append(
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 384])
    )
    return model


def with_head(embed_model, head):
    weight = np.array(head["weight"], dtype=np.float32).T  # [384, 3]
    bias = np.array(head["bias"], dtype=np.float32)
    model = onnx.ModelProto()
    model.CopyFrom(embed_model)
    model.graph.node.extend(
        [
            helper.make_node("MatMul", ["sentence_embedding", "head_weight"], ["head_scores"]),
            helper.make_node("Add", ["head_scores", "head_bias"], ["head_logits"]),
            helper.make_node("Softmax", ["head_logits"], ["probs"], axis=1),
        ]
    )
    model.graph.initializer.extend(
        [numpy_helper.from_array(weight, "head_weight"), numpy_helper.from_array(bias, "head_bias")]
    )
    model.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(head["labels"])]))
    return model


def producers_and_readers(graph):
    """The node that makes each value, and how many nodes read each."""
    producer = {output: node for node in graph.node for output in node.output}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return producer, readers


def integer_matmuls(model):
    """Rewrites each MatMul by a weight stored as int8 with a scale per output column,
    `X @ (float(Wq) * s)`, to multiply in integers: each row of X (a token) is quantized to 8 bits
    with a scale of its own, `r = max|row| / 127`, `Xq = round(X / r) + 128`, the weights to 7 bits,
    `W7 = round(Wq / 2)`, and `Y = float(MatMulInteger(Xq, W7, 128)) * 2s * r`. Exact up to that
    rounding.

    Per token rather than per tensor (as `DynamicQuantizeLinear` does): with one scale for the
    whole batch, a text's answer would depend on the other texts of its run, another tenant's
    among them. Weights in 7 bits (ONNX Runtime's `reduce_range`): without VNNI (AVX2, AVX-512
    before Cascade Lake) its uint8 x int8 kernel adds pairs of products in 16 bits, saturating, and
    255 * 63 * 2 fits where 255 * 127 * 2 does not. The two scales are applied one after the other:
    ONNX Runtime fuses a single scale into the product as if it were one number for all rows.

    An input read by several products (an attention layer's query, key and value) is quantized once
    for all of them: the same numbers, 108 fewer nodes. A run of one short text is mostly the fixed
    cost of its nodes, so that makes it about 7 % faster. For the same reason `QuantizeLinear` (scale
    1, zero point 128) rounds, shifts, saturates and casts the scaled tokens in one node: the same
    numbers. Only standard ONNX operators, so that a tenant's exported model runs anywhere."""
    graph = model.graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer, readers = producers_and_readers(graph)

    def int8_weight(name):
        """(Mul, Cast, scale) of `Mul(Cast(int8 matrix), scale per column)` read only by one MatMul."""
        mul = producer.get(name)
        if mul is None or mul.op_type != "Mul" or readers.get(name) != 1:
            return None
        for cast_out, scale in (mul.input, mul.input[::-1]):
            cast = producer.get(cast_out)
            if (
                cast is not None
                and cast.op_type == "Cast"
                and readers.get(cast_out) == 1
                and cast.input[0] in initializers
                and initializers[cast.input[0]].dtype == np.int8
                and scale in initializers
            ):
                weight, factor = initializers[cast.input[0]], initializers[scale]
                columns = weight.shape[-1]
                if weight.ndim == 2 and factor.size in (1, columns) and factor.shape[-1:] in ((), (1,), (columns,)):
                    return mul, cast, scale
        return None

    constants = {
        "int8_tiny": np.array(1e-12, np.float32),
        "int8_127": np.array(127.0, np.float32),
        "int8_one": np.array(1.0, np.float32),
        "int8_zero_point": np.array(128, np.uint8),
    }
    nodes, dropped, replaced = [], set(), set()
    quantized = {}  # input -> (its tokens in 8 bits, their scales)
    for node in graph.node:
        found = int8_weight(node.input[1]) if node.op_type == "MatMul" else None
        if found is None:
            nodes.append(node)
            continue
        mul, cast, scale = found
        dropped.update({id(mul), id(cast)})
        replaced.update({cast.input[0], scale})
        x, p = node.input[0], f"{node.output[0]}_int8_"
        weight = np.clip(np.round(initializers[cast.input[0]] / 2), -63, 63).astype(np.int8)
        constants[p + "weight"] = weight
        constants[p + "column_scale"] = (initializers[scale] * 2).astype(np.float32)
        if x not in quantized:
            quantized[x] = (p + "x", p + "row_scale")  # named after its first reader
            nodes += [
                helper.make_node("Abs", [x], [p + "abs"]),
                helper.make_node("ReduceMax", [p + "abs"], [p + "max"], axes=[-1], keepdims=1),
                helper.make_node("Max", [p + "max", "int8_tiny"], [p + "max_nonzero"]),
                helper.make_node("Div", [p + "max_nonzero", "int8_127"], [p + "row_scale"]),
                helper.make_node("Div", [x, p + "row_scale"], [p + "scaled"]),
                # Rounds half to even (as `Round`), adds 128 and saturates to 0-255, in one node.
                helper.make_node("QuantizeLinear", [p + "scaled", "int8_one", "int8_zero_point"], [p + "x"]),
            ]
        x_int8, row_scale = quantized[x]
        nodes += [
            helper.make_node("MatMulInteger", [x_int8, p + "weight", "int8_zero_point"], [p + "product"]),
            helper.make_node("Cast", [p + "product"], [p + "product_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [p + "product_f", p + "column_scale"], [p + "by_column"]),
            helper.make_node("Mul", [p + "by_column", row_scale], [node.output[0]]),
        ]
    if not replaced:
        raise SystemExit("no int8 weight matrices found: is this the expected base model?")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(node for node in nodes if id(node) not in dropped)
    still_read = {name for node in out.graph.node for name in node.input}
    kept = [i for i in out.graph.initializer if i.name not in replaced or i.name in still_read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    out.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    return out


def transposed_keys(model):
    """Turns each attention layer's keys, `[batch, tokens, heads, size]`, into `[batch, heads, size,
    tokens]` with one `Transpose`, where the exported graph transposes, reshapes to three dimensions,
    transposes again and reshapes back, reading the shapes it needs on the way (nine nodes more a
    layer). The same numbers in the same places: 54 fewer nodes, and the constants only they read."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producer, readers = producers_and_readers(graph)

    def perm(node):
        return [list(a.ints) for a in node.attribute if a.name == "perm"]

    def step(name, op):
        """The node that makes `name`, if it is `op` and `name` has no other reader."""
        node = producer.get(name)
        return node if node is not None and node.op_type == op and readers.get(name) == 1 else None

    replaced = {}
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        inner = step(node.input[0], "Transpose")
        flat = inner and perm(inner) == [[0, 2, 1]] and step(inner.input[0], "Reshape")
        heads = flat and producer.get(flat.input[0])
        if not heads or heads.op_type != "Transpose" or perm(heads) != [[0, 2, 1, 3]]:
            continue
        replaced[id(node)] = helper.make_node("Transpose", [heads.input[0]], [node.output[0]], perm=[0, 2, 3, 1])
    layers = sum(node.op_type == "Softmax" for node in graph.node)
    if len(replaced) != layers:
        raise SystemExit(f"keys transposed in {len(replaced)} of {layers} attention layers: is this the expected base model?")
    nodes = [replaced.get(id(node), node) for node in graph.node]
    # What only the old steps read (the shapes, the first transpose) goes with them.
    outputs = {output.name for output in graph.output}
    while True:
        read = outputs | {name for node in nodes for name in node.input}
        kept = [node for node in nodes if any(output in read for output in node.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del graph.node[:]
    graph.node.extend(nodes)
    read = {name for node in nodes for name in node.input}
    kept = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out


def main(base_path, head_path, out_dir):
    base = onnx.load(base_path)
    with open(head_path) as f:
        head = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    float_products = pooled(base)
    cpu = transposed_keys(integer_matmuls(float_products))
    for suffix, embed_model in ((".onnx", cpu), (".gpu.onnx", float_products)):
        onnx.checker.check_model(embed_model)
        onnx.save(embed_model, os.path.join(out_dir, "minilm-embed" + suffix))
        sentiment = with_head(embed_model, head)
        onnx.checker.check_model(sentiment)
        onnx.save(sentiment, os.path.join(out_dir, "sentiment" + suffix))


if __name__ == "__main__":
    main(*sys.argv[1:4])
