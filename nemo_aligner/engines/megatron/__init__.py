"""The megatron-core engine (in progress): megatron-core's GPTModel built from a Hugging Face config, with
Hugging Face weights converted in and out. See build.py and convert.py."""
