"""Evaluation: GSM8K accuracy of FedAttn sessions (`python -m fedattn_vllm.eval gsm8k --help`)."""
