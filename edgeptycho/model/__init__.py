"""The CNN: presets and network (network), simulated training sets (dataset), training (train), fine-tuning
(finetune), ONNX export (export), the one preprocessing (preprocess) and hash-checked artifacts (artifact).

Nothing is imported here: artifact and preprocess are used by inference code that must not pull in torch.
"""
