"""Helpers shared by the tests (tests/ is on pytest's path, so they import as support.<module>): map comparisons
(comparisons), float64 torch references (reference), processes and sockets of the commands under test (processes,
sockets, serving), the tiny ONNX model the torch-free tests build (tiny_onnx), hostile images (images), a bundle and
a folder of photos (folders); the two-node Ray cluster is examples/two_nodes.py."""
