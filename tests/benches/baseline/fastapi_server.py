"""The baseline a team would otherwise deploy: FastAPI + onnxruntime serving the same sentiment model
with the same tokenizer, one uvicorn worker. It does less than Plinth (no auth, rate limits or metering).

Usage: python fastapi_server.py MODELS_DIR PORT THREADS
"""

import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from tokenizers import Tokenizer

models, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tokenizer = Tokenizer.from_file(f"{models}/tokenizer.json")
tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
tokenizer.enable_truncation(max_length=128)
options = ort.SessionOptions()
options.intra_op_num_threads = threads
session = ort.InferenceSession(f"{models}/sentiment.onnx", options, providers=["CPUExecutionProvider"])
LABELS = ["negative", "neutral", "positive"]
app = FastAPI()


class TextRequest(BaseModel):
    inputs: list[str]


@app.post("/classify")
def classify(request: TextRequest):
    encodings = tokenizer.encode_batch(request.inputs)
    column = lambda attr: np.array([getattr(e, attr) for e in encodings], dtype=np.int64)
    probs = session.run(
        ["probs"],
        {"input_ids": column("ids"), "attention_mask": column("attention_mask"), "token_type_ids": column("type_ids")},
    )[0]
    return {"results": [{"label": LABELS[int(p.argmax())], "score": float(p.max())} for p in probs]}


@app.get("/health")
def health():
    return {"ok": True}


uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
