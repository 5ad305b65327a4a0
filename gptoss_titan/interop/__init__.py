"""The ecosystem's formats: Hugging Face / MXFP4 import and export, tokenizer files, the chat template."""
