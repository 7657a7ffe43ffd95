"""Federated mode: participants on separate engines, sync-layer K/V relayed by a coordinator over ZeroMQ."""
