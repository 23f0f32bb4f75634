"""The quantization bench (`kvlab bench --technique quantization`): float32 `model.generate()` against
kvlab.generate on each quantized variant of the same model, with PPL, speed, bytes and kernels."""
