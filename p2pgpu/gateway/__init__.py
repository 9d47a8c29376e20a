"""The inference gateway's wire codecs: Open Inference Protocol v2 (KServe/Triton REST) and TF Serving REST.

Pure and sans-I/O: bytes in, typed values out, and the reverse. The routes,
sessions and batching that call these live elsewhere; nothing here imports
FastAPI, Trio or TensorFlow. Every bad input raises a ``GatewayError``
subclass carrying the HTTP status the protocol gives it.
"""
