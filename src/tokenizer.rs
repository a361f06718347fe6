//! CLIP tokenization from the bundle's tokenizer.json, 77-token padding, placeholder token index.
//!
//! The bundle's `tokenizer.json` is written by `export/tokenizer.py` (`build_tokenizer_json`) and
//! reproduces transformers' CLIP tokenizer id for id: `<|startoftext|>` (49406), the prompt's
//! tokens, `<|endoftext|>` (49407), padded to 77 with `<|endoftext|>`.
//!
//! The placeholder position follows DESIGN.md: the **token** index of the placeholder token in
//! the tokenized prompt (its last occurrence, as the reference takes the last matching word);
//! a prompt without the placeholder is an error rather than a silent overwrite of BOS.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::models::bpe::BPE;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PaddingParams, PaddingStrategy,
    PostProcessorWrapper, PreTokenizerWrapper, Tokenizer, TokenizerBuilder, TruncationParams,
};

use crate::bundle::{Bundle, MANIFEST_FILE};
use crate::display::escape;
use crate::files::{self, FileError};
use crate::limits;

/// Sequence length of the CLIP text encoder, start and end tokens included.
pub const MAX_TOKENS: usize = 77;

/// One prompt's token ids, as the text encoder's `input_ids` row takes them.
pub type TokenIds = [i64; MAX_TOKENS];

/// Longest prompt, in bytes, that is tokenized at all: 77 tokens of even the longest CLIP words
/// fit many times over, and a stranger's megabyte of text is refused before the BPE runs on it.
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";

/// What can go wrong while loading the tokenizer or tokenizing a prompt.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` is not a regular file, too large, or unreadable.
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot load tokenizer {}: {source}", .path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("tokenizer {} is not a CLIP tokenizer for ELITE: {problem}", .path.display())]
    Invalid { path: PathBuf, problem: String },
    #[error("cannot tokenize {text:?}: {source}")]
    Encode {
        text: String,
        #[source]
        source: tokenizers::Error,
    },
    #[error(
        "prompt is {tokens} tokens long (start and end tokens included), more than the text \
         encoder's limit of {limit}; shorten it or allow truncation"
    )]
    PromptTooLong { tokens: usize, limit: usize },
    #[error(
        "placeholder {placeholder:?} encodes to {} tokens {tokens:?}; it must be exactly one \
         CLIP token, such as `S` or `*`",
        .tokens.len()
    )]
    PlaceholderNotOneToken {
        placeholder: String,
        tokens: Vec<String>,
    },
    #[error(
        "placeholder {placeholder:?} is the special token {token} (start, end or padding); \
         choose an ordinary word such as `S`"
    )]
    PlaceholderIsSpecial { placeholder: String, token: i64 },
    #[error(
        "prompt does not contain the placeholder `{}` (token {token}); write it as a word of \
         its own, e.g. \"a photo of a {}\"",
        escape(.placeholder),
        escape(.placeholder)
    )]
    PlaceholderAbsent { placeholder: String, token: i64 },
    #[error(
        "the placeholder `{}` is token {position} of the prompt, beyond the {limit}-token limit, \
         and was cut off by truncation; move it earlier or shorten the prompt",
        escape(.placeholder)
    )]
    PlaceholderTruncated {
        placeholder: String,
        /// Its last position in the untruncated prompt (start token = 0).
        position: usize,
        limit: usize,
    },
    #[error(
        "prompt is {bytes} bytes, over the limit of {limit} bytes (the text encoder reads \
         {MAX_TOKENS} tokens)"
    )]
    PromptTooLarge { bytes: usize, limit: usize },
    /// The manifest's default placeholder cannot be used with the bundle's tokenizer.
    #[error("{}: `defaults.placeholder` cannot be used: {source}", .manifest.display())]
    DefaultPlaceholder {
        manifest: PathBuf,
        #[source]
        source: Box<TokenizerError>,
    },
}

/// `tokenizer.json` as the tokenizers crate writes it, with its model read as a BPE.
///
/// `Tokenizer::from_bytes` reads the model through `ModelWrapper`'s untagged enum: serde buffers
/// the whole model (CLIP's 49 408 vocabulary entries and 48 894 merges, nearly all of the 1.7 MB
/// file) as `Content`, copies it into a flattened `serde_json::Value`, and only then builds the
/// BPE from that copy, which made the tokenizer a measurable part of every start's load
/// (bench/RESULTS.md). Typed as `BPE`, the model streams into the BPE's own visitor once; the
/// other parts are a few hundred bytes. [`parse_tokenizer_json`] assembles them as the crate's
/// own visitor does, and a unit test checks that both give the same tokenizer.
#[derive(Deserialize)]
struct TokenizerFile {
    truncation: Option<TruncationParams>,
    padding: Option<PaddingParams>,
    #[serde(default)]
    added_tokens: Vec<AddedTokenWithId>,
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: Option<PreTokenizerWrapper>,
    post_processor: Option<PostProcessorWrapper>,
    decoder: Option<DecoderWrapper>,
    /// ELITE needs CLIP's tokenizer, a BPE: another model type is refused by BPE's visitor.
    model: BPE,
}

/// One entry of `added_tokens`: the token and the id the file gives it.
#[derive(Deserialize)]
struct AddedTokenWithId {
    id: u32,
    #[serde(flatten)]
    token: AddedToken,
}

/// Builds the tokenizer `bytes` (read from `path`) describe: its parts, then the added tokens, whose ids come from
/// the model (as in the crate's visitor). Where the crate only logs an added token whose id in
/// the file differs from the model's, this refuses it: the ids are what the text encoder reads.
fn parse_tokenizer_json(bytes: &[u8], path: &Path) -> Result<Tokenizer, TokenizerError> {
    let load = |source: tokenizers::Error| TokenizerError::Load {
        path: path.to_path_buf(),
        source,
    };
    let file: TokenizerFile = serde_json::from_slice(bytes).map_err(|e| load(e.into()))?;
    let mut inner: Tokenizer = TokenizerBuilder::new()
        .with_model(ModelWrapper::BPE(file.model))
        .with_normalizer(file.normalizer)
        .with_pre_tokenizer(file.pre_tokenizer)
        .with_post_processor(file.post_processor)
        .with_decoder(file.decoder)
        .with_truncation(file.truncation)
        .with_padding(file.padding)
        .build()
        .map_err(load)?
        .into();
    let expected: Vec<(String, u32)> = file
        .added_tokens
        .iter()
        .map(|t| (t.token.content.clone(), t.id))
        .collect();
    inner
        .add_tokens(file.added_tokens.into_iter().map(|t| t.token))
        .map_err(load)?;
    for (content, id) in expected {
        let actual = inner.token_to_id(&content);
        if actual != Some(id) {
            return Err(TokenizerError::Invalid {
                path: path.to_path_buf(),
                problem: format!(
                    "added token {content:?} has id {id} in the file but {actual:?} in the \
                     tokenizer"
                ),
            });
        }
    }
    Ok(inner)
}

/// CLIP's BPE tokenizer, loaded from a bundle's `tokenizer.json`.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    /// The loaded tokenizer with its own truncation and padding switched off: `encode` needs
    /// the full token count to report over-long prompts, and pads itself.
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl ClipTokenizer {
    /// Load a `tokenizer.json` and check that it is CLIP's: start/end tokens present, added by
    /// the post-processor, truncation and padding to 77 tokens.
    ///
    /// The file is read through [`files::read_capped`] (a regular file of at most
    /// [`files::TOKENIZER`]'s size) and parsed from memory: the tokenizers crate would read
    /// any file, a FIFO or `/dev/zero` included, to its end.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let bytes = files::read_capped(path, files::TOKENIZER)?;
        let inner = parse_tokenizer_json(&bytes, path)?;
        Self::from_tokenizer(inner, path)
    }

    /// The tokenizer of `bundle`, with the manifest's default placeholder checked to be one
    /// ordinary token (an error naming `elite.json` and `defaults.placeholder` otherwise,
    /// instead of a placeholder error the user cannot trace to the bundle).
    pub fn for_bundle(bundle: &Bundle) -> Result<Self, TokenizerError> {
        let tokenizer = Self::from_file(bundle.tokenizer_path())?;
        tokenizer
            .placeholder_token(&bundle.defaults().placeholder)
            .map_err(|e| TokenizerError::DefaultPlaceholder {
                manifest: bundle.dir().join(MANIFEST_FILE),
                source: Box::new(e),
            })?;
        Ok(tokenizer)
    }

    fn from_tokenizer(mut inner: Tokenizer, path: &Path) -> Result<Self, TokenizerError> {
        let invalid = |problem: String| TokenizerError::Invalid {
            path: path.to_path_buf(),
            problem,
        };
        let special = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| invalid(format!("it has no {token} token")))
        };
        let (bos, eos) = (special(BOS)?, special(EOS)?);
        let truncation = inner.get_truncation().map(|t| t.max_length);
        if truncation != Some(MAX_TOKENS) {
            return Err(invalid(format!(
                "it truncates to {truncation:?} tokens, expected Some({MAX_TOKENS})"
            )));
        }
        let pad = match inner.get_padding() {
            Some(p) if matches!(p.strategy, PaddingStrategy::Fixed(MAX_TOKENS)) => p.pad_id,
            other => {
                return Err(invalid(format!(
                    "it pads with {:?}, expected a fixed length of {MAX_TOKENS}",
                    other.map(|p| &p.strategy)
                )))
            }
        };
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| invalid(format!("cannot switch truncation off: {e}")))?;
        let tokenizer = Self {
            inner,
            bos,
            eos,
            pad,
        };
        let empty = tokenizer.raw_ids("", true)?;
        if empty != [bos, eos] {
            return Err(invalid(format!(
                "the empty prompt encodes to {empty:?}, expected [{bos}, {eos}] \
                 (start and end tokens from the post-processor)"
            )));
        }
        Ok(tokenizer)
    }

    fn raw_ids(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|source| TokenizerError::Encode {
                text: text.to_owned(),
                source,
            })
    }

    /// The prompt's 77 ids: start token, the prompt's tokens, end token, padding.
    ///
    /// A prompt of more than 77 tokens (start and end included) is an error unless `truncate`,
    /// which keeps the first 75 prompt tokens and ends with the end token, as transformers does.
    pub fn encode(&self, prompt: &str, truncate: bool) -> Result<TokenIds, TokenizerError> {
        let ids = self.prompt_ids(prompt)?;
        self.fit(&ids, truncate)
    }

    /// The prompt's ids, start and end tokens included, not yet padded or truncated.
    fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, TokenizerError> {
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(TokenizerError::PromptTooLarge {
                bytes: prompt.len(),
                limit: MAX_PROMPT_BYTES,
            });
        }
        self.raw_ids(prompt, true)
    }

    /// `ids` padded to 77, or cut to 76 and the end token when `truncate`.
    fn fit(&self, ids: &[u32], truncate: bool) -> Result<TokenIds, TokenizerError> {
        if ids.len() > MAX_TOKENS && !truncate {
            return Err(TokenizerError::PromptTooLong {
                tokens: ids.len(),
                limit: MAX_TOKENS,
            });
        }
        let mut out = [i64::from(self.pad); MAX_TOKENS];
        for (slot, &id) in out.iter_mut().zip(ids) {
            *slot = i64::from(id);
        }
        if ids.len() > MAX_TOKENS {
            out[MAX_TOKENS - 1] = i64::from(self.eos);
        }
        Ok(out)
    }

    /// [`ClipTokenizer::encode`] then the placeholder's token index (see
    /// [`ClipTokenizer::locate_placeholder`]), telling a placeholder that `truncate` cut off
    /// apart from one the prompt does not contain.
    pub fn tokenize(
        &self,
        prompt: &str,
        placeholder: &str,
        truncate: bool,
    ) -> Result<(TokenIds, usize), TokenizerError> {
        let all = self.prompt_ids(prompt)?;
        let ids = self.fit(&all, truncate)?;
        let token = self.placeholder_token(placeholder)?;
        if let Some(index) = last_index(&ids, token) {
            return Ok((ids, index));
        }
        match all.iter().rposition(|&id| i64::from(id) == token) {
            Some(position) => Err(TokenizerError::PlaceholderTruncated {
                placeholder: placeholder.to_owned(),
                position,
                limit: MAX_TOKENS,
            }),
            None => Err(TokenizerError::PlaceholderAbsent {
                placeholder: placeholder.to_owned(),
                token,
            }),
        }
    }

    /// The id of the placeholder word (e.g. `S` → 338). It must encode to exactly one token
    /// that is not a start, end or padding token.
    pub fn placeholder_token(&self, placeholder: &str) -> Result<i64, TokenizerError> {
        if placeholder.len() > limits::MAX_PLACEHOLDER_BYTES {
            return Err(TokenizerError::PlaceholderNotOneToken {
                placeholder: format!("{}…", truncated(placeholder, 32)),
                tokens: vec![format!("({} bytes)", placeholder.len())],
            });
        }
        let ids = self.raw_ids(placeholder, false)?;
        match ids.as_slice() {
            [id] if [self.bos, self.eos, self.pad].contains(id) => {
                Err(TokenizerError::PlaceholderIsSpecial {
                    placeholder: placeholder.to_owned(),
                    token: i64::from(*id),
                })
            }
            [id] => Ok(i64::from(*id)),
            _ => Err(TokenizerError::PlaceholderNotOneToken {
                placeholder: placeholder.to_owned(),
                tokens: ids.iter().map(|&id| self.token_text(id)).collect(),
            }),
        }
    }

    /// Index of the placeholder's token in `ids` (the token index, BOS = 0); when it occurs
    /// more than once, the last occurrence. Absent (also when truncated away) is an error that
    /// quotes `placeholder` as the user wrote it: `locate_placeholder(&ids, "S")`.
    pub fn locate_placeholder(
        &self,
        ids: &TokenIds,
        placeholder: &str,
    ) -> Result<usize, TokenizerError> {
        let token = self.placeholder_token(placeholder)?;
        last_index(ids, token).ok_or_else(|| TokenizerError::PlaceholderAbsent {
            placeholder: placeholder.to_owned(),
            token,
        })
    }

    /// How a token of `ids` is shown to a person (attention-map labels): the start and end
    /// tokens as `<start>` and `<end>`, any other as its text without the end-of-word marker.
    pub fn token_label(&self, id: i64) -> String {
        match u32::try_from(id) {
            Ok(id) if id == self.bos => "<start>".into(),
            Ok(id) if id == self.eos => "<end>".into(),
            Ok(id) => self.token_text(id),
            Err(_) => format!("#{id}"),
        }
    }

    /// How many of `ids` are the prompt's own tokens: the start token up to and including the
    /// first end token (the rest is padding).
    pub fn prompt_len(&self, ids: &TokenIds) -> usize {
        ids.iter()
            .position(|&id| id == i64::from(self.eos))
            .map_or(ids.len(), |i| i + 1)
    }

    /// A token's text without the end-of-word marker (`s</w>` → `s`), for messages.
    fn token_text(&self, id: u32) -> String {
        match self.inner.decode(&[id], false) {
            Ok(text) if !text.is_empty() => text,
            _ => self
                .inner
                .id_to_token(id)
                .map(|t| t.trim_end_matches(END_OF_WORD).to_owned())
                .unwrap_or_else(|| format!("#{id}")),
        }
    }
}

/// At most the first `max` bytes of `text`, cut at a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn last_index(ids: &TokenIds, token: i64) -> Option<usize> {
    ids.iter().rposition(|&id| id == token)
}

#[cfg(test)]
mod tests {
    //! Expected ids were produced by transformers 5.23 `CLIPTokenizer.from_pretrained(d)` where
    //! `d` is written by `export.tokenizer.write_clip_vocab` from CLIP's BPE file (the same
    //! directory the fixture was built from), called as the ELITE reference calls it:
    //! `tok(prompt).input_ids` (unpadded, start/end included), and
    //! `tok(prompt, truncation=True, max_length=77).input_ids` for the long prompt. The Python
    //! tests check the same tokenizer against the transformers 4.26.1 slow tokenizer too.
    //! The fixture is rebuilt with
    //! `python -m export.tokenizer --fixture tests/fixtures/tokenizer/tokenizer.json`.
    use super::*;
    use std::sync::OnceLock;

    const PAD: i64 = 49407;

    fn fixture_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/tokenizer.json")
    }

    fn tokenizer() -> &'static ClipTokenizer {
        static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| match ClipTokenizer::from_file(fixture_path()) {
            Ok(t) => t,
            Err(e) => panic!("fixture tokenizer: {e}"),
        })
    }

    /// The typed loader builds the tokenizer the crate's own `from_bytes` builds: the two
    /// serialise to the same JSON (every part, every vocabulary entry and merge, the added
    /// tokens and their ids), for the fixture and for the tiny bundle's tokenizer.
    #[test]
    fn typed_loader_equals_the_crates() {
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny/tokenizer.json");
        for path in [fixture_path(), tiny] {
            let bytes = std::fs::read(&path).unwrap();
            let Ok(ours) = parse_tokenizer_json(&bytes, &path) else {
                panic!("{}: the typed loader failed", path.display());
            };
            let theirs = Tokenizer::from_bytes(&bytes).unwrap();
            assert_eq!(
                ours.to_string(false).unwrap(),
                theirs.to_string(false).unwrap(),
                "{}",
                path.display()
            );
        }
    }

    /// An added token whose id in the file is not the one the tokenizer gives it is refused
    /// (the crate only logs it), as is a model that is not a BPE.
    #[test]
    fn inconsistent_tokenizer_files_are_refused() {
        let bytes = std::fs::read(fixture_path()).unwrap();
        let mut doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        doc["added_tokens"][0]["id"] = serde_json::json!(7);
        match parse_tokenizer_json(doc.to_string().as_bytes(), &fixture_path()) {
            Err(TokenizerError::Invalid { problem, .. }) => {
                assert!(problem.contains("has id 7 in the file"), "{problem}")
            }
            _ => panic!("a wrong added-token id was accepted"),
        }
        let mut doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        doc["model"]["type"] = serde_json::json!("WordPiece");
        match parse_tokenizer_json(doc.to_string().as_bytes(), &fixture_path()) {
            Err(TokenizerError::Load { source, .. }) => {
                assert!(source.to_string().contains("BPE"), "{source}")
            }
            _ => panic!("a WordPiece model was accepted"),
        }
    }

    fn padded(ids: &[i64]) -> TokenIds {
        let mut out = [PAD; MAX_TOKENS];
        out[..ids.len()].copy_from_slice(ids);
        out
    }

    /// (prompt, unpadded ids from transformers)
    const CASES: &[(&str, &[i64])] = &[
        ("a photo of a S", &[49406, 320, 1125, 539, 320, 338, 49407]),
        (
            "a photo of an astronaut riding a horse on mars",
            &[
                49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407,
            ],
        ),
        ("", &[49406, 49407]),
        ("S", &[49406, 338, 49407]),
        ("*", &[49406, 265, 49407]),
        (
            "A S wearing sunglasses",
            &[49406, 320, 338, 3309, 12906, 49407],
        ),
        (
            "Hello, world! How's it going?",
            &[49406, 3306, 267, 1002, 256, 829, 568, 585, 1245, 286, 49407],
        ),
        (
            "café crème brûlée naïve résumé",
            &[
                49406, 15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 1097, 35689, 563, 29106,
                7054, 4166, 49407,
            ],
        ),
        (
            "cafe\u{301} with a decomposed accent",
            &[49406, 15304, 593, 320, 561, 19916, 18931, 49407],
        ),
        (
            "multiple     spaces\tand\ttabs\nand newlines",
            &[49406, 6470, 9006, 537, 29163, 537, 1218, 3418, 49407],
        ),
        (
            "x'''s !'s it's-'ll'd ''",
            &[
                49406, 343, 6, 8445, 338, 13222, 338, 585, 568, 28010, 865, 1896, 8445, 49407,
            ],
        ),
        (
            "S's hat and the S-shaped road",
            &[
                49406, 338, 568, 3801, 537, 518, 338, 268, 10127, 1759, 49407,
            ],
        ),
        (
            "emoji 🐱🚀 and symbols © ™ ° ±",
            &[
                49406, 16327, 35710, 13542, 537, 25476, 5811, 11675, 6858, 126, 365, 49407,
            ],
        ),
        (
            "日本語のテキスト and 中文",
            &[
                49406, 39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486, 537, 19759,
                255, 29032, 485, 49407,
            ],
        ),
        (
            "numbers 12345 and 3.14159",
            &[
                49406, 6121, 272, 273, 274, 275, 276, 537, 274, 269, 272, 275, 272, 276, 280, 49407,
            ],
        ),
        (
            "a photo of a *.",
            &[49406, 320, 1125, 539, 320, 31304, 49407],
        ),
    ];

    #[test]
    fn matches_transformers_ids() {
        for (prompt, expected) in CASES {
            let ids = tokenizer().encode(prompt, false).map_err(|e| e.to_string());
            assert_eq!(ids, Ok(padded(expected)), "prompt {prompt:?}");
        }
    }

    #[test]
    fn empty_prompt_is_bos_then_eos_padding() {
        let mut expected = [PAD; MAX_TOKENS];
        expected[0] = 49406;
        assert_eq!(tokenizer().encode("", false).ok(), Some(expected));
    }

    /// `"a photo of a S " * 20`: 100 prompt tokens.
    fn long_prompt() -> String {
        "a photo of a S ".repeat(20)
    }

    #[test]
    fn long_prompt_is_an_error_that_counts_tokens() {
        match tokenizer().encode(&long_prompt(), false) {
            Err(
                e @ TokenizerError::PromptTooLong {
                    tokens: 102,
                    limit: 77,
                },
            ) => {
                let message = e.to_string();
                assert!(message.contains("102 tokens") && message.contains("limit of 77"));
            }
            other => panic!("expected PromptTooLong(102), got {other:?}"),
        }
    }

    #[test]
    fn long_prompt_truncates_like_transformers() {
        // transformers: bos, the first 75 tokens (15 × "a photo of a s"), eos.
        let mut expected = vec![49406];
        for _ in 0..15 {
            expected.extend([320, 1125, 539, 320, 338]);
        }
        expected.push(49407);
        let ids = tokenizer().encode(&long_prompt(), true).ok();
        assert_eq!(ids, Some(padded(&expected)));
    }

    #[test]
    fn length_boundary_is_77_tokens() {
        let exact = tokenizer().encode(&"a ".repeat(75), false);
        assert!(matches!(exact, Ok(ids) if ids[75] == 320 && ids[76] == 49407));
        let over = tokenizer().encode(&"a ".repeat(76), false);
        assert!(matches!(
            over,
            Err(TokenizerError::PromptTooLong { tokens: 78, .. })
        ));
    }

    #[test]
    fn placeholder_tokens() {
        let t = tokenizer();
        assert_eq!(t.placeholder_token("S").ok(), Some(338));
        assert_eq!(t.placeholder_token("s").ok(), Some(338));
        assert_eq!(t.placeholder_token("*").ok(), Some(265));
        assert_eq!(t.placeholder_token("sks").ok(), Some(48136));
        let two = t.placeholder_token("my cat");
        assert!(
            matches!(&two, Err(TokenizerError::PlaceholderNotOneToken { tokens, .. })
            if tokens == &["my", "cat"])
        );
        assert!(matches!(
            t.placeholder_token(""),
            Err(TokenizerError::PlaceholderNotOneToken { .. })
        ));
        assert!(matches!(
            t.placeholder_token("<|endoftext|>"),
            Err(TokenizerError::PlaceholderIsSpecial { token: 49407, .. })
        ));
    }

    fn index_of(prompt: &str, placeholder: &str) -> Result<usize, TokenizerError> {
        let t = tokenizer();
        let ids = t.encode(prompt, true)?;
        t.locate_placeholder(&ids, placeholder)
    }

    #[test]
    fn placeholder_index_is_the_last_token_occurrence() {
        assert_eq!(index_of("a photo of a S", "S").ok(), Some(5));
        assert_eq!(index_of("A S wearing sunglasses", "S").ok(), Some(2));
        assert_eq!(index_of("S S S", "S").ok(), Some(3));
        assert_eq!(index_of("S's hat and the S-shaped road", "S").ok(), Some(6));
        assert_eq!(index_of("a photo of a *", "*").ok(), Some(5));
        // The 20th "S" is truncated away; the 15th (token 75) is the last one kept.
        assert_eq!(index_of(&long_prompt(), "S").ok(), Some(75));
    }

    #[test]
    fn absent_placeholder_is_an_error_naming_it() {
        for prompt in ["a photo of a Sunglasses", "a photo of a *.", ""] {
            let placeholder = if prompt.contains('*') { "*" } else { "S" };
            match index_of(prompt, placeholder) {
                Err(e @ TokenizerError::PlaceholderAbsent { .. }) => {
                    let message = e.to_string();
                    assert!(message.starts_with("prompt does not contain the placeholder"));
                    assert!(message.contains(&format!("`{placeholder}`")), "{message}");
                }
                other => panic!("{prompt:?}: expected PlaceholderAbsent, got {other:?}"),
            }
        }
    }

    #[test]
    fn located_placeholder_errors_quote_the_user_text() {
        let t = tokenizer();
        let ids = t.encode("a photo of a Sunglasses", false);
        let Ok(ids) = ids else { panic!("{ids:?}") };
        let message = t.locate_placeholder(&ids, "S").map_err(|e| e.to_string());
        assert_eq!(
            message,
            Err(
                "prompt does not contain the placeholder `S` (token 338); write it as a word \
                 of its own, e.g. \"a photo of a S\""
                    .to_owned()
            )
        );
    }

    #[test]
    fn missing_or_wrong_files_are_errors() {
        let missing = ClipTokenizer::from_file("/nonexistent/tokenizer.json");
        assert!(matches!(
            missing,
            Err(TokenizerError::File(FileError::NotFound { .. }))
        ));

        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else {
            panic!("tempdir: {dir:?}")
        };
        let text = std::fs::read_to_string(fixture_path()).unwrap_or_default();
        let unpadded = text.replace("\"Fixed\":77", "\"Fixed\":64");
        assert_ne!(text, unpadded, "fixture layout changed");
        let path = dir.path().join("tokenizer.json");
        assert!(std::fs::write(&path, unpadded).is_ok());
        match ClipTokenizer::from_file(&path) {
            Err(e @ TokenizerError::Invalid { .. }) => {
                assert!(e.to_string().contains("fixed length of 77"), "{e}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
}
