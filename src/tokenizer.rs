//! CLIP tokenization from the bundle's tokenizer.json, 77-token padding, placeholder token index.
