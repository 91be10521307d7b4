//! Which prompts TIME edits with, and which destination position each source
//! position is pulled towards.
//!
//! The rules are those of diffusers' `StableDiffusionModelEditingPipeline.
//! edit_model` (the reference implementation): augmented prompt pairs, and a
//! greedy in-order match of source tokens in the destination tokens, with
//! "an" compared as "a" so that "an apple" aligns with "a green apple".

use crate::text::ClipTokenizer;

use super::EditError;

/// The reference's augmentations (`AUGS_CONST`): each is prefixed to both
/// prompts to add pairs, so the edit generalizes beyond one phrasing.
pub const DEFAULT_AUGMENTATIONS: [&str; 3] = ["A photo of ", "An image of ", "A picture of "];

/// The reference's λ (the paper's and `edit_model`'s default).
pub const DEFAULT_LAMBDA: f64 = 0.1;

/// The prompt as it follows an augmentation: a leading "A" becomes "a"
/// ("A pack of roses" → "A photo of a pack of roses", "An apple" → "an
/// apple"); anything else is kept, since the reference looks at the first
/// character only.
pub fn augmentation_base(prompt: &str) -> String {
    match prompt.strip_prefix('A') {
        Some(rest) => format!("a{rest}"),
        None => prompt.to_owned(),
    }
}

/// UCE's positions for an erase/replace pair (unified-concept-editing,
/// `train-scripts/train_erase.py`, `edit_model`): from the last word token
/// of each prompt (its attention-mask sum − 2: BOS and EOS excluded) to the
/// end of the `seq` positions, the tail of the one that starts earlier
/// trimmed so both are `seq` − max(starts) long. `src_len`, `dst_len`: the
/// token counts with BOS and EOS (≥ 2). Source row `i` of the first range
/// pairs with destination row `i` of the second.
pub fn uce_positions(
    src_len: usize,
    dst_len: usize,
    seq: usize,
) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let (from_src, from_dst) = (src_len.saturating_sub(2), dst_len.saturating_sub(2));
    let farthest = from_src.max(from_dst).min(seq);
    let len = seq - farthest;
    (from_src..from_src + len, from_dst..from_dst + len)
}

/// The (source, destination) prompt pairs of one edit: the prompts
/// themselves, then `aug + base` for each augmentation (see
/// [`augmentation_base`]). An empty `augs` gives the one pair.
pub fn prompt_pairs<S: AsRef<str>>(src: &str, dst: &str, augs: &[S]) -> Vec<(String, String)> {
    let (src_base, dst_base) = (augmentation_base(src), augmentation_base(dst));
    std::iter::once((src.to_owned(), dst.to_owned()))
        .chain(augs.iter().map(|aug| {
            let aug = aug.as_ref();
            (format!("{aug}{src_base}"), format!("{aug}{dst_base}"))
        }))
        .collect()
}

/// Token ids compared as the same word when aligning: every id that
/// decodes to "an" counts as the id of "a". Only the matching uses this;
/// the embeddings are those of the real tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArticleRule {
    an: Vec<u32>,
    a: u32,
}

impl ArticleRule {
    /// A rule from known ids (CLIP: `an` = 514 `an` and 550 `an</w>`,
    /// `a` = 320 `a</w>`). An empty `an` disables the rule.
    pub fn new(an: impl IntoIterator<Item = u32>, a: u32) -> Self {
        Self {
            an: an.into_iter().collect(),
            a,
        }
    }

    /// The rule as the reference applies it: `a` is `encode("a ")[1]`, `an`
    /// every id whose [`ClipTokenizer::decode_token`] is "an" (a scan of the
    /// vocabulary, a few milliseconds).
    pub fn from_tokenizer(tok: &ClipTokenizer) -> Result<Self, EditError> {
        let ids = tok.encode("a ")?;
        let &[_, a, _] = ids.as_slice() else {
            return Err(EditError::NoArticle { ids });
        };
        let size = u32::try_from(tok.vocab_size()).unwrap_or(u32::MAX);
        let an = (0..size).filter(|&id| tok.decode_token(id).as_deref() == Some("an"));
        Ok(Self::new(an, a))
    }

    /// The id every "an" is compared as.
    pub fn a_id(&self) -> u32 {
        self.a
    }

    /// The ids compared as [`Self::a_id`].
    pub fn an_ids(&self) -> &[u32] {
        &self.an
    }

    fn canonical(&self, id: u32) -> u32 {
        if self.an.contains(&id) { self.a } else { id }
    }
}

/// For every one of the `seq_len` source positions, the destination
/// position whose embedding it is pulled towards.
///
/// `src` and `dst` are unpadded ids, BOS … EOS, at most `seq_len` each (what
/// the text encoder sees: [`ClipTokenizer::encode_truncated`]). Source token
/// `i` maps to the next destination position holding the same token (after
/// [`ArticleRule`]); the positions after the source's EOS continue one by one
/// from the destination's next position, and the last position repeats once
/// the destination runs out (the reference's rule, padding included).
pub fn align(
    src: &[u32],
    dst: &[u32],
    rule: &ArticleRule,
    seq_len: usize,
) -> Result<Vec<usize>, EditError> {
    for len in [src.len(), dst.len()] {
        if len > seq_len {
            return Err(EditError::TooManyTokens { len, seq_len });
        }
    }
    let mut map =
        match_positions(src, dst, rule).map_err(|position| EditError::UnmatchedToken {
            position,
            token: src.get(position).copied().unwrap_or_default(),
        })?;
    let next = map.last().map_or(0, |&j| j + 1);
    map.extend(next..seq_len);
    map.resize(seq_len, seq_len.saturating_sub(1));
    Ok(map)
}

/// [`align()`] on two prompts, reporting a failure with the missing word.
///
/// Prompts longer than the text encoder's sequence are aligned on what the
/// encoder sees (BOS, the first `max_len - 2` tokens, EOS): the tokens past
/// the cut have no embedding, and the reference itself fails on them. A
/// source word found only past the destination's cut gives
/// [`EditError::TruncatedWord`].
pub fn align_prompts(
    tok: &ClipTokenizer,
    rule: &ArticleRule,
    src: &str,
    dst: &str,
) -> Result<Vec<usize>, EditError> {
    let src_ids = tok.encode_truncated(src)?;
    let dst_ids = tok.encode_truncated(dst)?;
    match align(&src_ids, &dst_ids, rule, tok.max_len()) {
        Err(EditError::UnmatchedToken { position, token }) => {
            let word = tok
                .decode_token(token)
                .unwrap_or_else(|| format!("<token {token}>"));
            let (src, dst) = (src.to_owned(), dst.to_owned());
            let full_dst = tok.encode(dst.as_str())?;
            let upto = src_ids.get(..=position).unwrap_or(&src_ids);
            if full_dst.len() > dst_ids.len() && match_positions(upto, &full_dst, rule).is_ok() {
                Err(EditError::TruncatedWord {
                    word,
                    src,
                    dst,
                    max_len: tok.max_len(),
                })
            } else {
                Err(EditError::MissingWord { word, src, dst })
            }
        }
        other => other,
    }
}

/// The greedy in-order match: for each source token, the first destination
/// position at or after the previous match + 1 holding the same token.
/// `Err(i)` names the first source position without a match.
fn match_positions(src: &[u32], dst: &[u32], rule: &ArticleRule) -> Result<Vec<usize>, usize> {
    let mut map = Vec::with_capacity(src.len());
    let mut j = 0;
    for (i, &token) in src.iter().enumerate() {
        let wanted = rule.canonical(token);
        let offset = dst
            .get(j..)
            .unwrap_or_default()
            .iter()
            .position(|&t| rule.canonical(t) == wanted)
            .ok_or(i)?;
        map.push(j + offset);
        j += offset + 1;
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tokenizer::test_support::tiny_tokenizer;
    use proptest::prelude::*;

    const BOS: u32 = 49406;
    const EOS: u32 = 49407;

    fn clip_rule() -> ArticleRule {
        ArticleRule::new([514, 550], 320)
    }

    #[test]
    fn prompt_pairs_follow_the_reference() {
        let pairs = prompt_pairs(
            "A pack of roses",
            "A pack of blue roses",
            &DEFAULT_AUGMENTATIONS,
        );
        let expected = [
            ("A pack of roses", "A pack of blue roses"),
            (
                "A photo of a pack of roses",
                "A photo of a pack of blue roses",
            ),
            (
                "An image of a pack of roses",
                "An image of a pack of blue roses",
            ),
            (
                "A picture of a pack of roses",
                "A picture of a pack of blue roses",
            ),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(s, d)| (s.to_string(), d.to_string()))
            .collect();
        assert_eq!(pairs, expected);

        let none: [&str; 0] = [];
        assert_eq!(
            prompt_pairs("an apple", "a green apple", &none),
            vec![("an apple".to_owned(), "a green apple".to_owned())]
        );
        // only a leading "A" changes; "An" becomes "an", other letters stay
        assert_eq!(augmentation_base("An apple"), "an apple");
        assert_eq!(augmentation_base("an apple"), "an apple");
        assert_eq!(augmentation_base("Ärger"), "Ärger");
        assert_eq!(augmentation_base(""), "");
        assert_eq!(
            prompt_pairs("Roses", "Blue roses", &["x "]),
            vec![
                ("Roses".to_owned(), "Blue roses".to_owned()),
                ("x Roses".to_owned(), "x Blue roses".to_owned())
            ]
        );
    }

    #[test]
    fn reference_roses_example() {
        let a = [BOS, 320, 3420, 539, 9061, EOS];
        let b = [BOS, 320, 3420, 539, 1746, 9061, EOS];
        let map = align(&a, &b, &clip_rule(), 77).unwrap();
        let mut expected = vec![0, 1, 2, 3, 5, 6];
        expected.extend(7..77);
        expected.push(76);
        assert_eq!(map, expected);
    }

    #[test]
    fn an_is_compared_as_a() {
        // "an apple" → "a green apple"
        let a = [BOS, 550, 3055, EOS];
        let b = [BOS, 320, 1901, 3055, EOS];
        let map = align(&a, &b, &clip_rule(), 77).unwrap();
        let mut expected = vec![0, 1, 3, 4];
        expected.extend(5..77);
        expected.push(76);
        assert_eq!(map, expected);
        // without the rule "an" has no counterpart
        let err = align(&a, &b, &ArticleRule::new([], 320), 77).unwrap_err();
        assert!(
            matches!(
                err,
                EditError::UnmatchedToken {
                    position: 1,
                    token: 550
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn identical_prompts_map_to_themselves() {
        let a = [BOS, 320, 3420, EOS];
        assert_eq!(
            align(&a, &a, &clip_rule(), 77).unwrap(),
            (0..77).collect::<Vec<_>>()
        );
    }

    #[test]
    fn too_many_tokens_is_an_error() {
        let a = vec![1; 8];
        let err = align(&a, &a, &clip_rule(), 7).unwrap_err();
        assert!(
            matches!(err, EditError::TooManyTokens { len: 8, seq_len: 7 }),
            "{err}"
        );
    }

    #[test]
    fn rule_from_tokenizer_finds_both_ans() {
        let tok = tiny_tokenizer(&["an", "apple", "ant"]);
        let rule = ArticleRule::from_tokenizer(&tok).unwrap();
        assert_eq!(rule.a_id(), 320);
        let mut an: Vec<String> = rule
            .an_ids()
            .iter()
            .filter_map(|&id| tok.decode_token(id))
            .collect();
        an.sort();
        assert_eq!(an, ["an", "an"]);
        assert_eq!(rule.an_ids().len(), 2);
    }

    #[test]
    fn prompts_align_through_the_tokenizer() {
        let tok = tiny_tokenizer(&["an", "apple", "green", "pack", "of", "roses", "blue"]);
        let rule = ArticleRule::from_tokenizer(&tok).unwrap();
        let map = align_prompts(&tok, &rule, "an apple", "a green apple").unwrap();
        assert_eq!(&map[..5], &[0, 1, 3, 4, 5]);
        let map = align_prompts(&tok, &rule, "A pack of roses", "A pack of blue roses").unwrap();
        assert_eq!(&map[..7], &[0, 1, 2, 3, 5, 6, 7]);
        assert_eq!(map.len(), 77);
    }

    #[test]
    fn missing_word_names_it() {
        let tok = tiny_tokenizer(&["pack", "of", "roses", "blue", "tulips"]);
        let rule = ArticleRule::from_tokenizer(&tok).unwrap();
        match align_prompts(&tok, &rule, "A pack of roses", "A pack of blue tulips") {
            Err(EditError::MissingWord { word, src, dst }) => {
                assert_eq!(word, "roses");
                assert_eq!(src, "A pack of roses");
                assert_eq!(dst, "A pack of blue tulips");
            }
            other => panic!("expected MissingWord, got {other:?}"),
        }
    }

    #[test]
    fn word_past_the_encoder_length_is_reported_as_truncated() {
        let tok = tiny_tokenizer(&["of", "roses"]);
        let rule = ArticleRule::from_tokenizer(&tok).unwrap();
        let dst = format!("{} roses", vec!["of"; 80].join(" "));
        match align_prompts(&tok, &rule, "of roses", &dst) {
            Err(EditError::TruncatedWord { word, max_len, .. }) => {
                assert_eq!((word.as_str(), max_len), ("roses", 77));
            }
            other => panic!("expected TruncatedWord, got {other:?}"),
        }
        // both long: aligned on what the encoder sees
        let src = vec!["of"; 90].join(" ");
        let map = align_prompts(&tok, &rule, &src, &src).unwrap();
        assert_eq!(map, (0..77).collect::<Vec<_>>());
    }

    /// A source token list and a destination made of it plus insertions.
    fn src_and_superset() -> impl Strategy<Value = (Vec<u32>, Vec<u32>)> {
        (
            proptest::collection::vec(0u32..6, 0..20),
            proptest::collection::vec((0usize..25, 0u32..8), 0..20),
        )
            .prop_map(|(body, inserts)| {
                let mut src = vec![BOS];
                src.extend(body);
                src.push(EOS);
                let mut dst = src.clone();
                for (at, token) in inserts {
                    let at = 1 + at % (dst.len() - 1);
                    dst.insert(at, token);
                }
                dst.truncate(40);
                if dst.last() != Some(&EOS) {
                    dst.push(EOS);
                }
                (src, dst)
            })
    }

    proptest! {
        #[test]
        fn alignment_is_monotone_and_matches_tokens((src, dst) in src_and_superset()) {
            let rule = ArticleRule::new([], 320);
            let Ok(map) = align(&src, &dst, &rule, 77) else {
                // truncating dst may drop source tokens; then nothing to check
                return Ok(());
            };
            prop_assert_eq!(map.len(), 77);
            prop_assert!(map.iter().all(|&j| j < 77));
            for (i, &token) in src.iter().enumerate() {
                prop_assert_eq!(dst[map[i]], token);
            }
            prop_assert!(map.windows(2).all(|w| w[0] <= w[1]));
            prop_assert!(map[..src.len()].windows(2).all(|w| w[0] < w[1]));
        }

        #[test]
        fn superset_destination_always_aligns(body in proptest::collection::vec(0u32..6, 0..20),
                                              extra in proptest::collection::vec(0u32..8, 0..20)) {
            let mut src = vec![BOS];
            src.extend(&body);
            src.push(EOS);
            // the extra words go in front of the body: always a superset
            let mut dst = vec![BOS];
            dst.extend(&extra);
            dst.extend(&body);
            dst.push(EOS);
            let map = align(&src, &dst, &ArticleRule::new([], 320), 77);
            prop_assert!(map.is_ok());
        }
    }

    #[test]
    fn uce_positions_start_at_the_last_word_and_keep_equal_lengths() {
        // "Van Gogh" (BOS van gogh EOS) → "art" (BOS art EOS): 2.. and 1.., 75 each.
        assert_eq!(uce_positions(4, 3, 77), (2..77, 1..76));
        // An empty guide " " is BOS EOS: from 0.
        assert_eq!(uce_positions(4, 2, 77), (2..77, 0..75));
        assert_eq!(uce_positions(3, 5, 77), (1..75, 3..77));
        assert_eq!(uce_positions(77, 77, 77), (75..77, 75..77));
    }
}
