"""Figures and tables for RESULTS.md from saved results: `python -m fedattn_vllm.eval plots`."""

def run(args):
    raise NotImplementedError
