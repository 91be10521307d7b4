//! The toy world's deterministic classifier (models/toy/world.json), the
//! same rules as `scripts/toy_world.py`: background from the border, the
//! foreground's colour by nearest palette entry, the shape by template IoU.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::ArrayView3;
use serde::Deserialize;

use super::{EvalError, Pick};

/// What the classifier reads off one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The shape, when there is a foreground.
    pub shape: Option<String>,
    /// Its colour, when there is a foreground.
    pub colour: Option<String>,
    /// The background.
    pub background: String,
}

/// The world's constants, as written by the training script.
#[derive(Debug, Deserialize)]
pub struct World {
    colours: BTreeMap<String, [u8; 3]>,
    backgrounds: BTreeMap<String, [u8; 3]>,
    shapes: Vec<String>,
    priors: BTreeMap<String, Option<String>>,
    foreground_diff: f32,
    min_pixels: usize,
    template: usize,
    shape_box: BTreeMap<String, [f64; 4]>,
    /// Each shape rasterized on the template grid (derived at load).
    #[serde(skip)]
    templates: Vec<(String, Vec<bool>)>,
}

/// Whether unit coordinates (u, v) lie inside `shape` (toy_world.inside).
fn inside(shape: &str, u: f64, v: f64) -> Option<bool> {
    Some(match shape {
        "circle" => u * u + v * v <= 1.0,
        "square" => u.abs() <= 0.85 && v.abs() <= 0.85,
        "triangle" => v <= 0.8 && u.abs() <= (v + 1.0) * (1.05 / 1.8),
        "diamond" => u.abs() + v.abs() <= 1.2,
        _ => return None,
    })
}

impl World {
    /// Reads `world.json`; every shape must be one whose rule we know.
    pub fn load(path: &Path) -> Result<Self, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut world: World = serde_json::from_str(&text).map_err(|e| EvalError::Classifier {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        for s in &world.shapes {
            if inside(s, 0.0, 0.0).is_none() || !world.shape_box.contains_key(s) {
                return Err(EvalError::Classifier {
                    path: path.to_path_buf(),
                    why: format!("unknown shape {s:?}"),
                });
            }
        }
        world.templates = world
            .shapes
            .iter()
            .map(|s| (s.clone(), world.template(s)))
            .collect();
        Ok(world)
    }

    fn template(&self, shape: &str) -> Vec<bool> {
        let [u0, u1, v0, v1] = self.shape_box[shape];
        let n = self.template;
        let c = |i: usize| (i as f64 + 0.5) / n as f64;
        let mut t = Vec::with_capacity(n * n);
        for r in 0..n {
            for q in 0..n {
                let (u, v) = (u0 + c(q) * (u1 - u0), v0 + c(r) * (v1 - v0));
                t.push(inside(shape, u, v).unwrap_or(false));
            }
        }
        t
    }

    /// Classifies `img: [h, w, 3] f32` in [0, 1].
    pub fn classify(&self, img: ArrayView3<f32>) -> Seen {
        let (h, w, _) = img.dim();
        let px = |y: usize, x: usize| [img[[y, x, 0]], img[[y, x, 1]], img[[y, x, 2]]];
        let mut border = Vec::new();
        for x in 0..w {
            border.push(px(0, x));
        }
        for x in 0..w {
            border.push(px(h - 1, x));
        }
        for y in 1..h - 1 {
            border.push(px(y, 0));
        }
        for y in 1..h - 1 {
            border.push(px(y, w - 1));
        }
        let background = nearest(median(&border), &self.backgrounds);
        let bg = self.backgrounds[&background].map(|c| c as f32 / 255.0);
        let mut mask = vec![false; h * w];
        let mut fg = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let p = px(y, x);
                if (0..3).any(|c| (p[c] - bg[c]).abs() > self.foreground_diff) {
                    mask[y * w + x] = true;
                    fg.push(p);
                }
            }
        }
        if fg.len() < self.min_pixels {
            return Seen {
                shape: None,
                colour: None,
                background,
            };
        }
        let colour = nearest(median(&fg), &self.colours);
        let (mut y0, mut y1, mut x0, mut x1) = (h, 0, w, 0);
        for y in 0..h {
            for x in 0..w {
                if mask[y * w + x] {
                    (y0, y1, x0, x1) = (y0.min(y), y1.max(y + 1), x0.min(x), x1.max(x + 1));
                }
            }
        }
        let n = self.template;
        let at = |i: usize, lo: usize, hi: usize| {
            (lo as f64 + (i as f64 + 0.5) / n as f64 * (hi - lo) as f64) as usize
        };
        let grid: Vec<bool> = (0..n * n)
            .map(|k| mask[at(k / n, y0, y1) * w + at(k % n, x0, x1)])
            .collect();
        let mut best: Option<(f64, &String)> = None;
        for (s, t) in &self.templates {
            let both = grid.iter().zip(t).filter(|(a, b)| **a && **b).count();
            let either = grid.iter().zip(t).filter(|(a, b)| **a || **b).count();
            let iou = both as f64 / either.max(1) as f64;
            if best.is_none_or(|(b, _)| iou > b) {
                best = Some((iou, s));
            }
        }
        Seen {
            shape: best.map(|(_, s)| s.clone()),
            colour: Some(colour),
            background,
        }
    }

    /// The colour a prompt asks for in the unedited world: the colour it
    /// names, else its shape's prior (`None`: the control shape, any colour).
    pub fn implied_colour(&self, text: &str) -> Option<String> {
        let lower = text.to_lowercase().replace(',', " ");
        let words: Vec<&str> = lower.split_whitespace().collect();
        if let Some(c) = words.iter().find(|w| self.colours.contains_key(**w)) {
            return Some(c.to_string());
        }
        let shape = words
            .iter()
            .find(|w| self.shapes.iter().any(|s| s == **w))?;
        self.priors.get(*shape).cloned().flatten()
    }

    /// Which of two prompts an image matches by the colour each implies; a
    /// prompt implying no colour matches any colour the other one does not claim.
    pub fn judge(&self, seen: &Seen, a: &str, b: &str) -> Option<Pick> {
        let col = seen.colour.as_deref()?;
        let (ca, cb) = (self.implied_colour(a), self.implied_colour(b));
        let is = |c: &Option<String>| c.as_deref() == Some(col);
        match (is(&ca), is(&cb)) {
            (true, false) => Some(Pick::A),
            (false, true) => Some(Pick::B),
            // neither claims it (or both do): a prompt without a colour takes it
            _ if ca.is_none() && !is(&cb) => Some(Pick::A),
            _ if cb.is_none() && !is(&ca) => Some(Pick::B),
            _ => None,
        }
    }

    /// Which of `prompts` an image matches: the one whose implied colour is
    /// the colour seen, when exactly one is.
    pub fn closest(&self, seen: &Seen, prompts: &[&str]) -> Option<usize> {
        let col = seen.colour.as_deref()?;
        let mut matching = prompts
            .iter()
            .enumerate()
            .filter(|(_, p)| self.implied_colour(p).as_deref() == Some(col));
        match (matching.next(), matching.next()) {
            (Some((k, _)), None) => Some(k),
            _ => None,
        }
    }
}

/// Per-channel median (numpy's: the mean of the two middle values for an even count).
fn median(px: &[[f32; 3]]) -> [f32; 3] {
    let mut out = [0.0; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f32> = px.iter().map(|p| p[c]).collect();
        v.sort_by(f32::total_cmp);
        let n = v.len();
        *o = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
    }
    out
}

fn nearest(rgb: [f32; 3], palette: &BTreeMap<String, [u8; 3]>) -> String {
    palette
        .iter()
        .map(|(name, p)| {
            let d: f32 = (0..3).map(|c| (p[c] as f32 / 255.0 - rgb[c]).powi(2)).sum();
            (d, name)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n.clone())
        .unwrap_or_default()
}
