"""Evaluation: GSM8K accuracy, fidelity to centralised inference, and figures (`python -m fedattn_vllm.eval --help`)."""
