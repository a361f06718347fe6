//! A concept: the word embeddings and masked local embeddings of one subject image, saved as safetensors.
