"""The inference gateway: client nodes answer KServe v2 (Open Inference Protocol) and TF Serving REST requests.

Layers, bottom up: the wire codecs (``oip``, ``tfserving``, ``tensorjson``,
``signature``, ``errors``: pure, sans-I/O, numpy only), the dynamic batcher
(``batcher``: pure), a lane per served model over live stream sessions
(``lanes``: Trio, no node imports), the node's gateway service
(``service``) and its HTTP routes (``routes``, mounted by ``ApiApp``).
Nothing here imports TensorFlow.
"""
