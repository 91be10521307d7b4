//! Captions on grids of images: which prompt, and before or after the edit.
//!
//! A picture of eight seeds before and after an edit says nothing without
//! them, and no font can be assumed on a server or a fresh machine, so the
//! text is drawn with a small bitmap font of our own (`font5x7.txt`: the
//! printable ASCII characters, 5×7 pixels each), checked when compiling.

use ndarray::{Array3, ArrayViewMut3, s};

/// Pixels of one glyph, and of the space after it.
const GLYPH_W: usize = 5;
const GLYPH_H: usize = 7;
const ADVANCE: usize = GLYPH_W + 1;

/// Bit `c` of `GLYPHS[ch - 32][r]` is the pixel at row `r`, column `c`.
static GLYPHS: [[u8; GLYPH_H]; 95] = parse_font(include_bytes!("font5x7.txt"));

/// Reads the font file at compile time; a malformed file fails the build.
const fn parse_font(bytes: &[u8]) -> [[u8; GLYPH_H]; 95] {
    // Skip the comment line.
    let mut at = 0;
    while bytes[at] != b'\n' {
        at += 1;
    }
    at += 1;
    // `'c' ` then 7 groups of 5 pixels separated by spaces, then a newline.
    const LINE: usize = 4 + GLYPH_H * ADVANCE;
    assert!(
        bytes.len() - at == 95 * LINE,
        "font5x7.txt: 95 lines of 46 bytes"
    );
    let mut glyphs = [[0u8; GLYPH_H]; 95];
    let mut i = 0;
    while i < 95 {
        let line = at + i * LINE;
        assert!(
            bytes[line + 1] == 32 + i as u8,
            "font5x7.txt: glyphs in ASCII order"
        );
        let mut r = 0;
        while r < GLYPH_H {
            let mut c = 0;
            while c < GLYPH_W {
                match bytes[line + 4 + r * ADVANCE + c] {
                    b'#' => glyphs[i][r] |= 1 << c,
                    b'.' => {}
                    _ => panic!("font5x7.txt: pixels are # or ."),
                }
                c += 1;
            }
            r += 1;
        }
        i += 1;
    }
    glyphs
}

/// The glyph drawn for `ch`: printable ASCII as itself, anything else as `?`.
fn glyph(ch: char) -> &'static [u8; GLYPH_H] {
    let i = match ch {
        ' '..='~' => ch as usize - 32,
        _ => '?' as usize - 32,
    };
    &GLYPHS[i]
}

/// Width in pixels of `text` drawn `scale` times enlarged.
pub fn text_width(text: &str, scale: usize) -> usize {
    (text.chars().count() * ADVANCE).saturating_sub(1) * scale
}

/// Height in pixels of one line drawn `scale` times enlarged.
pub fn text_height(scale: usize) -> usize {
    GLYPH_H * scale
}

/// A text size that reads well beside tiles `tile` pixels high.
pub fn scale_for(tile: usize) -> usize {
    (tile / 48).clamp(1, 4)
}

/// Draws `text` in black with its top left corner at (`top`, `left`); what
/// falls outside `image` is cut off.
pub fn draw_text(
    image: &mut ArrayViewMut3<f32>,
    top: usize,
    left: usize,
    text: &str,
    scale: usize,
) {
    let (h, w, _) = image.dim();
    for (k, ch) in text.chars().enumerate() {
        let x0 = left + k * ADVANCE * scale;
        for (r, bits) in glyph(ch).iter().enumerate() {
            for c in (0..GLYPH_W).filter(|c| bits & (1 << c) != 0) {
                let (y, x) = (top + r * scale, x0 + c * scale);
                if y < h && x < w {
                    image
                        .slice_mut(s![y..(y + scale).min(h), x..(x + scale).min(w), ..])
                        .fill(0.0);
                }
            }
        }
    }
}

/// Captions for a grid: one per row, drawn to its left, and headings drawn
/// above, each centred over an equal share of the columns.
#[derive(Debug, Clone, Default)]
pub struct Captions {
    /// One caption per row, or none.
    pub rows: Vec<String>,
    /// Headings over equal shares of the columns, or none.
    pub headings: Vec<String>,
}

/// `grid`, as made by [`super::png::grid`] from tiles `tile` = (h, w) with
/// `gap` pixels between them in `cols` columns, with a margin on the left for
/// the row captions and one on top for the headings.
pub fn caption(
    grid: &Array3<f32>,
    tile: (usize, usize),
    cols: usize,
    gap: usize,
    captions: &Captions,
) -> Array3<f32> {
    let scale = scale_for(tile.0);
    let pad = 2 * scale;
    let left = captions
        .rows
        .iter()
        .map(|t| text_width(t, scale) + 2 * pad)
        .max()
        .unwrap_or(0);
    let top = if captions.headings.is_empty() {
        0
    } else {
        text_height(scale) + 2 * pad
    };
    let (h, w, c) = grid.dim();
    let mut out = Array3::from_elem((h + top, w + left, c), 1.0f32);
    out.slice_mut(s![top.., left.., ..]).assign(grid);
    let mut view = out.view_mut();
    for (r, text) in captions.rows.iter().enumerate() {
        let row_top = top + gap + r * (tile.0 + gap);
        let y = row_top + tile.0.saturating_sub(text_height(scale)) / 2;
        draw_text(&mut view, y, pad, text, scale);
    }
    if !captions.headings.is_empty() {
        let span = cols / captions.headings.len();
        let span_w = span * (tile.1 + gap);
        for (k, text) in captions.headings.iter().enumerate() {
            let x = left + gap + k * span_w + span_w.saturating_sub(text_width(text, scale)) / 2;
            draw_text(&mut view, pad, x, text, scale);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inked(image: &Array3<f32>) -> Vec<(usize, usize)> {
        image
            .indexed_iter()
            .filter(|((_, _, ch), v)| *ch == 0 && **v == 0.0)
            .map(|((y, x, _), _)| (y, x))
            .collect()
    }

    #[test]
    fn every_printable_character_has_its_own_glyph() {
        let mut seen = std::collections::HashSet::new();
        for ch in ' '..='~' {
            assert!(
                seen.insert(*glyph(ch)),
                "{ch:?} looks like another character"
            );
            assert_eq!(*glyph(ch) == [0; GLYPH_H], ch == ' ', "{ch:?}");
        }
        assert_eq!(glyph('é'), glyph('?'));
    }

    #[test]
    fn a_glyph_is_drawn_at_its_place_and_scale() {
        // 'T' is a full top row and a centre column.
        let mut img = Array3::from_elem((20, 20, 3), 1.0f32);
        draw_text(&mut img.view_mut(), 3, 4, "T", 2);
        let ink = inked(&img);
        let mut want: Vec<(usize, usize)> = (0..2)
            .flat_map(|dy| (0..10).map(move |dx| (3 + dy, 4 + dx)))
            .chain((2..14).flat_map(|dy| (0..2).map(move |dx| (3 + dy, 4 + 4 + dx))))
            .collect();
        want.sort();
        assert_eq!(ink, want);
        assert_eq!(text_width("TT", 2), 22);
    }

    #[test]
    fn text_past_the_edge_is_cut_off() {
        let mut img = Array3::from_elem((5, 8, 3), 1.0f32);
        draw_text(&mut img.view_mut(), 2, 3, "WWWW", 3);
        assert!(inked(&img).iter().all(|&(y, x)| y >= 2 && x >= 3));
        assert!(!inked(&img).is_empty());
    }

    #[test]
    fn captions_add_margins_and_keep_the_tiles() {
        let tile = (48, 48);
        let tiles: Vec<Array3<f32>> = (0..4)
            .map(|k| Array3::from_elem((48, 48, 3), 0.2 + 0.1 * k as f32))
            .collect();
        let grid = crate::pipeline::png::grid(&tiles, 2, 2).unwrap();
        let captions = Captions {
            rows: vec!["a circle".into(), "a square".into()],
            headings: vec!["before".into(), "after".into()],
        };
        let out = caption(&grid, tile, 2, 2, &captions);
        let (left, top) = (text_width("a circle", 1) + 4, text_height(1) + 4);
        assert_eq!(out.dim(), (grid.dim().0 + top, grid.dim().1 + left, 3));
        assert_eq!(out.slice(s![top.., left.., ..]), grid);
        let ink = inked(&out);
        assert!(ink.iter().any(|&(y, x)| x < left && y > top));
        assert!(ink.iter().any(|&(y, x)| y < top && x > left));
        assert!(ink.iter().all(|&(y, x)| y < top || x < left));
    }
}
