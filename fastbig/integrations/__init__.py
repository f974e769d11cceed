"""Integrations with other libraries' models (imported lazily: the libraries are optional).

* :mod:`fastbig.integrations.transformers`: Hugging Face ``transformers`` models run their
  attention through fastbig (a "fastbig" attention function and mask function registered with
  transformers' AttentionInterface / AttentionMaskInterface). ``fastbig.accelerate`` calls it.
"""
