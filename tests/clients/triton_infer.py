"""Drives a Plinth server with NVIDIA's own Triton HTTP client (PyPI tritonclient[http]), unchanged: proof
that the Open Inference Protocol v2 endpoints are compatible, with JSON tensors and with the binary
tensor extension (the client's default). Run by the integration test
`inference::the_triton_client_works_unchanged`; prints the sentiment labels it got as JSON.

Usage: python triton_infer.py HOST:PORT API_KEY
"""

import json
import sys

import numpy as np
import tritonclient.http as triton

LABELS = ["negative", "neutral", "positive"]
# "I love this product" and "this is terrible", tokenized with the model's tokenizer.json (padded).
INPUT_IDS = [[101, 1045, 2293, 2023, 4031, 102], [101, 2023, 2003, 6659, 102, 0]]
ATTENTION = [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]


def main(url, key):
    headers = {"Authorization": f"Bearer {key}"}
    client = triton.InferenceServerClient(url=url)
    assert client.is_server_live(headers=headers)
    assert client.is_server_ready(headers=headers)
    server = client.get_server_metadata(headers=headers)
    assert server["name"] == "plinth" and "binary_tensor_data" in server["extensions"], server
    assert client.is_model_ready("sentiment", headers=headers)
    metadata = client.get_model_metadata("sentiment", headers=headers)
    assert [i["name"] for i in metadata["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"], metadata

    arrays = {
        "input_ids": np.array(INPUT_IDS, dtype=np.int64),
        "attention_mask": np.array(ATTENTION, dtype=np.int64),
        "token_type_ids": np.zeros((2, 6), dtype=np.int64),
    }
    labels = {}
    # JSON tensors, then the client's default: the binary tensor extension both ways.
    for mode, binary in (("json", False), ("binary", True)):
        inputs = []
        for name, array in arrays.items():
            tensor = triton.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array, binary_data=binary)
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput("probs", binary_data=binary)]
        result = client.infer("sentiment", inputs, outputs=outputs, headers=headers, request_id=f"triton-{mode}")
        probs = result.as_numpy("probs")
        assert probs.shape == (2, 3), probs.shape
        assert result.get_response()["id"] == f"triton-{mode}"
        labels[mode] = [LABELS[int(row.argmax())] for row in probs]
    print(json.dumps(labels))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
