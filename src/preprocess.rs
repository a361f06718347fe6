//! Concept image and mask: decoding, EXIF orientation, Pillow-compatible bicubic squash to 224x224, CLIP normalisation, the 16x16 mask grid.
