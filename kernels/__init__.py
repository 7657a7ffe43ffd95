"""kernels: see the README; filled in by later issues."""
