//! The model bundle on disk: elite.json manifest (strict serde), file presence and sha256 checks.
