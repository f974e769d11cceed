"""Pure-PyTorch oracles: the definition of correct. Imports nothing of fastbig."""
