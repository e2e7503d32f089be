"""Application layer: reassembly, protocol identification (nDPI), one module per protocol."""
