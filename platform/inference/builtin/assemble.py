"""Builds the two built-in models from all-MiniLM-L6-v2 (int8 ONNX) and the committed sentiment head.

- minilm-embed.onnx: the base model + mask-aware mean pooling + L2 normalisation.
  Output `sentence_embedding` [batch, 384].
- sentiment.onnx: the same, plus the head (MatMul + Add + Softmax).
  Outputs `sentence_embedding` [batch, 384] and `probs` [batch, 3] (negative, neutral, positive).

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


def main(base_path, head_path, out_dir):
    base = onnx.load(base_path)
    with open(head_path) as f:
        head = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    embed_model = pooled(base)
    onnx.checker.check_model(embed_model)
    onnx.save(embed_model, os.path.join(out_dir, "minilm-embed.onnx"))
    sentiment = with_head(embed_model, head)
    onnx.checker.check_model(sentiment)
    onnx.save(sentiment, os.path.join(out_dir, "sentiment.onnx"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
