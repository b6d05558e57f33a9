"""Serving a pruned model elsewhere: plain-transformers loading, ONNX export and ONNX Runtime parity."""
