//! Writing results: uint8 conversion, PNG encoding through a temporary file and an atomic rename.
