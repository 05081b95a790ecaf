"""The embedded tiny default: an arithmetic task, its tokenizer, a tiny pretrained Llama and datasets."""
