//! CLIP's byte-level BPE tokenizer, giving the ids of transformers'
//! `CLIPTokenizerFast` (which equal the slow `CLIPTokenizer`'s except where
//! ftfy would rewrite the text: curly quotes, ligatures).
//!
//! Stable Diffusion exports ship `vocab.json` + `merges.txt` (no
//! `tokenizer.json`), so the pipeline is rebuilt here the way transformers'
//! slow→fast converter builds it: NFC, whitespace runs → one space,
//! lowercase; split on CLIP's regex keeping the matches; byte-level mapping;
//! BPE with the `</w>` end-of-word suffix. BOS and EOS are added here rather
//! than by a post-processor, so a `tokenizer.json` with any post-processor
//! gives the same ids.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, NormalizerWrapper, Replace};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::TextError;

/// CLIP's pre-tokenization pattern (the slow tokenizer's `pat`). The two
/// special tokens never reach it (they are matched as added tokens first);
/// they are kept so the pattern reads exactly as CLIP's.
const CLIP_SPLIT: &str = r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Marks the last symbol of a word in CLIP's vocabulary (`a</w>` is the word
/// "a", `a` is "a" followed by more letters).
const END_OF_WORD: &str = "</w>";

/// transformers' `CLIPTokenizer` reads only this many merges from
/// `merges.txt` (`49152 - 256 - 2`): the vocabulary is 256 bytes, 256 bytes
/// with `</w>`, one token per merge and the two special tokens.
const MAX_MERGES: usize = 49152 - 256 - 2;

/// Longest sequence we accept as `model_max_length`. Some tokenizer configs
/// carry transformers' "no limit" value (1e30); padding to that would
/// exhaust memory, while real text encoders use 77.
const MAX_SEQUENCE_LENGTH: u64 = 4096;

/// A tokenizer giving the ids Stable Diffusion's CLIP text encoder expects.
///
/// Ids are `u32`; the text encoder's input is `[batch, max_len]` of those
/// ids (cast to the model's integer type by the caller).
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
    /// Ids of added (special) tokens: they decode to their text as is, not
    /// through the byte-level table.
    added: HashSet<u32>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_len", &self.max_len)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer folder of a Stable Diffusion export.
    ///
    /// `tokenizer.json` is used when present (transformers 5.x saves only
    /// that), otherwise `vocab.json` + `merges.txt`. The special tokens and
    /// `model_max_length` come from `special_tokens_map.json` (which wins, as
    /// in transformers) and `tokenizer_config.json`; a special token named in
    /// neither takes `CLIPTokenizer`'s default (`<|startoftext|>`,
    /// `<|endoftext|>` for EOS, unk and pad), and must be in the vocabulary.
    /// `model_max_length` has no default: guessing the encoder's length
    /// would pad silently wrong.
    pub fn from_dir(dir: &Path) -> Result<Self, TextError> {
        let config = read_config(dir)?;
        let mut inner = load_pipeline(dir, &config.unk.content)?;
        let lookup = |role: &'static str, token: &SpecialToken| {
            inner
                .token_to_id(&token.content)
                .ok_or_else(|| TextError::UnknownSpecialToken {
                    dir: dir.to_path_buf(),
                    role,
                    token: token.content.clone(),
                })
        };
        let bos = lookup("bos", &config.bos)?;
        let eos = lookup("eos", &config.eos)?;
        lookup("unk", &config.unk)?;
        let pad = lookup("pad", &config.pad)?;
        // transformers registers every special token as an added token, so
        // they are split off wherever they occur in a prompt (with SD 2.x's
        // pad token "!", every "!" becomes id 0). All are in the vocabulary
        // (checked above), so adding them assigns no new ids.
        let mut added_tokens: Vec<AddedToken> = Vec::new();
        for token in [&config.bos, &config.eos, &config.unk, &config.pad] {
            if !added_tokens.iter().any(|t| t.content == token.content) {
                added_tokens.push(token.to_added());
            }
        }
        inner.add_special_tokens(&added_tokens);
        let added = inner.get_added_tokens_decoder().keys().copied().collect();
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len: config.max_len,
            added,
        })
    }

    /// BOS + the prompt's tokens + EOS, neither truncated nor padded: what
    /// `tokenizer(text).input_ids` gives in transformers, and what TIME's
    /// alignment of source and destination prompts works on.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|source| TextError::Encode {
                text: text.to_owned(),
                source,
            })?;
        let mut ids = Vec::with_capacity(encoding.len() + 2);
        ids.push(self.bos);
        ids.extend_from_slice(encoding.get_ids());
        ids.push(self.eos);
        Ok(ids)
    }

    /// [`Self::encode`] cut to what the text encoder sees: at most
    /// [`Self::max_len`] ids, keeping BOS, the first `max_len - 2` tokens and
    /// EOS. Not padded.
    pub fn encode_truncated(&self, text: &str) -> Result<Vec<u32>, TextError> {
        Ok(truncate(self.encode(text)?, self.max_len, self.eos))
    }

    /// What [`Self::encode_truncated`] cuts off the end of `text`, as text
    /// (`None` when it fits), so that a long prompt is not shortened silently:
    /// diffusers warns with the same words.
    pub fn dropped_text(&self, text: &str) -> Result<Option<String>, TextError> {
        let ids = self.encode(text)?;
        if ids.len() <= self.max_len {
            return Ok(None);
        }
        let cut = &ids[self.max_len - 1..ids.len() - 1];
        let tokens: String = cut
            .iter()
            .filter_map(|&id| self.inner.id_to_token(id))
            .collect();
        Ok(Some(decode_byte_level(&tokens)))
    }

    /// The text encoder's input for one prompt: [`Self::encode_truncated`]
    /// padded with [`Self::pad_id`] to exactly [`Self::max_len`] ids.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let mut ids = self.encode_truncated(text)?;
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }

    /// One token as transformers' `decode([id])` prints it: `</w>` becomes a
    /// space, byte-level symbols become UTF-8 (invalid sequences → U+FFFD),
    /// surrounding whitespace is stripped; special tokens print as their
    /// text. `None` for an id outside the vocabulary.
    pub fn decode_token(&self, id: u32) -> Option<String> {
        let token = self.inner.id_to_token(id)?;
        if self.added.contains(&id) {
            return Some(token);
        }
        Some(decode_byte_level(&token))
    }

    /// Number of ids, added tokens included (49,408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id padding [`Self::encode_padded`]: 49407 (`<|endoftext|>`) for
    /// SD 1.x, 0 (`!`) for SD 2.x.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The id opening every sequence (`<|startoftext|>`, 49406).
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// The id closing every sequence (`<|endoftext|>`, 49407).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The text encoder's sequence length (`model_max_length`, 77).
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

/// Keeps the first `max_len - 1` ids and closes with `eos` when `ids` is
/// longer than `max_len` (transformers' truncation keeps the special tokens).
/// `max_len` is at least 2 (checked when the config is read).
fn truncate(mut ids: Vec<u32>, max_len: usize, eos: u32) -> Vec<u32> {
    if ids.len() > max_len {
        ids.truncate(max_len.saturating_sub(1));
        ids.push(eos);
    }
    ids
}

/// The tokenizer proper, from `tokenizer.json` or from `vocab.json` +
/// `merges.txt`, with truncation and padding switched off (done by
/// [`ClipTokenizer`] itself).
fn load_pipeline(dir: &Path, unk: &str) -> Result<Tokenizer, TextError> {
    let json_path = dir.join("tokenizer.json");
    let build_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TextError::Build { path, source }
    };
    let mut tokenizer = match read_if_present(&json_path)? {
        Some(bytes) => Tokenizer::from_bytes(bytes).map_err(build_error(&json_path))?,
        None => {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            let (Some(vocab), Some(merges)) = (
                read_if_present(&vocab_path)?,
                read_if_present(&merges_path)?,
            ) else {
                return Err(TextError::NoTokenizerFiles {
                    dir: dir.to_path_buf(),
                });
            };
            let vocab: Vocab =
                serde_json::from_slice(&vocab).map_err(|source| TextError::Json {
                    path: vocab_path.clone(),
                    source,
                })?;
            let merges = String::from_utf8(merges).map_err(|source| TextError::NotUtf8 {
                path: merges_path.clone(),
                source,
            })?;
            let merges = parse_merges(&merges, &merges_path)?;
            clip_pipeline(vocab, merges, unk).map_err(build_error(dir))?
        }
    };
    tokenizer.with_truncation(None).map_err(build_error(dir))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// The pipeline transformers' converter builds for `CLIPTokenizerFast`
/// (`convert_slow_tokenizer.CLIPConverter`), without its post-processor and
/// decoder (BOS/EOS and decoding are done by [`ClipTokenizer`]).
///
/// The byte-level step runs without its own GPT-2 regex: after CLIP's split
/// every piece is a letter run, one digit, a contraction or a punctuation
/// run, which that regex would leave whole anyway.
fn clip_pipeline(vocab: Vocab, merges: Merges, unk: &str) -> tokenizers::Result<Tokenizer> {
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk.to_owned())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD.to_owned())
        .fuse_unk(false)
        .build()?;
    let normalizer = tokenizers::normalizers::Sequence::new(vec![
        NormalizerWrapper::from(NFC),
        NormalizerWrapper::from(Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ")?),
        NormalizerWrapper::from(Lowercase),
    ]);
    let pre_tokenizer = tokenizers::pre_tokenizers::sequence::Sequence::new(vec![
        PreTokenizerWrapper::from(Split::new(
            SplitPattern::Regex(CLIP_SPLIT.to_owned()),
            SplitDelimiterBehavior::Removed,
            true,
        )?),
        PreTokenizerWrapper::from(ByteLevel::new(false, false, false)),
    ]);
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(normalizer))
        .with_pre_tokenizer(Some(pre_tokenizer));
    Ok(tokenizer)
}

/// The merges of `merges.txt` as transformers' `CLIPTokenizer` reads them:
/// the text stripped, its first line (the `#version` header) dropped
/// whatever it says, then at most [`MAX_MERGES`] lines of two symbols.
fn parse_merges(text: &str, path: &Path) -> Result<Merges, TextError> {
    text.trim_matches(is_python_space)
        .split('\n')
        .enumerate()
        .skip(1)
        .take(MAX_MERGES)
        .map(|(index, line)| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(left), Some(right), None) => Ok((left.to_owned(), right.to_owned())),
                _ => Err(TextError::BadMerge {
                    path: path.to_path_buf(),
                    line: index + 1,
                    content: line.to_owned(),
                }),
            }
        })
        .collect()
}

/// A special token as a tokenizer config describes it: a bare string, or an
/// object `{"content": ..., "normalized": ..., ...}` (transformers'
/// serialized `AddedToken`).
#[derive(Debug, Clone, PartialEq)]
struct SpecialToken {
    content: String,
    /// Matched in the normalized (lowercased) text rather than the raw text.
    normalized: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl SpecialToken {
    /// A special token given as a bare string: transformers matches it in
    /// the raw text (`normalized = false`).
    fn plain(content: &str) -> Self {
        Self {
            content: content.to_owned(),
            normalized: false,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }

    fn to_added(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), true)
            .normalized(self.normalized)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
    }
}

/// What the tokenizer needs from `tokenizer_config.json` and
/// `special_tokens_map.json`.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    bos: SpecialToken,
    eos: SpecialToken,
    unk: SpecialToken,
    pad: SpecialToken,
    max_len: usize,
}

/// A parsed JSON object and the file it came from (for error messages).
type JsonFile = (PathBuf, Map<String, Value>);

fn read_config(dir: &Path) -> Result<Config, TextError> {
    let special_map = read_json_object(&dir.join("special_tokens_map.json"))?;
    let tokenizer_config = read_json_object(&dir.join("tokenizer_config.json"))?;
    // special_tokens_map.json overrides tokenizer_config.json, as in
    // transformers' `from_pretrained`.
    let files: Vec<&JsonFile> = [special_map.as_ref(), tokenizer_config.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    let special = |key: &'static str, default: &str| -> Result<SpecialToken, TextError> {
        match lookup(&files, key) {
            Some((path, value)) => parse_special(value, path, key),
            None => Ok(SpecialToken::plain(default)),
        }
    };
    let max_len = match tokenizer_config
        .as_ref()
        .and_then(|(path, map)| Some((path, map.get("model_max_length")?)))
    {
        Some((path, value)) => parse_max_len(value, path)?,
        None => {
            return Err(TextError::MissingMaxLength {
                dir: dir.to_path_buf(),
            });
        }
    };
    Ok(Config {
        bos: special("bos_token", "<|startoftext|>")?,
        eos: special("eos_token", "<|endoftext|>")?,
        unk: special("unk_token", "<|endoftext|>")?,
        pad: special("pad_token", "<|endoftext|>")?,
        max_len,
    })
}

/// The first file (in priority order) that has `key`, and its value.
fn lookup<'a>(files: &[&'a JsonFile], key: &str) -> Option<(&'a Path, &'a Value)> {
    files
        .iter()
        .find_map(|(path, map)| Some((path.as_path(), map.get(key)?)))
}

fn parse_special(value: &Value, path: &Path, key: &'static str) -> Result<SpecialToken, TextError> {
    let bad = |why| TextError::BadConfig {
        path: path.to_path_buf(),
        key,
        value: value.to_string(),
        why,
    };
    match value {
        Value::String(content) => Ok(SpecialToken::plain(content)),
        Value::Object(map) => {
            let content = map
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("no string \"content\""))?;
            let flag = |name: &str, default: bool| match map.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(bad("a flag of the token is not a boolean")),
            };
            Ok(SpecialToken {
                content: content.to_owned(),
                // transformers' AddedToken(dict) defaults to normalized.
                normalized: flag("normalized", true)?,
                lstrip: flag("lstrip", false)?,
                rstrip: flag("rstrip", false)?,
                single_word: flag("single_word", false)?,
            })
        }
        _ => Err(bad("expected a string or {\"content\": ...}")),
    }
}

fn parse_max_len(value: &Value, path: &Path) -> Result<usize, TextError> {
    let bad = |why| TextError::BadConfig {
        path: path.to_path_buf(),
        key: "model_max_length",
        value: value.to_string(),
        why,
    };
    let n = value
        .as_u64()
        .ok_or_else(|| bad("expected a whole number"))?;
    if !(2..=MAX_SEQUENCE_LENGTH).contains(&n) {
        return Err(bad("expected 2..=4096 (room for BOS and EOS)"));
    }
    usize::try_from(n).map_err(|_| bad("does not fit in memory"))
}

/// The file's bytes, or `None` when it does not exist (other I/O errors are
/// reported).
fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>, TextError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TextError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn read_json_object(path: &Path) -> Result<Option<JsonFile>, TextError> {
    let Some(bytes) = read_if_present(path)? else {
        return Ok(None);
    };
    let map = serde_json::from_slice(&bytes).map_err(|source| TextError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Some((path.to_path_buf(), map)))
}

/// One vocabulary entry as transformers prints it: byte-level symbols back
/// to bytes, the bytes as UTF-8 (lossy, like its `errors="replace"`), `</w>`
/// as a space, then Python's `strip()`.
fn decode_byte_level(token: &str) -> String {
    let mut bytes = Vec::with_capacity(token.len());
    for c in token.chars() {
        match char_to_byte(c) {
            Some(b) => bytes.push(b),
            // Not a byte-level symbol (hand-made vocabularies): keep as is.
            None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    String::from_utf8_lossy(&bytes)
        .replace(END_OF_WORD, " ")
        .trim_matches(is_python_space)
        .to_owned()
}

/// Python's `str.isspace`: Unicode White_Space plus the ASCII separators
/// U+001C..U+001F, which Rust does not count as whitespace.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Bytes GPT-2 and CLIP keep as their own character: printable Latin-1
/// except the soft hyphen.
const fn is_printable_byte(b: u32) -> bool {
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)
}

/// Number of code points the byte-level alphabet spans: the other 68 bytes
/// map to U+0100 onwards.
const BYTE_LEVEL_SPAN: usize = 256 + 68;

/// Inverse of GPT-2's `bytes_to_unicode`, indexed by code point; `u16::MAX`
/// marks code points that are not byte-level symbols.
const CHAR_TO_BYTE: [u16; BYTE_LEVEL_SPAN] = char_to_byte_table();

const fn char_to_byte_table() -> [u16; BYTE_LEVEL_SPAN] {
    let mut table = [u16::MAX; BYTE_LEVEL_SPAN];
    let mut shifted = 0;
    let mut b = 0;
    while b < 256 {
        let code = if is_printable_byte(b) {
            b as usize
        } else {
            shifted += 1;
            255 + shifted
        };
        table[code] = b as u16;
        b += 1;
    }
    table
}

fn char_to_byte(c: char) -> Option<u8> {
    let index = usize::try_from(u32::from(c)).ok()?;
    let b = *CHAR_TO_BYTE.get(index)?;
    u8::try_from(b).ok()
}

/// Tiny CLIP-like tokenizer folders for unit tests (here and in
/// [`crate::edit`]): the real byte-level base (so `a</w>` is 320 and `!` is
/// 0, as in CLIP), one merge chain per test word, the two special tokens.
#[cfg(test)]
pub(crate) mod test_support {
    use super::{CHAR_TO_BYTE, ClipTokenizer, END_OF_WORD};
    use std::path::Path;

    /// The 256 byte-level symbols, indexed by byte.
    pub(crate) fn byte_symbols() -> Vec<char> {
        let mut symbols = vec!['\0'; 256];
        for (code, &b) in CHAR_TO_BYTE.iter().enumerate() {
            let c = u32::try_from(code).ok().and_then(char::from_u32);
            if let (Some(slot), Some(c)) = (symbols.get_mut(usize::from(b)), c) {
                *slot = c;
            }
        }
        symbols
    }

    /// `vocab.json` and `merges.txt` contents for `words` (ASCII).
    pub(crate) fn vocab_and_merges(words: &[&str]) -> (Vec<String>, Vec<(String, String)>) {
        // CLIP's order: GPT-2's `bytes_to_unicode` values as listed, i.e.
        // printable bytes first; that is code point order.
        let mut base = byte_symbols();
        base.sort_unstable();
        let mut vocab: Vec<String> = base.iter().map(|c| c.to_string()).collect();
        vocab.extend(base.iter().map(|c| format!("{c}{END_OF_WORD}")));
        let mut merges = Vec::new();
        for word in words {
            let chars: Vec<char> = word.chars().collect();
            let Some((last, init)) = chars.split_last() else {
                continue;
            };
            let mut symbols: Vec<String> = init.iter().map(|c| c.to_string()).collect();
            symbols.push(format!("{last}{END_OF_WORD}"));
            let mut left = symbols[0].clone();
            for right in &symbols[1..] {
                let merged = format!("{left}{right}");
                if !vocab.contains(&merged) {
                    merges.push((left.clone(), right.clone()));
                    vocab.push(merged.clone());
                }
                left = merged;
            }
        }
        vocab.push("<|startoftext|>".to_owned());
        vocab.push("<|endoftext|>".to_owned());
        (vocab, merges)
    }

    /// Writes a tokenizer folder for `words` with the given pad token and
    /// `model_max_length`.
    pub(crate) fn write_tiny(dir: &Path, words: &[&str], pad: &str, max_len: usize) {
        let (vocab, merges) = vocab_and_merges(words);
        let vocab: serde_json::Map<String, serde_json::Value> = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, serde_json::Value::from(i)))
            .collect();
        let merges: String = merges.iter().map(|(l, r)| format!("{l} {r}\n")).collect();
        let config = serde_json::json!({
            "bos_token": {"content": "<|startoftext|>", "normalized": true},
            "eos_token": {"content": "<|endoftext|>", "normalized": true},
            "unk_token": {"content": "<|endoftext|>", "normalized": true},
            "pad_token": pad,
            "model_max_length": max_len,
        });
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        write("vocab.json", serde_json::Value::Object(vocab).to_string());
        write("merges.txt", format!("#version: 0.2\n{merges}"));
        write("tokenizer_config.json", config.to_string());
    }

    /// A loaded tiny tokenizer (SD 1.x padding, 77 positions); its folder is
    /// removed on return, the tokenizer keeps no file open.
    pub(crate) fn tiny_tokenizer(words: &[&str]) -> ClipTokenizer {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), words, "<|endoftext|>", 77);
        ClipTokenizer::from_dir(dir.path()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{byte_symbols, tiny_tokenizer, write_tiny};
    use super::*;

    const WORDS: &[&str] = &["pack", "of", "roses", "blue", "an", "ant", "apple", "green"];

    fn id(tok: &ClipTokenizer, token: &str) -> u32 {
        tok.inner.token_to_id(token).unwrap()
    }

    #[test]
    fn byte_level_alphabet_is_gpt2s() {
        let symbols = byte_symbols();
        assert_eq!(symbols[usize::from(b'a')], 'a');
        assert_eq!(symbols[usize::from(b' ')], 'Ġ');
        assert_eq!(symbols[0], 'Ā');
        assert_eq!(symbols[0xad], 'Ń');
        let distinct: HashSet<char> = symbols.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        for (b, c) in symbols.iter().enumerate() {
            assert_eq!(char_to_byte(*c).map(usize::from), Some(b));
        }
        assert_eq!(char_to_byte('€'), None);
    }

    #[test]
    fn decode_byte_level_matches_transformers() {
        assert_eq!(decode_byte_level("a</w>"), "a");
        assert_eq!(decode_byte_level("an"), "an");
        assert_eq!(decode_byte_level("!</w>"), "!");
        // "é" is C3 A9 → symbols Ã ©
        assert_eq!(decode_byte_level("cafÃ©</w>"), "café");
        // a lone UTF-8 lead byte prints as the replacement character
        assert_eq!(decode_byte_level("Ã"), "\u{fffd}");
        // the space byte and ASCII separators are stripped like Python's strip()
        assert_eq!(decode_byte_level("Ġ"), "");
        assert_eq!(decode_byte_level("Ĝ"), "");
    }

    #[test]
    fn merges_skip_header_and_reject_bad_lines() {
        let path = Path::new("merges.txt");
        let merges = parse_merges("#version: 0.2\na b\nab c</w>\n\n", path).unwrap();
        assert_eq!(
            merges,
            vec![
                ("a".to_owned(), "b".to_owned()),
                ("ab".to_owned(), "c</w>".to_owned())
            ]
        );
        match parse_merges("#version\na b\nabc\n", path) {
            Err(TextError::BadMerge { line, content, .. }) => {
                assert_eq!((line, content.as_str()), (3, "abc"));
            }
            other => panic!("expected BadMerge, got {other:?}"),
        }
    }

    #[test]
    fn merges_are_capped_like_clip_tokenizer() {
        let text: String = std::iter::once("#version: 0.2\n".to_owned())
            .chain((0..MAX_MERGES + 5).map(|i| format!("x{i} y\n")))
            .collect();
        let merges = parse_merges(&text, Path::new("merges.txt")).unwrap();
        assert_eq!(merges.len(), MAX_MERGES);
    }

    #[test]
    fn dropped_text_is_what_truncation_cuts() {
        let tok = tiny_tokenizer(WORDS);
        // 77 ids hold BOS, 75 words of one token each, EOS.
        let fits = ["pack"; 75].join(" ");
        assert_eq!(tok.encode(&fits).unwrap().len(), 77);
        assert_eq!(tok.dropped_text(&fits).unwrap(), None);
        assert_eq!(tok.dropped_text("A pack of roses").unwrap(), None);
        let long = format!("{fits} of roses blue apple");
        assert_eq!(
            tok.dropped_text(&long).unwrap().as_deref(),
            Some("of roses blue apple")
        );
        assert_eq!(
            tok.encode_truncated(&long).unwrap(),
            tok.encode(&fits).unwrap()
        );
    }

    #[test]
    fn encodes_words_with_bos_and_eos() {
        let tok = tiny_tokenizer(WORDS);
        let expected = vec![
            tok.bos_id(),
            320,
            id(&tok, "pack</w>"),
            id(&tok, "of</w>"),
            id(&tok, "roses</w>"),
            tok.eos_id(),
        ];
        assert_eq!(tok.bos_id(), id(&tok, "<|startoftext|>"));
        assert_eq!(tok.encode("A pack of roses").unwrap(), expected);
        // case, whitespace runs, leading/trailing whitespace and NFC
        assert_eq!(
            tok.encode("  a\tPACK \n of   ROSES  ").unwrap(),
            tok.encode("A pack of roses").unwrap()
        );
        assert_eq!(tok.encode("").unwrap(), vec![tok.bos_id(), tok.eos_id()]);
        assert_eq!(tok.encode("   ").unwrap(), vec![tok.bos_id(), tok.eos_id()]);
        // a word outside the merges falls back to byte symbols, last with </w>
        assert_eq!(
            tok.encode("xy!").unwrap(),
            vec![
                tok.bos_id(),
                id(&tok, "x"),
                id(&tok, "y</w>"),
                256,
                tok.eos_id()
            ]
        );
    }

    #[test]
    fn special_tokens_in_text_are_split_off() {
        let tok = tiny_tokenizer(WORDS);
        assert_eq!(
            tok.encode("a<|endoftext|>of").unwrap(),
            vec![
                tok.bos_id(),
                320,
                tok.eos_id(),
                id(&tok, "of</w>"),
                tok.eos_id()
            ]
        );
    }

    #[test]
    fn sd2_pad_token_splits_exclamation_marks() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), WORDS, "!", 77);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.pad_id(), 0);
        // SD 1.x: "!!" is one punctuation run; SD 2.x: each "!" is the pad token
        assert_eq!(
            tok.encode("of!!").unwrap(),
            vec![tok.bos_id(), id(&tok, "of</w>"), 0, 0, tok.eos_id()]
        );
        let padded = tok.encode_padded("of").unwrap();
        assert_eq!(padded.len(), 77);
        assert_eq!(
            &padded[..3],
            &[tok.bos_id(), id(&tok, "of</w>"), tok.eos_id()]
        );
        assert!(padded[3..].iter().all(|&t| t == 0));
        assert_eq!(tok.decode_token(0).as_deref(), Some("!"));
    }

    #[test]
    fn padding_and_truncation_keep_bos_and_eos() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), WORDS, "<|endoftext|>", 6);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.max_len(), 6);
        let of = id(&tok, "of</w>");
        assert_eq!(
            tok.encode_padded("of").unwrap(),
            vec![
                tok.bos_id(),
                of,
                tok.eos_id(),
                tok.eos_id(),
                tok.eos_id(),
                tok.eos_id()
            ]
        );
        let long = "of of of of of of of";
        assert_eq!(tok.encode(long).unwrap().len(), 9);
        let expected = vec![tok.bos_id(), of, of, of, of, tok.eos_id()];
        assert_eq!(tok.encode_truncated(long).unwrap(), expected);
        assert_eq!(tok.encode_padded(long).unwrap(), expected);
        // exactly max_len ids: nothing cut
        assert_eq!(tok.encode_truncated("of of of of").unwrap().len(), 6);
    }

    #[test]
    fn decode_token_prints_words() {
        let tok = tiny_tokenizer(WORDS);
        assert_eq!(tok.decode_token(320).as_deref(), Some("a"));
        assert_eq!(tok.decode_token(id(&tok, "an</w>")).as_deref(), Some("an"));
        assert_eq!(tok.decode_token(id(&tok, "an")).as_deref(), Some("an"));
        assert_eq!(
            tok.decode_token(tok.bos_id()).as_deref(),
            Some("<|startoftext|>")
        );
        assert_eq!(tok.decode_token(1_000_000), None);
    }

    #[test]
    fn tokenizer_json_gives_the_same_ids() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), WORDS, "<|endoftext|>", 77);
        let from_files = ClipTokenizer::from_dir(dir.path()).unwrap();
        let json = from_files.inner.to_string(false).unwrap();
        let only_json = tempfile::tempdir().unwrap();
        std::fs::write(only_json.path().join("tokenizer.json"), json).unwrap();
        std::fs::copy(
            dir.path().join("tokenizer_config.json"),
            only_json.path().join("tokenizer_config.json"),
        )
        .unwrap();
        let from_json = ClipTokenizer::from_dir(only_json.path()).unwrap();
        for text in ["A pack of roses", "an apple!!", "", "green<|endoftext|>"] {
            assert_eq!(
                from_json.encode(text).unwrap(),
                from_files.encode(text).unwrap()
            );
        }
    }

    #[test]
    fn special_tokens_map_overrides_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), WORDS, "<|endoftext|>", 77);
        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"pad_token": {"content": "!", "normalized": false}}"#,
        )
        .unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.pad_id(), 0);
    }

    #[test]
    fn config_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(matches!(err, TextError::MissingMaxLength { .. }), "{err}");

        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 77}"#,
        )
        .unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(matches!(err, TextError::NoTokenizerFiles { .. }), "{err}");

        write_tiny(dir.path(), WORDS, "<pad>", 77);
        match ClipTokenizer::from_dir(dir.path()).unwrap_err() {
            TextError::UnknownSpecialToken { role, token, .. } => {
                assert_eq!((role, token.as_str()), ("pad", "<pad>"));
            }
            other => panic!("expected UnknownSpecialToken, got {other}"),
        }

        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 1000000000000000019884624838656}"#,
        )
        .unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                TextError::BadConfig {
                    key: "model_max_length",
                    ..
                }
            ),
            "{err}"
        );

        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 77, "pad_token": 3}"#,
        )
        .unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                TextError::BadConfig {
                    key: "pad_token",
                    ..
                }
            ),
            "{err}"
        );

        std::fs::write(dir.path().join("tokenizer_config.json"), "{").unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(matches!(err, TextError::Json { .. }), "{err}");
    }

    #[test]
    fn merges_must_be_utf8() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), WORDS, "<|endoftext|>", 77);
        std::fs::write(dir.path().join("merges.txt"), b"#version: 0.2\n\xff \xfe\n").unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(matches!(err, TextError::NotUtf8 { .. }), "{err}");
    }

    #[test]
    fn defaults_are_clip_tokenizers() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), WORDS, "<|endoftext|>", 77);
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 77}"#,
        )
        .unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        let eos = id(&tok, "<|endoftext|>");
        assert_eq!(tok.bos_id(), id(&tok, "<|startoftext|>"));
        assert_eq!((tok.eos_id(), tok.pad_id()), (eos, eos));
    }
}
