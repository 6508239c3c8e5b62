"""Weight sharing across a model family: what is shared, what could be, and making it so.

``sources`` reads the tensors of every model form (ONNX with external data, raw weight folders, QNN .bin tar
archives, safetensors) without copying them; ``analyze`` groups identical, re-laid-out and near-identical
tensors across models by content; ``quantized`` predicts what QNN shares from quantized bytes and encodings;
``harmonize`` rewrites encodings so float-identical weights quantize to identical bytes; ``compile`` drives
the real QNN HTP backend to build one weight-shared context binary and measures it.
"""
