//! Library-level error type: wraps each module's own error so the CLI can report one thing.
