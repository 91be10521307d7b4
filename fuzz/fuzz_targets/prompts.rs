//! Arbitrary text as a source and destination prompt (split at the first
//! tab): tokenization, padding, the augmented pairs and TIME's token
//! alignment must return errors, never panic, and every alignment they return
//! must index inside the text encoder's sequence.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use time_onnx::edit::{ArticleRule, DEFAULT_AUGMENTATIONS, align_prompts, prompt_pairs};
use time_onnx::text::ClipTokenizer;

static TOKENIZER: LazyLock<(ClipTokenizer, ArticleRule)> = LazyLock::new(|| {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd-tiny/tokenizer");
    let tok = ClipTokenizer::from_dir(&dir).expect("the fixture tokenizer");
    let rule = ArticleRule::from_tokenizer(&tok).expect("an article rule");
    (tok, rule)
});

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (src, dst) = text.split_once('\t').unwrap_or((&text, &text));
    let (tok, rule) = &*TOKENIZER;
    let n = tok.max_len();
    for prompt in [src, dst] {
        if let Ok(ids) = tok.encode_padded(prompt) {
            assert_eq!(ids.len(), n);
            assert_eq!(ids[0], tok.bos_id());
            assert!(ids.contains(&tok.eos_id()));
        }
    }
    for (s, d) in prompt_pairs(src, dst, &DEFAULT_AUGMENTATIONS) {
        if let Ok(map) = align_prompts(tok, rule, &s, &d) {
            assert_eq!(map.len(), n);
            assert!(map.iter().all(|&j| j < n), "{map:?}");
        }
    }
});
