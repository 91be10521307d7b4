//! The CLIP tokenizer against transformers' ids (`tests/fixtures/goldens/tokenizer.json`,
//! written by `scripts/make_fixtures.py`: slow == fast tokenizer == open_clip on every prompt).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use time_onnx::edit::ArticleRule;
use time_onnx::text::ClipTokenizer;

#[derive(Deserialize)]
struct Goldens {
    max_length: usize,
    bos: u32,
    eos: u32,
    sd1_pad: u32,
    sd2_pad: u32,
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    prompt: String,
    ids_sd1: Vec<u32>,
    ids_sd2: Vec<u32>,
    num_tokens_untruncated: usize,
    truncated: bool,
    length_sd1: usize,
    length_sd2: usize,
}

/// `tests/fixtures`, or `None` (with a note) while the fixtures are not generated.
fn fixtures() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if root.join("goldens/tokenizer.json").is_file() {
        Some(root)
    } else {
        eprintln!(
            "skipped: {} has no goldens/tokenizer.json (run python3 scripts/make_fixtures.py)",
            root.display()
        );
        None
    }
}

fn goldens(root: &Path) -> Goldens {
    let text = std::fs::read_to_string(root.join("goldens/tokenizer.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn sd1(root: &Path) -> ClipTokenizer {
    ClipTokenizer::from_dir(&root.join("sd-tiny/tokenizer")).unwrap()
}

fn sd2(root: &Path) -> ClipTokenizer {
    ClipTokenizer::from_dir(&root.join("sd-tiny/tokenizer-sd2")).unwrap()
}

#[test]
fn a_pack_of_roses() {
    let Some(root) = fixtures() else { return };
    let tok = sd1(&root);
    assert_eq!(
        tok.encode("A pack of roses").unwrap(),
        [49406, 320, 3420, 539, 9061, 49407]
    );
    assert_eq!(tok.vocab_size(), 49408);
}

#[test]
fn special_ids_and_length_come_from_the_config() {
    let Some(root) = fixtures() else { return };
    let g = goldens(&root);
    for (tok, pad) in [(sd1(&root), g.sd1_pad), (sd2(&root), g.sd2_pad)] {
        assert_eq!(tok.bos_id(), g.bos);
        assert_eq!(tok.eos_id(), g.eos);
        assert_eq!(tok.pad_id(), pad);
        assert_eq!(tok.max_len(), g.max_length);
    }
}

#[test]
fn padded_ids_match_transformers_sd1() {
    let Some(root) = fixtures() else { return };
    let g = goldens(&root);
    let tok = sd1(&root);
    for p in &g.prompts {
        assert_eq!(
            tok.encode_padded(&p.prompt).unwrap(),
            p.ids_sd1,
            "{:?}",
            p.prompt
        );
        let raw = tok.encode(&p.prompt).unwrap();
        assert_eq!(raw.len(), p.num_tokens_untruncated, "{:?}", p.prompt);
        assert_eq!(raw.len() > g.max_length, p.truncated, "{:?}", p.prompt);
        let truncated = tok.encode_truncated(&p.prompt).unwrap();
        assert_eq!(truncated.len(), p.length_sd1, "{:?}", p.prompt);
    }
    assert!(g.prompts.iter().any(|p| p.truncated), "no truncated prompt");
}

#[test]
fn padded_ids_match_transformers_sd2() {
    let Some(root) = fixtures() else { return };
    let g = goldens(&root);
    let tok = sd2(&root);
    for p in &g.prompts {
        assert_eq!(
            tok.encode_padded(&p.prompt).unwrap(),
            p.ids_sd2,
            "{:?}",
            p.prompt
        );
        let truncated = tok.encode_truncated(&p.prompt).unwrap();
        assert_eq!(truncated.len(), p.length_sd2, "{:?}", p.prompt);
    }
}

#[test]
fn tokens_decode_like_transformers() {
    let Some(root) = fixtures() else { return };
    let tok = sd1(&root);
    let cases = [
        (320, "a"),
        (550, "an"),
        (514, "an"),
        (9061, "roses"),
        (1746, "blue"),
        (0, "!"),
        (256, "!"),
        (49406, "<|startoftext|>"),
        (49407, "<|endoftext|>"),
    ];
    for (id, text) in cases {
        assert_eq!(tok.decode_token(id).as_deref(), Some(text), "id {id}");
    }
    // a lone UTF-8 byte prints as U+FFFD, as transformers' errors="replace"
    assert_eq!(tok.decode_token(127).as_deref(), Some("\u{fffd}"));
    assert_eq!(tok.decode_token(49408), None);
}

#[test]
fn article_rule_finds_the_two_ans() {
    let Some(root) = fixtures() else { return };
    let rule = ArticleRule::from_tokenizer(&sd1(&root)).unwrap();
    assert_eq!(rule.a_id(), 320);
    assert_eq!(rule.an_ids(), [514, 550]);
}
