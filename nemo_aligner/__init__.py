"""nemo_aligner: align GPT-style language models with DPO, SPIN and rejection sampling."""

__version__ = "0.1.0"
