"""Engine-side FedAttn inside vLLM: batch bookkeeping, sync-layer attention, model classes.

Imported only inside vLLM processes that build a FedAttn model; nothing here runs for
plain vLLM models.
"""
