//! Text that came from a file, made safe to print: control characters escaped.
//!
//! A bundle's name, a concept's metadata or a value quoted from a manifest is chosen by whoever
//! wrote the file. Printed raw, an ANSI escape can recolour or rewrite the terminal, and a
//! newline can forge a line of output (`error: ...`). Escaped, the reader sees which characters
//! were there. Every error that quotes file contents formats it through [`escape`]; the CLI
//! uses it for what it prints from a bundle or concept.

use std::fmt::{self, Write};

/// `text` as it may be printed: see [`escape`].
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

/// Wraps `text` so that its `Display` writes control characters (C0, DEL, C1) as Rust escapes
/// (`\n`, `\t`, `\u{1b}`) and the Unicode bidirectional overrides, which reorder what a terminal
/// shows, as `\u{202e}`; every other character is written as it is.
pub fn escape(text: &str) -> Escaped<'_> {
    Escaped(text)
}

/// True for the characters [`escape`] rewrites.
pub fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if needs_escape(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        let shown = escape("cat\u{1b}[31m red\nerror: forged\t\u{7f}\u{85}").to_string();
        assert_eq!(shown, "cat\\u{1b}[31m red\\nerror: forged\\t\\u{7f}\\u{85}");
        assert_eq!(
            escape("ab\u{202e}cd\u{2066}").to_string(),
            "ab\\u{202e}cd\\u{2066}"
        );
        // Ordinary text, quotes and non-ASCII letters are untouched.
        let plain = "chat noir \"S\" — 猫 café \\ ok";
        assert_eq!(escape(plain).to_string(), plain);
    }
}
